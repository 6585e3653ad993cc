"""The CLI's API client: JSON replies, and every failure mapped to the right cdp error."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cdp.cli.api_client import ApiClient
from cdp.errors import DaemonUnavailable, OperationFailed, PointNotRetained, UsageError
from cdp.units import Address


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cdp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"volumes": [{"name": "vm1-disk0"}], "alerts": []})


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"got": await request.json()})


async def _bad_request(request: web.Request) -> web.Response:
    return web.json_response({"error": "no volume 'x'", "hint": "cdp status"}, status=400)


async def _unavailable(request: web.Request) -> web.Response:
    return web.json_response({"error": "shutting down"}, status=503)


async def _broken(request: web.Request) -> web.Response:
    return web.json_response({"error": "journal is read-only"}, status=500)


async def _not_retained(request: web.Request) -> web.Response:
    window = {"first_seq": 3, "last_seq": 9, "first_ts_ns": 10, "last_ts_ns": 20}
    return web.json_response(
        {"error": "seq:1 is not retained", "hint": "pick another", "window": window}, status=409
    )


async def _not_json(request: web.Request) -> web.Response:
    return web.Response(text="<html>hello</html>")


def _app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/status", _status)
    app.router.add_post("/v1/echo", _echo)
    app.router.add_get("/bad", _bad_request)
    app.router.add_get("/unavailable", _unavailable)
    app.router.add_get("/broken", _broken)
    app.router.add_get("/html", _not_json)
    app.router.add_get("/gone", _not_retained)
    return app


@pytest.fixture
async def unix_api(short_dir: Path) -> AsyncIterator[Address]:
    runner = web.AppRunner(_app())
    await runner.setup()
    sock = short_dir / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield Address.unix(str(sock))
    finally:
        await runner.cleanup()


async def test_get_over_unix_socket(unix_api: Address) -> None:
    doc = await ApiClient(unix_api).get("/v1/status")
    assert doc == {"volumes": [{"name": "vm1-disk0"}], "alerts": []}


async def test_post_sends_json(unix_api: Address) -> None:
    assert await ApiClient(unix_api).post("/v1/echo", {"a": 1}) == {"got": {"a": 1}}


async def test_get_over_loopback_tcp() -> None:
    runner = web.AppRunner(_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        doc = await ApiClient(Address.tcp("127.0.0.1", port)).get("/v1/status")
        assert doc["alerts"] == []
    finally:
        await runner.cleanup()


async def test_missing_socket_is_daemon_unavailable(short_dir: Path) -> None:
    with pytest.raises(DaemonUnavailable) as info:
        await ApiClient(Address.unix(str(short_dir / "none.sock"))).get("/v1/status")
    assert info.value.retryable
    assert "No such file" in str(info.value)
    assert info.value.hint is not None


async def test_http_400_is_usage_error_with_server_hint(unix_api: Address) -> None:
    with pytest.raises(UsageError) as info:
        await ApiClient(unix_api).get("/bad")
    assert str(info.value) == "no volume 'x'"
    assert info.value.hint == "cdp status"


async def test_http_503_is_daemon_unavailable(unix_api: Address) -> None:
    with pytest.raises(DaemonUnavailable):
        await ApiClient(unix_api).get("/unavailable")


async def test_http_500_is_operation_failed(unix_api: Address) -> None:
    with pytest.raises(OperationFailed, match="journal is read-only"):
        await ApiClient(unix_api).get("/broken")


async def test_http_404_is_operation_failed(unix_api: Address) -> None:
    with pytest.raises(OperationFailed, match="HTTP 404"):
        await ApiClient(unix_api).get("/v1/nothing")


async def test_non_json_reply_is_operation_failed(unix_api: Address) -> None:
    with pytest.raises(OperationFailed, match="not a JSON object"):
        await ApiClient(unix_api).get("/html")


async def test_http_409_is_point_not_retained_with_window(unix_api: Address) -> None:
    with pytest.raises(PointNotRetained) as info:
        await ApiClient(unix_api).get("/gone")
    err = info.value
    assert str(err) == "seq:1 is not retained"
    assert (err.first_seq, err.last_seq) == (3, 9)
    assert (err.window_start_ns, err.window_end_ns) == (10, 20)
    assert err.hint == "pick another"
    assert err.exit_code == 1
