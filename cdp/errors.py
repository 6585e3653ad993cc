"""Errors raised by the ``cdp`` package (daemon, config, CLI).

Every class carries what the CLI needs to report it without guessing: an exit code, whether
trying again later may succeed, and an optional hint (a command to try). The CLI maps classes
to exit codes in one table (``cdp.cli.main.EXIT_CODES``); the ``exit_code`` ClassVar here is
the same number, kept so that code outside the CLI (the API, tests) can classify an error too.

Exit codes follow the design brief: 0 success, 1 operation failed, 2 usage or config error.

Tree::

    CdpError                    exit 1  root; never raised itself
     +-- UsageError             exit 2  bad command line (unknown verb, bad WHEN, ...)
     +-- ConfigError            exit 2  invalid config file; names file, key and value
     +-- DaemonUnavailable      exit 1  retryable; the API socket refused or is missing
     +-- OperationFailed        exit 1  the request was understood but could not be done
          +-- PointNotRetained  exit 1  the WHEN asked for is outside what is kept
          +-- OutputExists      exit 1  refusing to overwrite a file or follow a symlink
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import ClassVar, Final

__all__ = [
    "NO_VALUE",
    "CdpError",
    "ConfigError",
    "DaemonUnavailable",
    "OperationFailed",
    "OutputExists",
    "PointNotRetained",
    "UsageError",
    "render_value",
]


class _NoValue:
    """Marker for "no value was given" (a missing key), distinct from a given ``None``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Final = _NoValue()


class CdpError(Exception):
    """Root of the cdp error tree; ``str(err)`` is one human-readable line."""

    exit_code: ClassVar[int] = 1
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(CdpError):
    """The command line is wrong; nothing was attempted. ``hint`` shows a correct form."""

    exit_code: ClassVar[int] = 2


class ConfigError(CdpError):
    """A config file is unreadable or invalid; nothing was started.

    Renders as ``FILE: KEY: REASON (got VALUE)``, for example
    ``cdp.toml: volume[1].size: expected a size like "8GiB" (got "eight")``. FILE is the path
    as the user gave it (so it matches what they typed), KEY is the dotted TOML path with
    0-based array indexes, or None for file-level problems (unreadable, TOML syntax). VALUE is
    shown as TOML would write it and left out when the key is missing.
    """

    exit_code: ClassVar[int] = 2

    def __init__(
        self,
        file: str | os.PathLike[str],
        key: str | None,
        reason: str,
        *,
        value: object = NO_VALUE,
        hint: str | None = None,
    ) -> None:
        self.file = os.fspath(file)
        self.key = key
        self.reason = reason
        self.value = value
        parts = [self.file]
        if key:
            parts.append(key)
        message = ": ".join([*parts, reason])
        if value is not NO_VALUE:
            message += f" (got {render_value(value)})"
        super().__init__(message, hint=hint)


class DaemonUnavailable(CdpError):
    """The daemon's API could not be reached: not running, wrong socket, or no permission."""

    retryable: ClassVar[bool] = True

    def __init__(self, address: str, reason: str, *, hint: str | None = None) -> None:
        self.address = address
        self.reason = reason
        super().__init__(
            f"cannot reach the cdp daemon at {address}: {reason}",
            hint=hint
            or "start it (systemctl start cdp, or cdp daemon --config PATH), "
            "or pass the --config whose [daemon] api it listens on",
        )


class OperationFailed(CdpError):
    """The request was valid but could not be carried out; the message says why."""


class PointNotRetained(OperationFailed):
    """The requested point in time is not kept (outside the journal window, no such name).

    Carries the retained window, when known, so the message can say which window is kept and
    callers can offer a point inside it. Exit code 1, the brief's "operation failed"; a more
    specific code can be added later if scripts need it. Build with :meth:`outside_window`
    for the standard message, or pass the daemon's message as it is.
    """

    def __init__(
        self,
        message: str,
        *,
        window_start_ns: int | None = None,
        window_end_ns: int | None = None,
        first_seq: int | None = None,
        last_seq: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.window_start_ns = window_start_ns
        self.window_end_ns = window_end_ns
        self.first_seq = first_seq
        self.last_seq = last_seq
        super().__init__(message, hint=hint or "cdp status shows the retained journal window")

    @classmethod
    def outside_window(
        cls, when: str, window_start_ns: int | None, window_end_ns: int | None
    ) -> PointNotRetained:
        """``no retained point for WHEN: the journal holds T1 to T2`` (or "is empty")."""
        if window_start_ns is None or window_end_ns is None:
            message = f"no retained point for {when}: the journal is empty"
        else:
            message = (
                f"no retained point for {when}: the journal holds "
                f"{_rfc3339(window_start_ns)} to {_rfc3339(window_end_ns)}"
            )
        return cls(message, window_start_ns=window_start_ns, window_end_ns=window_end_ns)


class OutputExists(OperationFailed):
    """An output path exists or is a symlink, and ``--force`` was not given."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}", hint="choose another --output, or add --force")


def render_value(value: object) -> str:
    """Show a config value the way TOML writes it, shortened, for "(got ...)" in messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(render_value(v) for v in value) + "]"
    elif isinstance(value, datetime):
        text = value.isoformat()
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rfc3339(t_ns: int) -> str:
    # Local copy of cdp.when.format_time_ns's seconds form; errors must not import upward.
    dt = datetime.fromtimestamp(t_ns // 10**9, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
