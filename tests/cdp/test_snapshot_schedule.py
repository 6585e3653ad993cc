"""The schedule on a real journal: an idle volume gets one snapshot per period, not per round."""

from __future__ import annotations

from pathlib import Path

from cdp.config import SnapshotGrid
from cdp.daemon.snapshots import snapshot_round
from journal import Journal, ManualClock

HOUR = 3600 * 10**9


def test_idle_volume_one_scheduled_snapshot_per_hour(tmp_path: Path) -> None:
    clock = ManualClock(1_796_000_000 * 10**9 // HOUR * HOUR)
    j = Journal.open(str(tmp_path / "j"), clock=clock)
    j.add_volume("v", 1 << 20)
    j.write("v", 0, b"x" * 4096)  # then nothing more: the latest point stays put
    grid = SnapshotGrid(hourly=3, lock_ns=HOUR)
    for _ in range(5 * 60):  # five hours of one round a minute
        snapshot_round(j, grid, clock(), "g")
        clock.advance(60 * 10**9)
    names = [s.name for s in j.snapshots()]
    # one per hour; the grid keeps the newest 3 hours, and the older ones' locks ran out
    assert len(names) == 3, names
    assert len(set(names)) == 3
    j.close()
