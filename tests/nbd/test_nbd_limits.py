"""Resource bounds of one NBD connection (reliability.md S1/S8: "no unbounded allocation for
any byte stream; per-connection buffers are capped at max payload + header").

A client may pipeline requests and read the replies late (or never). What the daemon holds
for one such connection must stay bounded by a constant (a few maximum payloads), not grow
with the number of requests in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbdraw as n
import pytest
from conftest import CdpDaemon, Volume, need_tools, running_daemon
from nbdraw import RawNbd

pytestmark = pytest.mark.integration

NAME = "lim0"
SIZE = 8 << 20


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(params=["uvloop", "asyncio"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CdpDaemon]:
    need_tools("qemu-io", "qemu-img")
    with running_daemon(tmp_path, [Volume(NAME, SIZE)], event_loop=request.param) as d:
        with RawNbd.connect_export(d.sock(NAME), NAME) as c:
            assert c.pwrite(0, bytes(range(256)) * (SIZE // 256)).error == 0
        yield d


def peak_growth_while_not_reading(
    d: CdpDaemon, c: RawNbd, frames: bytes, seconds: float = 2.0
) -> float:
    """Send ``frames`` (from a thread: the server may stop reading, which is backpressure
    working) and sample the daemon's RSS while nobody reads the replies."""
    assert d.proc is not None
    base = _rss_mib(d.proc.pid)
    sender = threading.Thread(target=c.send, args=(frames,), daemon=True)
    sender.start()
    peak = base
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, _rss_mib(d.proc.pid))
        time.sleep(0.05)
    c.sender = sender  # type: ignore[attr-defined]  # joined by the caller after reading
    return peak - base


def test_pipelined_reads_not_read_back_hold_bounded_memory(daemon: CdpDaemon) -> None:
    reads, length = 32, SIZE  # 256 MiB of reply data for 896 bytes of requests
    with RawNbd.connect_export(daemon.sock(NAME), NAME, timeout=60) as c:
        frames = b"".join(c.submit(n.CMD_READ, 0, length, send=False)[1] for _ in range(reads))
        grown = peak_growth_while_not_reading(daemon, c, frames, seconds=1.0)
        # then read everything: the replies are complete and correct
        want = bytes(range(256)) * (SIZE // 256)
        for _ in range(reads):
            r = c.reply()
            assert r.error == 0 and r.data == want
    daemon.assert_healthy(NAME)
    daemon.assert_journal_matches_image(NAME)
    assert grown < 160, (
        f"daemon RSS grew by {grown:.0f} MiB for {reads} pipelined {length >> 20} MiB reads "
        "that the client had not read yet"
    )


def test_pipelined_small_reads_and_fua_writes_stay_bounded(daemon: CdpDaemon) -> None:
    """The bounded cases: many small requests in flight (reads, FUA writes) cost little."""
    with RawNbd.connect_export(daemon.sock(NAME), NAME, timeout=60) as c:
        frames = b""
        for i in range(2000):
            if i % 2:
                frames += c.submit(n.CMD_READ, (i * 4096) % SIZE, 4096, send=False)[1]
            else:
                frames += c.submit(
                    n.CMD_WRITE,
                    (i * 4096) % SIZE,
                    payload=bytes([i % 251]) * 4096,
                    flags=n.CMD_FLAG_FUA,
                    send=False,
                )[1]
        grown = peak_growth_while_not_reading(daemon, c, frames, seconds=1.0)
        for _ in range(2000):
            assert c.reply().error == 0
        c.sender.join(30)  # type: ignore[attr-defined]
        assert not c.pending
    assert grown < 64, f"RSS grew by {grown:.0f} MiB"
    daemon.assert_healthy(NAME)
    daemon.assert_consistent(NAME)
