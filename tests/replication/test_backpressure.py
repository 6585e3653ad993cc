"""A slow or absent DR link grows the backlog visibly: RPO lag, pending bytes, high water."""

from __future__ import annotations

import socket

from cdp.daemon.replication import replica_alerts
from journal import Journal, ManualClock
from replicator.sender import Sender

from .conftest import running, target, until


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_lag_and_high_water_when_the_link_is_down(primary: Journal) -> None:
    clock = ManualClock(primary.ts_of(int(primary.window().last_seq)) + 10**9)
    url = f"http://127.0.0.1:{_closed_port()}"  # nothing listens: every connect is refused
    s = Sender(target(url, high_water=1 << 20), "g1", lambda: primary, clock=clock)
    async with running(s):
        await until(lambda: s.stats.reconnects > 0, "a failed connect")
        first = primary.write("vm1-disk0", 0, b"\x01" * (3 << 20))
        clock.set(primary.ts_of(first) + 7 * 10**9)  # that write waited 7 s for the DR site
        st = s.status()
        assert st["state"] == "disconnected"
        assert st["lag_s"] >= 7.0
        assert st["pending_records"] >= 1
        assert st["pending_bytes"] > 1 << 20 and st["over_high_water"]
        alerts = replica_alerts("g1", st)
        assert any("behind" in a and "RPO lag" in a for a in alerts), alerts
    # nothing was dropped: the journal still holds every pending record
    assert primary.read("vm1-disk0", 0, 16) == b"\x01" * 16
