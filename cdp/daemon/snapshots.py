"""The snapshot schedule: take the scheduled snapshot when due, then apply the plan.

Both sites run it on their own journals with their own ``[retention.snapshots]`` grid, so
the DR site keeps history of its own (a corruption that replicated can be undone there).
The plan is a pure function (``cdp.snapshot_plan``); deleting goes through the journal,
which refuses a locked snapshot whatever the plan says.
"""

from __future__ import annotations

import logging

from cdp.config import SnapshotGrid
from cdp.snapshot_plan import SnapshotInfo, plan_retention, scheduled_due, scheduled_name
from journal import Journal, SnapshotLocked

log = logging.getLogger(__name__)


def grid_enabled(grid: SnapshotGrid) -> bool:
    return bool(grid.hourly or grid.daily or grid.weekly or grid.monthly)


def snapshot_round(j: Journal, grid: SnapshotGrid, now_ns: int, group: str) -> list[str]:
    """One pass (blocking: run in a thread); returns what it did, for logs and tests."""
    done: list[str] = []
    if not grid_enabled(grid):
        return done
    # bucketed by when each was taken: on an idle volume the point (and its time) stays
    # the same for hours, and must not make a new snapshot due every round
    infos = [SnapshotInfo(s.name, s.created_ts, s.kind, s.locked_until) for s in j.snapshots()]
    if scheduled_due(infos, grid, now_ns) and j.window().last_seq > 0:
        name = scheduled_name(now_ns)
        if all(i.name != name for i in infos):
            until = now_ns + grid.lock_ns if grid.lock_ns else 0
            s = j.create_snapshot(name, kind="scheduled", locked_until=until)
            log.info(
                "scheduled snapshot",
                extra={"group": group, "snapshot": name, "seq": s.seq, "locked_until": until},
            )
            done.append(f"created {name}")
            infos.append(SnapshotInfo(s.name, s.created_ts, s.kind, s.locked_until))
    for name in plan_retention(infos, grid, now_ns).deletes():
        try:
            j.delete_snapshot(name, now_ns=now_ns)
        except SnapshotLocked:  # the plan keeps locked snapshots; the journal enforces it
            log.error("retention plan named a locked snapshot", extra={"snapshot": name})
            continue
        log.info("snapshot pruned", extra={"group": group, "snapshot": name})
        done.append(f"deleted {name}")
    return done
