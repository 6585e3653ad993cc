"""Scheduled snapshots: when the next one is due and which ones the retention grid keeps.

The grid (``[retention.snapshots]``, :class:`~cdp.config.SnapshotGrid`) works like sanoid's or
zrepl's: for each enabled period (hourly, daily, weekly, monthly) with count N, the N most
recent *calendar* buckets of that period, up to and including the one holding "now", each keep
their newest scheduled snapshot. A bucket with no snapshot keeps nothing and still counts, so a
daemon that was down for a week does not keep older snapshots to make up the number: the grid
promises "one per hour of the last 24 hours", not "24 snapshots".

Buckets are in UTC. Local time would make a day 23 or 25 hours long across a DST change and
the plan would differ between hosts with different TZ settings; UTC keeps it one answer
everywhere. Weeks are ISO weeks (starting Monday), months calendar months.

Rules that override the grid, strongest first:

* a locked snapshot (``locked_until > now``) is kept: the lock is a promise that no path can
  delete it, and the planner is one of those paths;
* a snapshot of any other kind than ``"scheduled"`` (manual, anomaly, ...) was asked for
  by someone or something on purpose and is kept until explicitly deleted; it also takes no
  grid slot, so a manual snapshot never displaces a scheduled one;
* a snapshot stamped after ``now`` is kept: the clock moved back (or the snapshot came from a
  host whose clock runs ahead), and deleting on a skewed clock is how data gets lost. Such a
  snapshot takes no grid slot either, so it cannot push out the real newest of a bucket; once
  the clock passes it, it is judged like any other.

Everything here is pure: ``now_ns`` comes from the caller (the daemon reads the clock once per
pass), so tests can simulate months of schedule in milliseconds and the plan for a given
snapshot list and time is always the same. Times must lie in years 1 to 9999 (any int64 of
ns does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

from cdp.config import SnapshotGrid
from cdp.when import format_time_ns

__all__ = [
    "SCHEDULED",
    "PlanEntry",
    "RetentionPlan",
    "SnapshotInfo",
    "plan_retention",
    "scheduled_due",
    "scheduled_name",
]

SCHEDULED: Final = "scheduled"
"""The ``kind`` of snapshots the grid takes and prunes; every other kind is left alone."""

_HOUR_NS: Final = 3600 * 10**9
_DAY_NS: Final = 24 * _HOUR_NS
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_Period: TypeAlias = Literal["hour", "day", "week", "month"]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What the planner needs to know of one snapshot (a view of ``journal.types.Snapshot``).

    ``ts_ns`` is the snapshot's point in time (ns since the epoch, UTC), ``locked_until`` ns
    since the epoch (0: not locked). Only ``kind == "scheduled"`` is pruned by the grid.
    """

    name: str
    ts_ns: int
    kind: str
    locked_until: int


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """The verdict on one snapshot; ``reason`` is for people (logs, ``--dry-run`` output)."""

    name: str
    action: Literal["keep", "delete"]
    reason: str


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """One entry per input snapshot, in input order, so output lines up with the listing."""

    entries: tuple[PlanEntry, ...]

    def deletes(self) -> list[str]:
        """Names to delete, in input order."""
        return [e.name for e in self.entries if e.action == "delete"]

    def keeps(self) -> list[str]:
        """Names to keep, in input order."""
        return [e.name for e in self.entries if e.action == "keep"]


def scheduled_due(snapshots: Sequence[SnapshotInfo], grid: SnapshotGrid, now_ns: int) -> bool:
    """Whether a scheduled snapshot should be taken now.

    True when some period is enabled and the current bucket of the finest enabled one (hour if
    ``hourly``, else day, else ISO week, else month) holds no scheduled snapshot yet. Asking
    "is this bucket still empty" rather than "has an interval passed since the last one" makes
    the schedule self-aligning: after a restart or a missed pass the next snapshot lands in
    the bucket the grid will look at, and one taken late in a bucket is never followed by a
    second one early in the next bucket that the grid would delete straight away anyway.
    """
    periods = _enabled_periods(grid)
    if not periods:
        return False
    period = periods[0][0]
    current = _bucket(period, now_ns)
    return not any(s.kind == SCHEDULED and _bucket(period, s.ts_ns) == current for s in snapshots)


