"""Client side of the daemon API: JSON over HTTP on the address the config names.

The CLI verbs are thin clients of the API (issue 3), so connection handling and the mapping
of failures to cdp errors live here, once:

* cannot connect (no socket, refused, permission denied), timeout, connection dropped:
  :class:`~cdp.errors.DaemonUnavailable` (exit 1, retryable, hint to start the daemon);
* HTTP 400: :class:`~cdp.errors.UsageError` (exit 2): the daemon rejected the arguments;
* HTTP 409: :class:`~cdp.errors.PointNotRetained` (exit 1), with the ``window`` the reply
  carries (``first_seq``, ``last_seq``, ``first_ts_ns``, ``last_ts_ns``);
* HTTP 503: :class:`~cdp.errors.DaemonUnavailable`: starting up or shutting down;
* any other status >= 400: :class:`~cdp.errors.OperationFailed` (exit 1).

Error replies are ``{"error": "one line", "hint": "optional command"}`` (docs/design/api.md);
the message and hint are shown to the user as they are.

:meth:`ApiClient.download` streams a binary reply (a volume image) into a sink chunk by chunk;
its timeout applies to each read, not to the whole transfer, which can take long.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp

from cdp.errors import DaemonUnavailable, OperationFailed, PointNotRetained, UsageError
from cdp.units import Address

__all__ = ["ApiClient", "Download"]

_DEFAULT_TIMEOUT_S: Final = 30.0
_DOWNLOAD_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Download:
    """What :meth:`ApiClient.download` received: the reply headers and the byte count."""

    headers: Mapping[str, str]
    content_length: int | None
    received: int


class ApiClient:
    """Requests to one daemon API address; one short-lived HTTP session per request.

    A CLI process makes one or two requests, so no pooling; each call opens and closes its
    own session, which keeps the object free of event-loop state.
    """

    def __init__(self, address: Address, *, timeout_s: float = _DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.timeout_s = timeout_s

    async def get(self, path: str) -> dict[str, object]:
        """GET *path* (like ``/v1/status``) and return the JSON object it answers."""
        return await self._request("GET", path, None)

    async def post(self, path: str, body: Mapping[str, object]) -> dict[str, object]:
        """POST *body* as JSON to *path* and return the JSON object it answers."""
        return await self._request("POST", path, body)

    async def delete(self, path: str) -> dict[str, object]:
        """DELETE *path* and return the JSON object it answers."""
        return await self._request("DELETE", path, None)

    async def download(
        self,
        path: str,
        sink: Callable[[bytes], object],
        *,
        chunk_size: int = _DOWNLOAD_CHUNK,
    ) -> Download:
        """GET *path* and pass the body to *sink* in order, in chunks of at most *chunk_size*.

        Error replies raise as for :meth:`get` before *sink* sees anything. A transfer cut
        short raises :class:`~cdp.errors.DaemonUnavailable`; exceptions from *sink* propagate
        unchanged. The caller checks ``received`` against what it expected.
        """
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s
        )
        async with self._open("GET", path, None, timeout) as resp:
            if resp.status >= 400:
                _decode(resp.status, await resp.text(), str(self.address))
            received = 0
            async for chunk in resp.content.iter_chunked(chunk_size):
                sink(chunk)
                received += len(chunk)
            return Download(dict(resp.headers), resp.content_length, received)

    async def _request(
        self, method: str, path: str, body: Mapping[str, object] | None
    ) -> dict[str, object]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._open(method, path, body, timeout) as resp:
            text = await resp.text()
            status = resp.status
        return _decode(status, text, str(self.address))

    @contextlib.asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        body: Mapping[str, object] | None,
        limits: aiohttp.ClientTimeout,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request in its own session; transport failures become cdp errors."""
        connector: aiohttp.BaseConnector
        if self.address.kind == "unix":
            assert self.address.path is not None
            connector = aiohttp.UnixConnector(path=self.address.path)
            base = "http://localhost"
        else:
            connector = aiohttp.TCPConnector()
            base = f"http://{self.address}"
        where = str(self.address)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=limits) as session,
                session.request(method, base + path, json=body) as resp,
            ):
                yield resp
        except aiohttp.ClientConnectorError as e:
            reason = e.os_error.strerror or str(e.os_error)
            hint = None
            if isinstance(e.os_error, PermissionError):
                hint = "run as a member of the group that owns the socket, or as root"
            raise DaemonUnavailable(where, reason, hint=hint) from e
        except TimeoutError as e:
            raise DaemonUnavailable(where, f"no answer within {self.timeout_s:g}s") from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
            raise DaemonUnavailable(where, f"connection dropped ({e})") from e
        except aiohttp.ClientError as e:
            raise OperationFailed(f"request to the daemon at {where} failed: {e}") from e


def _decode(status: int, text: str, where: str) -> dict[str, object]:
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        if status >= 400:
            # Not one of our handlers (a proxy, or a path this daemon version lacks).
            raise OperationFailed(f"the daemon at {where} answered HTTP {status}")
        raise OperationFailed(f"the daemon at {where} sent a reply that is not a JSON object")
    if status < 400:
        return doc
    message = doc.get("error")
    hint = doc.get("hint")
    err = message if isinstance(message, str) and message else f"HTTP {status}"
    hint_text = hint if isinstance(hint, str) else None
    if status == 400:
        raise UsageError(err, hint=hint_text)
    if status == 409:
        window = doc.get("window")
        w = window if isinstance(window, dict) else {}
        raise PointNotRetained(
            err,
            window_start_ns=_int_or_none(w.get("first_ts_ns")),
            window_end_ns=_int_or_none(w.get("last_ts_ns")),
            first_seq=_int_or_none(w.get("first_seq")),
            last_seq=_int_or_none(w.get("last_seq")),
            hint=hint_text,
        )
    if status == 503:
        raise DaemonUnavailable(where, err, hint=hint_text)
    raise OperationFailed(err, hint=hint_text)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
