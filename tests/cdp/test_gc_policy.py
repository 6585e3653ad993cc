"""The collector policy of the daemon's processes (cdp/gc_policy.py).

The schedule is checked against a recorder standing in for the ``gc`` module (the real one
is process-wide: driving it from the schedule tests would freeze pytest's own objects at
arbitrary moments). The last test uses the real collector, once, for the one promise that
matters beyond the schedule: a garbage cycle that was frozen is freed by the next thaw.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from cdp.gc_policy import GcPolicy


class Recorder:
    """Records what the policy asks of the collector."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threshold: tuple[int, ...] = ()

    def set_threshold(self, *t: int) -> None:
        self.threshold = t

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect{generation}")
        return 7

    def get_freeze_count(self) -> int:
        return 1000


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def policy(**kw: float) -> tuple[GcPolicy, Recorder, Clock]:
    rec, clock = Recorder(), Clock()
    p = GcPolicy(collector=rec, clock=clock, **kw)  # type: ignore[arg-type]
    return p, rec, clock


def test_install_raises_the_young_threshold_and_freezes_what_start_up_built() -> None:
    p, rec, _ = policy(young=12_345)
    p.install()
    assert rec.threshold == (12_345, 20, 10)
    assert rec.calls == ["freeze"]


def test_survivors_are_frozen_once_per_interval() -> None:
    p, rec, clock = policy(freeze_every_s=1.0)
    p.install()
    rec.calls.clear()
    for k in range(10):  # busy: activity grows at every tick
        clock.t += 0.25
        p.tick(k)
    assert rec.calls == ["collect1", "freeze"] * 2  # at +1.0 and +2.0 of the 2.5 s


def test_no_full_collection_while_writes_go_on_until_the_maximum() -> None:
    p, rec, clock = policy(freeze_every_s=1.0, thaw_idle_s=30, thaw_every_s=600, thaw_max_s=3600)
    p.install()
    for k in range(3599):
        clock.t += 1.0
        p.tick(k)
    assert "unfreeze" not in rec.calls  # an hour of writes: never a full pause
    clock.t += 1.0
    p.tick(3600)
    assert rec.calls[-3:] == ["unfreeze", "collect2", "freeze"]
    assert p.thaws == 1 and p.last_thaw_found == 7


def test_an_idle_process_is_collected_in_full_once_the_last_thaw_is_old() -> None:
    p, rec, clock = policy(freeze_every_s=1.0, thaw_idle_s=30, thaw_every_s=600, thaw_max_s=1e9)
    p.install()
    clock.t += 100
    p.tick(5)  # activity seen now
    clock.t += 29
    p.tick(5)
    assert "unfreeze" not in rec.calls  # idle 29 s, and the last thaw is recent anyway
    clock.t += 600
    p.tick(5)
    assert rec.calls[-3:] == ["unfreeze", "collect2", "freeze"]
    clock.t += 40
    p.tick(5)  # still idle, but it was just collected
    assert rec.calls.count("unfreeze") == 1


def test_a_write_resets_the_idle_clock() -> None:
    p, rec, clock = policy(freeze_every_s=1.0, thaw_idle_s=30, thaw_every_s=0, thaw_max_s=1e9)
    p.install()
    for k in range(100):  # a write every 20 s: never 30 s idle
        clock.t += 20
        p.tick(k)
    assert "unfreeze" not in rec.calls
    clock.t += 31
    p.tick(99)
    assert "unfreeze" in rec.calls


async def test_run_ticks_until_stopped() -> None:
    p, rec, _ = policy(freeze_every_s=0.01)
    p.clock = time.monotonic  # real time for the loop's waits
    p.install()
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop, lambda: 1))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert rec.calls.count("freeze") >= 3
    assert rec.calls.count("collect1") == rec.calls.count("freeze") - 1  # install: no collect


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def real_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("real_gc")
def test_a_frozen_garbage_cycle_is_freed_by_the_next_thaw() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: refcounting alone never frees it
    gone = weakref.ref(a)
    clock = Clock()
    p = GcPolicy(clock=clock, thaw_idle_s=1, thaw_every_s=1, thaw_max_s=1e9)
    p.install()  # the cycle is frozen with everything else
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: a full collection does not see it
    p.tick(0)
    clock.t += 2
    p.tick(0)  # idle 2 s, last thaw 2 s ago: thaw, collect, freeze again
    assert p.thaws == 1
    assert gone() is None
    assert p.last_thaw_found >= 2


@pytest.mark.usefixtures("real_gc")
def test_a_cycle_made_between_freezes_is_freed_before_the_next_freeze() -> None:
    clock = Clock()
    p = GcPolicy(clock=clock, freeze_every_s=1.0)
    p.install()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    clock.t += 1.0
    p.tick(1)  # the periodic freeze: young generations collected first
    assert gone() is None


def test_a_failing_tick_does_not_stop_the_task(caplog: pytest.LogCaptureFixture) -> None:
    p, _, _ = policy(freeze_every_s=0.01)
    p.clock = time.monotonic
    p.install()
    calls = 0

    def activity() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return calls

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(p.run(stop, activity))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(go())
    assert calls > 2
    assert "garbage collector policy failed" in caplog.text


def test_status_counts_thaws_and_those_under_load() -> None:
    p, _, clock = policy(freeze_every_s=1.0, thaw_idle_s=30, thaw_every_s=600, thaw_max_s=3600)
    p.install()
    assert p.status() == {
        "frozen_objects": 1000,
        "thaws": 0,
        "thaws_under_load": 0,
        "last_thaw_age_s": None,
        "last_thaw_ms": 0.0,
        "last_thaw_freed": 0,
    }
    for k in range(3600):  # an hour of writes: one thaw, under load
        clock.t += 1.0
        p.tick(k)
    clock.t += 700  # then idle: the next tick thaws again, not under load
    p.tick(3599)
    clock.t += 12.5
    st = p.status()
    assert (st["thaws"], st["thaws_under_load"]) == (2, 1)
    assert st["last_thaw_age_s"] == 12.5 and st["last_thaw_freed"] == 7