def scheduled_name(now_ns: int) -> str:
    """The name of a scheduled snapshot taken at ``now_ns``: ``auto-20261201T1500Z``.

    UTC to the minute: names sort by time, read the same on every host, and are valid snapshot
    names (letters, digits, '-'; 19 characters). At most one scheduled snapshot per bucket, and
    the finest bucket is an hour, so the minute never collides.
    """
    dt = _EPOCH + timedelta(seconds=now_ns // 10**9)
    return f"auto-{dt.year:04d}{dt.month:02d}{dt.day:02d}T{dt.hour:02d}{dt.minute:02d}Z"


def plan_retention(
    snapshots: Sequence[SnapshotInfo], grid: SnapshotGrid, now_ns: int
) -> RetentionPlan:
    """Decide, for every snapshot, whether the grid keeps it; nothing is deleted here.

    A scheduled snapshot is kept when it is the newest (ties broken by name) of one of the N
    most recent buckets of some enabled period; the reason names every such bucket. With all
    periods 0, every scheduled snapshot that no override keeps is deleted. Applying the plan
    and planning again at the same ``now_ns`` deletes nothing more.

    Raises:
        ValueError: two snapshots share a name (a plan by name would be ambiguous), or a grid
            count is negative (config validation refuses both, so this is a caller bug).
    """
    seen: set[str] = set()
    for s in snapshots:
        if s.name in seen:
            raise ValueError(f"two snapshots are named {s.name!r}")
        seen.add(s.name)

    periods = _enabled_periods(grid)
    # Grid candidates: scheduled and not after now (see the module docstring on skew). Locked
    # ones compete too: a locked snapshot is still the newest of its bucket, and skipping it
    # would keep an extra, older one.
    candidates = [s for s in snapshots if s.kind == SCHEDULED and s.ts_ns <= now_ns]
    kept_for: dict[str, list[str]] = {}
    for period, count in periods:
        current = _bucket(period, now_ns)
        newest: dict[int, SnapshotInfo] = {}
        for s in candidates:
            b = _bucket(period, s.ts_ns)
            if b <= current - count:
                continue
            best = newest.get(b)
            if best is None or (s.ts_ns, s.name) > (best.ts_ns, best.name):
                newest[b] = s
        for b, s in sorted(newest.items()):
            kept_for.setdefault(s.name, []).append(f"{period} {_label(period, b)}")

    entries: list[PlanEntry] = []
    for s in snapshots:
        buckets = kept_for.get(s.name)
        grid_reason = "newest of " + ", ".join(buckets) if buckets else None
        if s.locked_until > now_ns:
            reason = f"locked until {format_time_ns(s.locked_until)}"
            if grid_reason:
                reason += f"; also {grid_reason}"
            entries.append(PlanEntry(s.name, "keep", reason))
        elif s.kind != SCHEDULED:
            entries.append(PlanEntry(s.name, "keep", f"{s.kind}: kept until deleted"))
        elif s.ts_ns > now_ns:
            entries.append(
                PlanEntry(
                    s.name,
                    "keep",
                    f"taken at {format_time_ns(s.ts_ns)}, after now "
                    f"({format_time_ns(now_ns)}): clock skew, kept",
                )
            )
        elif grid_reason:
            entries.append(PlanEntry(s.name, "keep", grid_reason))
        elif not periods:
            entries.append(PlanEntry(s.name, "delete", "outside the grid (all periods are 0)"))
        else:
            entries.append(PlanEntry(s.name, "delete", "outside the grid"))
    return RetentionPlan(tuple(entries))


def _enabled_periods(grid: SnapshotGrid) -> list[tuple[_Period, int]]:
    """(period, count) for each period with a count above 0, finest first."""
    counts: list[tuple[_Period, int]] = [
        ("hour", grid.hourly),
        ("day", grid.daily),
        ("week", grid.weekly),
        ("month", grid.monthly),
    ]
    for period, count in counts:
        if count < 0:
            raise ValueError(f"snapshot grid: {period} count {count} is negative")
    return [(p, n) for p, n in counts if n > 0]


def _bucket(period: _Period, t_ns: int) -> int:
    """A number for the bucket of ``period`` holding ``t_ns``; consecutive buckets differ by 1.

    Consecutive numbering turns "the N most recent buckets" into a plain range, with no
    calendar walking. Floor division keeps times before 1970 in the right bucket.
    """
    if period == "hour":
        return t_ns // _HOUR_NS
    day = t_ns // _DAY_NS
    if period == "day":
        return day
    if period == "week":
        # 1970-01-01 was a Thursday: shifting by 3 days puts every Monday on a multiple of 7.
        return (day + 3) // 7
    date = _EPOCH + timedelta(days=day)
    return date.year * 12 + date.month - 1


def _label(period: _Period, bucket: int) -> str:
    """The bucket as people write it: 2026-12-01T15, 2026-12-01, 2026-W49, 2026-12."""
    if period == "hour":
        dt = _EPOCH + timedelta(hours=bucket)
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}"
    if period == "day":
        dt = _EPOCH + timedelta(days=bucket)
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    if period == "week":
        monday = _EPOCH + timedelta(days=bucket * 7 - 3)
        iso = monday.isocalendar()
        return f"{iso.year:04d}-W{iso.week:02d}"
    year, month0 = divmod(bucket, 12)
    return f"{year:04d}-{month0 + 1:02d}"
