"""Snapshot schedule and retention grid: a simulated month, locks, other kinds, property tests.

The expected keep sets are computed by a small reference model written differently from the
module: calendar keys with ``datetime`` (``isocalendar`` for weeks, month walking by hand)
instead of the module's consecutive bucket numbers. No test reads the clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.config import SnapshotGrid
from cdp.snapshot_plan import (
    SCHEDULED,
    PlanEntry,
    RetentionPlan,
    SnapshotInfo,
    plan_retention,
    scheduled_due,
    scheduled_name,
)

SEC = 10**9
MIN = 60 * SEC
HOUR = 3600 * SEC
DAY = 24 * HOUR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SNAP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # journal's rule for names


def ns(dt: datetime) -> int:
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * SEC + delta.microseconds * 1000


def utc(ts_ns: int) -> datetime:
    return EPOCH + timedelta(microseconds=ts_ns // 1000)


def at(text: str) -> int:
    return ns(datetime.fromisoformat(text.replace("Z", "+00:00")))


def sched(name: str, ts_ns: int, locked_until: int = 0) -> SnapshotInfo:
    return SnapshotInfo(name, ts_ns, SCHEDULED, locked_until)


def by_name(plan: RetentionPlan) -> dict[str, PlanEntry]:
    return {e.name: e for e in plan.entries}


# --- the reference model -------------------------------------------------------------------


def _recent_hours(now: datetime, n: int) -> list[Hashable]:
    return [_hour_key(now - timedelta(hours=k)) for k in range(n)]


def _recent_days(now: datetime, n: int) -> list[Hashable]:
    return [now.date() - timedelta(days=k) for k in range(n)]


def _recent_weeks(now: datetime, n: int) -> list[Hashable]:
    return [_week_key(now - timedelta(weeks=k)) for k in range(n)]


def _recent_months(now: datetime, n: int) -> list[Hashable]:
    year, month = now.year, now.month
    keys: list[Hashable] = []
    for _ in range(n):
        keys.append((year, month))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return keys


def _hour_key(d: datetime) -> Hashable:
    return (d.year, d.month, d.day, d.hour)


def _week_key(d: datetime) -> Hashable:
    iso = d.isocalendar()
    return (iso.year, iso.week)


def _day_key(d: datetime) -> Hashable:
    return d.date()


def _month_key(d: datetime) -> Hashable:
    return (d.year, d.month)


PERIODS: dict[
    str,
    tuple[
        Callable[[SnapshotGrid], int],
        Callable[[datetime], Hashable],
        Callable[[datetime, int], list[Hashable]],
    ],
] = {
    "hour": (lambda g: g.hourly, _hour_key, _recent_hours),
    "day": (lambda g: g.daily, _day_key, _recent_days),
    "week": (lambda g: g.weekly, _week_key, _recent_weeks),
    "month": (lambda g: g.monthly, _month_key, _recent_months),
}


def model_grid_keeps(
    snaps: Sequence[SnapshotInfo], grid: SnapshotGrid, now_ns: int
) -> dict[str, set[str]]:
    """period -> names the grid alone keeps (newest scheduled, not in the future, per bucket)."""
    now = utc(now_ns)
    out: dict[str, set[str]] = {}
    candidates = [s for s in snaps if s.kind == SCHEDULED and s.ts_ns <= now_ns]
    for period, (count_of, key, recent) in PERIODS.items():
        kept: set[str] = set()
        for bucket in recent(now, count_of(grid)):
            members = [s for s in candidates if key(utc(s.ts_ns)) == bucket]
            if members:
                kept.add(max(members, key=lambda s: (s.ts_ns, s.name)).name)
        out[period] = kept
    return out


def model_keeps(snaps: Sequence[SnapshotInfo], grid: SnapshotGrid, now_ns: int) -> set[str]:
    overrides = {
        s.name for s in snaps if s.locked_until > now_ns or s.kind != SCHEDULED or s.ts_ns > now_ns
    }
    return overrides.union(*model_grid_keeps(snaps, grid, now_ns).values())


# --- (1) a simulated month ------------------------------------------------------------------

START = datetime(2026, 11, 1, tzinfo=UTC)  # a Sunday: the last day of ISO week 2026-W44
END = datetime(2026, 12, 2, 9, tzinfo=UTC)  # a Wednesday, in ISO week 2026-W49
GRID = SnapshotGrid(hourly=24, daily=7, weekly=4, monthly=3, lock_ns=3 * DAY)


def test_simulated_month_keeps_exactly_the_grid_and_the_locked() -> None:
    snaps: list[SnapshotInfo] = []
    taken: list[SnapshotInfo] = []
    now = START
    while now <= END:  # every 30 minutes: due on the hour, not at half past
        now_ns = ns(now)
        due = scheduled_due(snaps, GRID, now_ns)
        assert due == (now.minute == 0), now
        if due:
            name = scheduled_name(now_ns)
            assert name == now.strftime("auto-%Y%m%dT%H%MZ")
            assert GRID.lock_ns is not None
            s = sched(name, now_ns, now_ns + GRID.lock_ns)
            snaps.append(s)
            taken.append(s)
        plan = plan_retention(snaps, GRID, now_ns)
        assert [e.name for e in plan.entries] == [s.name for s in snaps]
        deletes = set(plan.deletes())
        assert not deletes & {s.name for s in snaps if s.locked_until > now_ns}
        assert snaps[-1].name not in deletes
        snaps = [s for s in snaps if s.name not in deletes]
        now += timedelta(minutes=30)

    end_ns = ns(END)
    names = {s.name for s in snaps}
    assert len(taken) == 31 * 24 + 10  # Nov 1 00:00 .. Dec 2 09:00, hourly
    # Nothing deleted along the way is wanted at the end: the model on *all* snapshots taken
    # gives exactly the survivors.
    assert names == model_keeps(taken, GRID, end_ns)

    # The same, worked out by hand. Locked: the 72 taken after Nov 29 09:00 (3 days back),
    # which include the 24 hourly ones and the newest of Dec 2, Dec 1, Nov 30, Nov 29, of
    # weeks W49 and W48, and of December and November. Besides those the grid keeps the days
    # Nov 26..28 and weeks W47 (ends Nov 22) and W46 (ends Nov 15). October is in the monthly
    # window but empty, and W44/W45 and Nov 1..25 are outside every window.
    locked = {s.name for s in taken if s.ts_ns > end_ns - 3 * DAY}
    assert len(locked) == 72
    assert names - locked == {
        "auto-20261126T2300Z",
        "auto-20261127T2300Z",
        "auto-20261128T2300Z",
        "auto-20261122T2300Z",
        "auto-20261115T2300Z",
    }
    assert len(names) == 77
    assert "auto-20261101T0000Z" not in names
    assert {"auto-20261130T2300Z", "auto-20261129T2300Z", "auto-20261202T0900Z"} <= names

    # Counts per period, with overlaps: every period gets its number of buckets, except that
    # one of the 3 months (October) has no snapshot.
    per_period = model_grid_keeps(snaps, GRID, end_ns)
    assert {p: len(v) for p, v in per_period.items()} == {
        "hour": 24,
        "day": 7,
        "week": 4,
        "month": 2,
    }
    assert per_period["month"] == {"auto-20261202T0900Z", "auto-20261130T2300Z"}
    final = plan_retention(snaps, GRID, end_ns)
    assert final.deletes() == []
    reasons = [e.reason for e in final.entries]
    assert sum("hour 2026-" in r for r in reasons) == 24
    assert sum("day 2026-" in r for r in reasons) == 7
    assert sum("week 2026-W" in r for r in reasons) == 4
    assert sum("month 2026-" in r for r in reasons) == 2
    newest = by_name(final)["auto-20261202T0900Z"].reason
    assert newest == (
        "locked until 2026-12-05T09:00:00Z; also newest of hour 2026-12-02T09, "
        "day 2026-12-02, week 2026-W49, month 2026-12"
    )
    assert by_name(final)["auto-20261115T2300Z"].reason == "newest of week 2026-W46"


def test_simulation_without_lock_keeps_only_the_grid() -> None:
    grid = SnapshotGrid(hourly=3, daily=2, weekly=0, monthly=1)
    snaps: list[SnapshotInfo] = []
    taken: list[SnapshotInfo] = []
    now = START
    for _ in range(5 * 24):
        if scheduled_due(snaps, grid, ns(now)):
            s = sched(scheduled_name(ns(now)), ns(now))
            snaps.append(s)
            taken.append(s)
        plan = plan_retention(snaps, grid, ns(now))
        snaps = [s for s in snaps if s.name not in set(plan.deletes())]
        now += timedelta(hours=1)
    last = ns(now - timedelta(hours=1))
    assert {s.name for s in snaps} == model_keeps(taken, grid, last)
    assert [s.name for s in snaps] == [
        "auto-20261104T2300Z",  # newest of Nov 4 (and nothing else)
        "auto-20261105T2100Z",
        "auto-20261105T2200Z",
        "auto-20261105T2300Z",  # also newest of Nov 5 and of November
    ]


# --- (2) locks ------------------------------------------------------------------------------


def test_locked_snapshot_survives_until_the_lock_expires() -> None:
    grid = SnapshotGrid(hourly=1)
    lock_end = at("2026-11-01T13:00:00Z")
    snaps = [
        sched("a", at("2026-11-01T10:00:00Z"), lock_end),
        sched("b", at("2026-11-01T11:00:00Z")),
        sched("c", at("2026-11-01T12:00:00Z")),
    ]
    t = at("2026-11-01T12:00:00Z")
    while t < lock_end:
        plan = plan_retention(snaps, grid, t)
        assert plan.keeps() == ["a", "c"]
        assert plan.deletes() == ["b"]
        assert by_name(plan)["a"].reason == "locked until 2026-11-01T13:00:00Z"
        assert by_name(plan)["b"].reason == "outside the grid"
        t += 5 * MIN
    plan = plan_retention(snaps, grid, lock_end)  # locked_until == now: no longer locked
    assert plan.deletes() == ["a", "b", "c"]  # and hour 13 has no snapshot yet
    plan = plan_retention(snaps, grid, lock_end - 1)
    assert plan.deletes() == ["b"]


def test_lock_beats_an_all_zero_grid_and_the_reason_also_names_the_grid() -> None:
    lock_end = at("2026-12-15T00:00:00Z")
    now = at("2026-12-01T15:30:00Z")
    snaps = [sched("x", at("2026-12-01T15:00:00Z"), lock_end)]
    plan = plan_retention(snaps, SnapshotGrid(), now)
    assert plan.entries == (PlanEntry("x", "keep", "locked until 2026-12-15T00:00:00Z"),)
    plan = plan_retention(snaps, SnapshotGrid(hourly=1), now)
    assert plan.entries[0].reason == (
        "locked until 2026-12-15T00:00:00Z; also newest of hour 2026-12-01T15"
    )
    assert plan_retention(snaps, SnapshotGrid(), lock_end).deletes() == ["x"]


def test_locked_snapshot_still_takes_its_grid_slot() -> None:
    # "new" is locked and the newest of the hour; "old" must not be kept in its place.
    now = at("2026-12-01T15:59:00Z")
    snaps = [
        sched("old", at("2026-12-01T15:00:00Z")),
        sched("new", at("2026-12-01T15:30:00Z"), now + HOUR),
    ]
    assert plan_retention(snaps, SnapshotGrid(hourly=1), now).deletes() == ["old"]


# --- (3) other kinds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid",
    [SnapshotGrid(), SnapshotGrid(hourly=1), SnapshotGrid(hourly=24, daily=7, monthly=12)],
)
def test_manual_and_anomaly_snapshots_are_never_deleted(grid: SnapshotGrid) -> None:
    now = at("2026-12-01T15:45:00Z")
    snaps = [
        SnapshotInfo("before-upgrade", at("2019-03-01T00:00:00Z"), "manual", 0),
        sched("auto-20261201T1500Z", at("2026-12-01T15:00:00Z")),
        SnapshotInfo("anomaly-1", at("2026-12-01T15:40:00Z"), "anomaly", 0),  # newer, same hour
        SnapshotInfo("weird", at("2030-01-01T00:00:00Z"), "manual", 0),
    ]
    plan = plan_retention(snaps, grid, now)
    entries = by_name(plan)
    assert entries["before-upgrade"] == PlanEntry(
        "before-upgrade", "keep", "manual: kept until deleted"
    )
    assert entries["anomaly-1"].reason == "anomaly: kept until deleted"
    assert entries["weird"].action == "keep"
    # an anomaly snapshot takes no grid slot: the scheduled one stays the newest of its hour
    expected = "keep" if grid.hourly else "delete"
    assert entries["auto-20261201T1500Z"].action == expected
    # ... and does not satisfy the schedule
    assert scheduled_due(snaps[:1] + snaps[2:], grid, now) == (grid != SnapshotGrid())


# --- (4) all periods zero -------------------------------------------------------------------


def test_all_zero_grid_deletes_every_unlocked_scheduled_snapshot() -> None:
    grid = SnapshotGrid(lock_ns=DAY)  # a lock period alone enables nothing
    now = at("2026-12-01T15:00:00Z")
    snaps = [
        sched("s1", now - 40 * DAY),
        sched("s2", now - HOUR),
        sched("s3", now),
        sched("locked", now - 2 * HOUR, now + 1),
        SnapshotInfo("m", now - DAY, "manual", 0),
        sched("future", now + MIN),
    ]
    for t in (now - 2 * HOUR, now, now + 30 * MIN):
        assert not scheduled_due(snaps, grid, t)
        assert not scheduled_due([], grid, t)
    plan = plan_retention(snaps, grid, now)
    assert plan.deletes() == ["s1", "s2", "s3"]
    assert plan.keeps() == ["locked", "m", "future"]
    assert by_name(plan)["s1"].reason == "outside the grid (all periods are 0)"
    assert by_name(plan)["future"].reason == (
        "taken at 2026-12-01T15:01:00Z, after now (2026-12-01T15:00:00Z): clock skew, kept"
    )
    assert plan_retention([], grid, now) == RetentionPlan(())


# --- schedule, names, buckets, determinism --------------------------------------------------


def test_scheduled_name_is_a_valid_snapshot_name_at_minute_precision() -> None:
    assert scheduled_name(at("2026-12-01T15:00:00Z")) == "auto-20261201T1500Z"
    assert scheduled_name(at("2026-12-01T15:07:59.999999999Z")) == "auto-20261201T1507Z"
    assert scheduled_name(0) == "auto-19700101T0000Z"
    for t in (0, at("2026-12-01T15:07:00Z"), 2**63 - 1):
        assert SNAP_NAME_RE.fullmatch(scheduled_name(t))


@pytest.mark.parametrize(
    ("grid", "taken", "now", "due"),
    [
        # finest enabled period is the hour
        (SnapshotGrid(hourly=1, daily=5), "2026-12-01T15:00:00Z", "2026-12-01T15:59:59Z", False),
        (SnapshotGrid(hourly=1, daily=5), "2026-12-01T15:59:59Z", "2026-12-01T16:00:00Z", True),
        # day
        (SnapshotGrid(daily=5, weekly=1), "2026-12-01T00:00:00Z", "2026-12-01T23:59:00Z", False),
        (SnapshotGrid(daily=5, weekly=1), "2026-12-01T23:59:00Z", "2026-12-02T00:00:00Z", True),
        # ISO week: Monday 2026-11-30 .. Sunday 2026-12-06
        (SnapshotGrid(weekly=2), "2026-11-30T00:00:00Z", "2026-12-06T23:59:00Z", False),
        (SnapshotGrid(weekly=2), "2026-11-29T23:59:00Z", "2026-11-30T00:00:00Z", True),
        # month
        (SnapshotGrid(monthly=1), "2026-12-01T00:00:00Z", "2026-12-31T23:59:00Z", False),
        (SnapshotGrid(monthly=1), "2026-12-31T23:59:00Z", "2027-01-01T00:00:00Z", True),
    ],
)
def test_scheduled_due_looks_at_the_current_bucket_of_the_finest_period(
    grid: SnapshotGrid, taken: str, now: str, due: bool
) -> None:
    snaps = [sched("s", at(taken))]
    assert scheduled_due(snaps, grid, at(now)) == due
    assert scheduled_due([], grid, at(now))
    # a manual snapshot in the bucket does not count
    assert scheduled_due([SnapshotInfo("m", at(now), "manual", 0)], grid, at(now))


def test_week_and_month_labels_and_boundaries() -> None:
    # 2027-01-01 is a Friday in ISO week 2026-W53; Monday 2027-01-04 starts 2027-W01.
    grid = SnapshotGrid(weekly=2, monthly=2)
    snaps = [
        sched("dec", at("2026-12-28T00:00:00Z")),  # Monday of W53, December
        sched("jan", at("2027-01-03T23:59:00Z")),  # Sunday of W53, January
        sched("w01", at("2027-01-04T00:00:00Z")),
    ]
    plan = plan_retention(snaps, grid, at("2027-01-05T12:00:00Z"))
    assert [(e.name, e.reason) for e in plan.entries] == [
        ("dec", "newest of month 2026-12"),
        ("jan", "newest of week 2026-W53"),
        ("w01", "newest of week 2027-W01, month 2027-01"),
    ]


def test_ties_in_time_are_broken_by_name_whatever_the_input_order() -> None:
    t = at("2026-12-01T15:00:00Z")
    grid = SnapshotGrid(hourly=1)
    for order in (["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]):
        plan = plan_retention([sched(n, t) for n in order], grid, t)
        assert plan.keeps() == ["c"]
        assert [e.name for e in plan.entries] == order


def test_future_snapshot_takes_no_grid_slot() -> None:
    now = at("2026-12-01T15:30:00Z")
    snaps = [sched("real", at("2026-12-01T15:00:00Z")), sched("skewed", now + 10 * MIN)]
    plan = plan_retention(snaps, SnapshotGrid(hourly=1), now)
    assert plan.deletes() == []
    assert by_name(plan)["real"].reason == "newest of hour 2026-12-01T15"
    assert "clock skew" in by_name(plan)["skewed"].reason


def test_duplicate_names_and_negative_counts_are_refused() -> None:
    t = at("2026-12-01T15:00:00Z")
    with pytest.raises(ValueError, match="two snapshots are named 'a'"):
        plan_retention([sched("a", t), sched("a", t - HOUR)], SnapshotGrid(hourly=1), t)
    with pytest.raises(ValueError, match="negative"):
        plan_retention([], SnapshotGrid(daily=-1), t)


# --- (5) properties -------------------------------------------------------------------------

NOW_BASE = at("2026-12-01T00:00:00Z")

grids = st.builds(
    SnapshotGrid,
    hourly=st.integers(0, 30),
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 4),
)


@st.composite
def snapshot_sets(draw: st.DrawFn) -> tuple[list[SnapshotInfo], int]:
    now = NOW_BASE + draw(st.integers(0, 40 * DAY))
    # mostly whole hours and minutes so ties and bucket edges are common, sometimes any ns
    offset = st.one_of(
        st.integers(-200 * 24, 24).map(lambda h: h * HOUR),
        st.integers(-200 * 24 * 60, 60).map(lambda m: m * MIN),
        st.integers(-200 * DAY, DAY),
    )
    lock = st.one_of(st.just(0), st.integers(-10 * DAY, 10 * DAY).map(lambda d: now + d))
    kind = st.sampled_from([SCHEDULED, SCHEDULED, SCHEDULED, "manual", "anomaly"])
    n = draw(st.integers(0, 40))
    snaps = [SnapshotInfo(f"s{i}", now + draw(offset), draw(kind), draw(lock)) for i in range(n)]
    draw(st.randoms()).shuffle(snaps)
    return snaps, now


@settings(max_examples=200, deadline=None)
@given(snapshot_sets(), grids)
def test_plan_properties(case: tuple[list[SnapshotInfo], int], grid: SnapshotGrid) -> None:
    snaps, now = case
    plan = plan_retention(snaps, grid, now)

    # one entry per snapshot, in input order; keeps and deletes partition them
    assert [e.name for e in plan.entries] == [s.name for s in snaps]
    assert sorted(plan.keeps() + plan.deletes()) == sorted(s.name for s in snaps)

    protected = {s.name for s in snaps if s.locked_until > now or s.kind != SCHEDULED}
    assert not set(plan.deletes()) & protected
    assert not set(plan.deletes()) & {s.name for s in snaps if s.ts_ns > now}

    # agrees with the datetime reference model
    assert set(plan.keeps()) == model_keeps(snaps, grid, now)

    # the grid keeps at most one snapshot per bucket
    by_grid = [e for e in plan.entries if "newest of" in e.reason]
    assert len(by_grid) <= grid.hourly + grid.daily + grid.weekly + grid.monthly

    # idempotent: after applying the plan, planning again deletes nothing and says the same
    remaining = [s for s in snaps if s.name not in set(plan.deletes())]
    again = plan_retention(remaining, grid, now)
    assert again.deletes() == []
    assert again.entries == tuple(e for e in plan.entries if e.action == "keep")

    assert scheduled_due(snaps, grid, now) == scheduled_due(remaining, grid, now)


@settings(max_examples=100, deadline=None)
@given(snapshot_sets(), grids)
def test_scheduled_due_agrees_with_the_model(
    case: tuple[list[SnapshotInfo], int], grid: SnapshotGrid
) -> None:
    snaps, now = case
    finest = [p for p, (count_of, _, _) in PERIODS.items() if count_of(grid) > 0]
    if not finest:
        assert not scheduled_due(snaps, grid, now)
        return
    key = PERIODS[finest[0]][1]
    current = key(utc(now))
    expected = not any(s.kind == SCHEDULED and key(utc(s.ts_ns)) == current for s in snaps)
    assert scheduled_due(snaps, grid, now) == expected


def test_reference_model_sanity() -> None:
    # the model's month walk crosses the year; its week keys are ISO
    now = datetime(2027, 1, 5, tzinfo=UTC)
    assert _recent_months(now, 3) == [(2027, 1), (2026, 12), (2026, 11)]
    assert _recent_weeks(now, 2) == [(2027, 1), (2026, 53)]
    assert _recent_days(now, 2) == [date(2027, 1, 5), date(2027, 1, 4)]
