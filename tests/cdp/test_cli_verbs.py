"""The client side of checkpoint, restore, journal and status, against a stand-in API.

The real daemon is driven in tests/e2e; here a small aiohttp app (in a thread, since each
verb runs its own event loop) lets the tests shape replies the daemon rarely sends: a
transfer cut short, a 409 between resolve and download, odd status documents.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from cdp.cli.api_client import ApiClient
from cdp.cli.common import approx_size, describe_window, point_time, when_to_api
from cdp.cli.main import main
from cdp.cli.restore_cmd import SPARSE_BLOCK, SparseWriter
from cdp.cli.status_cmd import render_status
from cdp.errors import DaemonUnavailable, UsageError
from cdp.units import Address
from cdp.when import parse_when

MiB = 1 << 20
WINDOW = {"first_seq": 0, "last_seq": 40, "first_ts_ns": 0, "last_ts_ns": 1_795_403_700 * 10**9}


@dataclass
class FakeApi:
    """Replies by path; records the JSON bodies it received."""

    image: bytes = b""
    seq: int = 7
    short_by: int = 0  # send this many bytes less than Content-Length
    image_status: int = 200
    resolve_status: int = 200
    requests: list[tuple[str, object]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/resolve", self.resolve)
        app.router.add_post("/v1/checkpoint", self.checkpoint)
        app.router.add_post("/v1/journal/rebuild-index", self.rebuild)
        app.router.add_get("/v1/volumes/{name}/image", self.download)
        return app

    async def resolve(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("resolve", body))
        if self.resolve_status == 409:
            return web.json_response(
                {"error": "seq 99 is not retained", "hint": "see cdp status", "window": WINDOW},
                status=409,
            )
        return web.json_response(
            {"group": "g", "volume": body["volume"], "seq": self.seq,
             "ts_ns": 1_795_403_700 * 10**9, "size": len(self.image)}
        )  # fmt: skip

    async def checkpoint(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("checkpoint", body))
        return web.json_response(
            {"group": "g", "seq": 12, "ts_ns": 1_795_403_700_250_000_000,
             "name": body.get("name", "cp-1"), "kind": "crash"}
        )  # fmt: skip

    async def rebuild(self, request: web.Request) -> web.Response:
        self.requests.append(("rebuild", await request.json()))
        return web.json_response({"group": "g", "segments": 3, "blocks": 17})

    async def download(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("image", dict(request.query)))
        if self.image_status == 409:
            return web.json_response({"error": "gone", "window": WINDOW}, status=409)
        resp = web.StreamResponse(headers={"X-Cdp-Seq": str(self.seq)})
        resp.content_length = len(self.image)
        await resp.prepare(request)
        body = self.image[: len(self.image) - self.short_by]
        for off in range(0, len(body), 300_000):  # chunks not aligned to 64 KiB
            await resp.write(body[off : off + 300_000])
        if self.short_by:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cdp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(short_dir: Path) -> Iterator[Callable[[FakeApi], Path]]:
    """Start a FakeApi on a unix socket in a thread; returns a config pointing at it."""
    stops: list[Callable[[], None]] = []

    def start(api: FakeApi) -> Path:
        sock = short_dir / "api.sock"
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        runner = web.AppRunner(api.app())

        async def up() -> None:
            await runner.setup()
            await web.UnixSite(runner, str(sock)).start()
            ready.set()

        def thread_main() -> None:
            loop.run_until_complete(up())
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        t = threading.Thread(target=thread_main, daemon=True)
        t.start()
        assert ready.wait(10)

        def stop() -> None:
            loop.call_soon_threadsafe(loop.stop)
            t.join(10)

        stops.append(stop)
        cfg = short_dir / "cdp.toml"
        cfg.write_text(
            '[daemon]\napi = "unix:api.sock"\nstate_dir = "state"\n'
            '[[volume]]\nname = "v"\nsize = "4MiB"\nsource = "scan"\npath = "v.raw"\n'
        )
        return cfg

    yield start
    for stop in stops:
        stop()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv), environ={})
    out, err = capsys.readouterr()
    return code, out, err


def patterned(size: int) -> bytes:
    """Data blocks, zero blocks and a zero tail, so sparse writing has something to skip."""
    out = bytearray(size)
    for off in range(0, size // 2, 3 * SPARSE_BLOCK):
        out[off : off + SPARSE_BLOCK] = bytes([(off // SPARSE_BLOCK) % 251 + 1]) * SPARSE_BLOCK
    out[SPARSE_BLOCK + 5] = 0xEE  # one byte makes a block non-zero
    return bytes(out)


# ---------------------------------------------------------------------- restore


def test_restore_streams_a_sparse_exact_image(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path], tmp_path: Path
) -> None:
    api = FakeApi(image=patterned(4 * MiB))
    cfg = serve(api)
    out_file = tmp_path / "r.raw"
    code, out, err = cli(
        capsys, "restore", "v", "--at", "-5m", "--output", str(out_file), "--config", str(cfg)
    )
    assert (code, err) == (0, "")
    assert out_file.read_bytes() == api.image
    assert out_file.stat().st_mode & 0o777 == 0o600
    # Relative WHEN was resolved on the CLI side into an absolute time.
    (kind, body), (kind2, query) = api.requests
    assert kind == "resolve" and isinstance(body, dict)
    assert body["volume"] == "v" and body["when"]["kind"] == "time"
    assert isinstance(body["when"]["t_ns"], int)
    assert (kind2, query) == ("image", {"seq": "7"})
    assert out.startswith(
        f"restored v at seq 7 (2026-11-23T03:15:00Z) to {out_file}: 4194304 bytes, "
    )
    # Holes where the image is zero: far less than 4 MiB allocated (file systems without
    # holes would allocate it all; tmp is tmpfs or ext4 here).
    assert out_file.stat().st_blocks * 512 < 3 * MiB


def test_restore_short_transfer_removes_partial_file(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path], tmp_path: Path
) -> None:
    cfg = serve(FakeApi(image=patterned(4 * MiB), short_by=100_000))
    out_file = tmp_path / "r.raw"
    code, out, err = cli(
        capsys, "restore", "v", "--at", "latest", "--output", str(out_file), "--config", str(cfg)
    )
    assert code == 1
    assert out == ""
    assert err.startswith("Error: ")
    assert "Traceback" not in err
    assert not out_file.exists()


def test_restore_not_retained_names_window_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path], tmp_path: Path
) -> None:
    cfg = serve(FakeApi(image=bytes(MiB), resolve_status=409))
    out_file = tmp_path / "r.raw"
    code, _, err = cli(
        capsys, "restore", "v", "--at", "seq:99", "--output", str(out_file), "--config", str(cfg)
    )
    assert code == 1
    assert err.splitlines()[0] == (
        "Error: no retained point for seq:99 of v: the journal holds seq 0..40, "
        "from the journal start to 2026-11-23T03:15:00Z"
    )
    assert not out_file.exists()


def test_restore_point_folded_before_download_removes_file(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path], tmp_path: Path
) -> None:
    cfg = serve(FakeApi(image=bytes(MiB), image_status=409))
    out_file = tmp_path / "r.raw"
    code, _, err = cli(
        capsys, "restore", "v", "--at", "latest", "--output", str(out_file), "--config", str(cfg)
    )
    assert code == 1
    assert "no retained point for latest of v: the journal holds seq 0..40" in err
    assert not out_file.exists()


def test_restore_force_replaces_file_and_symlink_target(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path], tmp_path: Path
) -> None:
    api = FakeApi(image=patterned(MiB))
    cfg = serve(api)
    existing = tmp_path / "old.raw"
    existing.write_bytes(b"x" * (3 * MiB))  # longer than the image: must be truncated
    code, _, err = cli(
        capsys, "restore", "v", "--at", "latest", "--output", str(existing), "--force",
        "--config", str(cfg),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert existing.read_bytes() == api.image
    link = tmp_path / "link.raw"
    link.symlink_to(existing)
    existing.write_bytes(b"y")
    code, _, err = cli(
        capsys, "restore", "v", "--at", "latest", "--output", str(link), "--force",
        "--config", str(cfg),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert link.is_symlink()
    assert existing.read_bytes() == api.image


def test_sparse_writer_matches_input_for_any_chunking(tmp_path: Path) -> None:
    data = patterned(MiB + 4097)  # a partial last block
    for chunk in (1, 4096, SPARSE_BLOCK, 100_000, len(data)):
        path = tmp_path / f"out-{chunk}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            w = SparseWriter(fd)
            step = chunk if chunk > 1 else 7919
            for off in range(0, len(data), step):
                w.write(data[off : off + step])
            assert w.finish() == len(data)
        finally:
            os.close(fd)
        assert path.read_bytes() == data, chunk


def test_sparse_writer_all_zero_is_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "zero"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        w = SparseWriter(fd)
        w.write(bytes(8 * MiB))
        assert w.finish() == 8 * MiB
    finally:
        os.close(fd)
    assert path.stat().st_size == 8 * MiB
    assert path.stat().st_blocks == 0


def test_sparse_writer_dense_mode_writes_zeros(tmp_path: Path) -> None:
    path = tmp_path / "dense"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        w = SparseWriter(fd, sparse=False)
        w.write(bytes(MiB))
        w.finish()
    finally:
        os.close(fd)
    assert path.stat().st_blocks * 512 >= MiB


# ---------------------------------------------------------------------- other verbs


def test_checkpoint_prints_name_seq_time_group(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path]
) -> None:
    api = FakeApi()
    cfg = serve(api)
    code, out, err = cli(capsys, "checkpoint", "v", "--name", "before", "--config", str(cfg))
    assert (code, err) == (0, "")
    assert out == "checkpoint before: seq 12 at 2026-11-23T03:15:00.25Z (group g)\n"
    code, out, _ = cli(capsys, "checkpoint", "--group", "v", "--config", str(cfg))
    assert code == 0
    assert api.requests == [
        ("checkpoint", {"volume": "v", "name": "before"}),
        ("checkpoint", {"group": "v"}),
    ]


def test_rebuild_index_prints_counts(
    capsys: pytest.CaptureFixture[str], serve: Callable[[FakeApi], Path]
) -> None:
    api = FakeApi()
    cfg = serve(api)
    code, out, _ = cli(capsys, "journal", "rebuild-index", "v", "--config", str(cfg))
    assert code == 0
    assert out == "rebuilt the journal index of group g (volume v): 3 segment(s), 17 block(s)\n"
    assert api.requests == [("rebuild", {"volume": "v"})]


# ---------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("text", "api"),
    [
        ("latest", {"kind": "latest"}),
        ("seq:42", {"kind": "seq", "seq": 42}),
        ("checkpoint:before", {"kind": "checkpoint", "name": "before"}),
        ("snapshot:s1", {"kind": "snapshot", "id": "s1"}),
        ("2026-11-22T03:15:00Z", {"kind": "time", "t_ns": 1_795_317_300 * 10**9}),
        ("-15m", {"kind": "time", "t_ns": 10**18 - 15 * 60 * 10**9}),
    ],
)
def test_when_to_api(text: str, api: dict[str, object]) -> None:
    assert when_to_api(parse_when(text, now_ns=10**18)) == api


def test_describe_window_and_times() -> None:
    assert describe_window(3, 9, 10**18, 2 * 10**18) == (
        "seq 3..9, 2001-09-09T01:46:40Z to 2033-05-18T03:33:20Z"
    )
    assert (
        describe_window(0, 9, 0, 10**18)
        == "seq 0..9, from the journal start to 2001-09-09T01:46:40Z"
    )
    assert describe_window(None, None, None, None) == "an unknown window"
    assert point_time(0) == "the journal start"
    assert point_time(None) == "-"
    assert [approx_size(n) for n in (0, 1023, 1024, 1536 * 1024, 20 * 2**30, None)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "20 GiB", "-",
    ]  # fmt: skip


async def test_download_error_reply_raises_before_sink(short_dir: Path) -> None:
    async def bad(request: web.Request) -> web.Response:
        return web.json_response({"error": "seq: expected an integer"}, status=400)

    app = web.Application()
    app.router.add_get("/img", bad)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(short_dir / "a.sock")).start()
    got: list[bytes] = []
    try:
        with pytest.raises(UsageError, match="expected an integer"):
            await ApiClient(Address.unix(str(short_dir / "a.sock"))).download("/img", got.append)
    finally:
        await runner.cleanup()
    assert got == []


async def test_download_without_daemon_is_unavailable(short_dir: Path) -> None:
    with pytest.raises(DaemonUnavailable):
        await ApiClient(Address.unix(str(short_dir / "none.sock"))).download("/x", print)


# ---------------------------------------------------------------------- status


# The shape the daemon answers (cdp/daemon/service.py), trimmed to one volume and group.
REAL_STATUS: dict[str, object] = {
    "daemon": {
        "pid": 4242, "version": "0.1.0", "started_ns": 1_795_403_700_123_456_789,
        "gc": {"frozen_objects": 912_004, "thaws": 3, "thaws_under_load": 1,
               "last_thaw_age_s": 41.5, "last_thaw_ms": 88.2, "last_thaw_freed": 17},
    },
    "groups": [
        {
            "name": "vm1",
            "volumes": ["vm1-disk0"],
            "window": {"first_seq": 0, "last_seq": 18, "first_ts_ns": 0,
                       "last_ts_ns": 1_795_403_710 * 10**9},
            "journal_bytes": 1_049_663,
            "segments": 1,
            "unsealed_segments": 0,
            "index_bytes": 32768,
            "last_checkpoint": {"seq": 18, "ts_ns": 1_795_403_710 * 10**9,
                                "name": "onboarded:vm1-disk0", "kind": "crash"},
            "holds": [{"kind": "export", "name": "vm1-disk0:1", "seq": 17}],
            "history_short": False,
            "alerts": [],
            "recovery": {"truncated_segment": "segments/3.hot", "truncated_at": 4096,
                         "truncated_bytes": 100, "index_rebuilt": False,
                         "damaged_packs": ["00000000000000ab.pack at byte 4152"]},
        }
    ],
    "volumes": [
        {
            "name": "vm1-disk0",
            "group": "vm1",
            "size": 16 * MiB,
            "source": "scan",
            "capture": {"state": "error", "detail": "/x.raw: No such file or directory",
                        "last_scan_ns": 0, "changed_bytes": 0},
            "onboarding": {"state": "scanning", "scanned_bytes": 4 * MiB,
                           "total_bytes": 16 * MiB, "first_point_seq": None},
        }
    ],
    "alerts": ["vm1-disk0: capture error: /x.raw: No such file or directory"],
}  # fmt: skip


def test_render_real_status_document() -> None:
    text = render_status(REAL_STATUS)
    lines = text.splitlines()
    assert lines[0] == (
        "daemon: pid 4242, version 0.1.0, started 2026-11-23T03:15:00Z, collector: 912004 "
        "objects frozen, 3 full collections (1 under load), the last 41.5 s ago (paused 88.2 ms)"
    )
    header = next(line for line in lines if "NAME" in line)
    assert header.split() == [
        "NAME", "GROUP", "SIZE", "SOURCE", "CAPTURE", "LAST", "SCAN", "ONBOARDING",
    ]  # fmt: skip
    row = lines[lines.index(header) + 1].split()
    assert row == ["vm1-disk0", "vm1", "16MiB", "scan", "error", "-", "scanning", "25%"]
    assert "  vm1-disk0: /x.raw: No such file or directory" in lines
    assert "  vm1 (volumes: vm1-disk0)" in lines
    assert any(
        line.split(":", 1)[0].strip() == "window"
        and line.endswith("seq 0..18, from the journal start to 2026-11-23T03:15:10Z")
        for line in lines
    )
    assert any("onboarded:vm1-disk0 (crash) at seq 18" in line for line in lines)
    assert any("torn tail truncated in segments/3.hot at offset 4096" in line for line in lines)
    assert any("DAMAGED" in line and "00000000000000ab.pack at byte 4152" in line for line in lines)
    assert any("export:vm1-disk0:1 at seq 17" in line for line in lines)
    assert lines[-2:] == [
        "alerts:",
        "  - vm1-disk0: capture error: /x.raw: No such file or directory",
    ]
    assert "{" not in text  # no raw JSON for the fields the daemon documents


def test_render_status_keeps_unknown_fields() -> None:
    doc = json.loads(json.dumps(REAL_STATUS))
    doc["site"] = "primary"
    doc["volumes"][0]["lag_ns"] = 5
    doc["groups"][0]["failover"] = ["dr1"]
    text = render_status(doc)
    assert "site: primary" in text
    assert "LAG_NS" in text
    assert any(line.split() == ["failover:", '["dr1"]'] for line in text.splitlines())


def test_render_status_empty_daemon() -> None:
    text = render_status({"daemon": {"pid": 1}, "groups": [], "volumes": [], "alerts": []})
    assert text == "daemon: pid 1\n\nvolumes: none\n\ngroups: none\n\nalerts: none\n"
