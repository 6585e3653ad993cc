"""How the daemon's processes run Python's cyclic garbage collector.

Why a policy at all: a journal keeps about three Python objects per write in memory (the
version map's extents, the records of hot segments), so after a few hundred thousand 4 KiB
writes the daemon holds a million tracked objects. CPython's collector runs a full
(generation 2) collection whenever the survivors have grown by a quarter, and a full
collection walks every tracked object: at a million objects that is a 100-170 ms stall of
the event loop, which is every guest's I/O, and it grows with the journal window. The young
collections that promote those objects cost as much again. `bench/gc_cost.py` measures both:
26 µs of CPU per 4 KiB `write_many` record with the defaults, 15-16 µs with this policy.

Those objects never form reference cycles (refcounting frees them), so walking them finds
nothing. The policy, as Instagram's servers run it:

* a larger young generation (``young`` allocations between collections), so the young
  collections run a hundred times less often;
* every ``freeze_every_s`` what survived so far moves to the permanent generation
  (``gc.freeze()``, a constant-time list splice): later collections, full ones included,
  walk only what was allocated since, so no pause grows with the journal;
* the price: a frozen object that later becomes part of a garbage cycle is not collected
  until it is thawed. When the process has been idle (no guest or replica writes) for
  ``thaw_idle_s`` and the last thaw is ``thaw_every_s`` old, or at the latest after
  ``thaw_max_s``, everything is unfrozen, collected once in full and frozen again. That one
  pause falls where no guest is waiting, and the log says what it found and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class Collector(Protocol):
    """The part of the ``gc`` module the policy drives (tests pass a recorder)."""

    def set_threshold(
        self, threshold0: int, threshold1: int = ..., threshold2: int = ...
    ) -> None: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def collect(self, generation: int = ...) -> int: ...

    def get_freeze_count(self) -> int: ...


@dataclass(slots=True)
class GcPolicy:
    """One process's collector settings and its periodic freeze and thaw."""

    young: int = 50_000
    freeze_every_s: float = 1.0
    thaw_idle_s: float = 30.0
    thaw_every_s: float = 600.0
    thaw_max_s: float = 6 * 3600.0
    collector: Collector = field(default=gc)
    clock: Callable[[], float] = time.monotonic
    _frozen_at: float = 0.0
    _thawed_at: float = 0.0
    _activity: int | None = None
    _active_at: float = 0.0
    thaws: int = 0
    last_thaw_found: int = 0  # unreachable objects the last full collection freed
    last_thaw_ms: float = 0.0

    def install(self) -> None:
        """Set the thresholds and freeze what the process built while starting."""
        self.collector.set_threshold(self.young, 20, 10)
        now = self.clock()
        self._frozen_at = self._thawed_at = self._active_at = now
        self.collector.freeze()

    def tick(self, activity: int) -> None:
        """Call about every ``freeze_every_s``; ``activity`` is a count that grows with
        writes (it only has to change while the process is busy)."""
        now = self.clock()
        if activity != self._activity:
            self._activity, self._active_at = activity, now
        idle = now - self._active_at >= self.thaw_idle_s
        since = now - self._thawed_at
        if (idle and since >= self.thaw_every_s) or since >= self.thaw_max_s:
            self._thaw(now)
        elif now - self._frozen_at >= self.freeze_every_s:
            self.collector.freeze()
            self._frozen_at = now

    def _thaw(self, now: float) -> None:
        frozen = self.collector.get_freeze_count()
        t0 = time.perf_counter()
        self.collector.unfreeze()
        found = self.collector.collect()
        self.collector.freeze()
        self.last_thaw_ms = (time.perf_counter() - t0) * 1e3
        self.last_thaw_found, self.thaws = found, self.thaws + 1
        self._thawed_at = self._frozen_at = now
        log.info(
            "full garbage collection",
            extra={"objects": frozen, "freed": found, "pause_ms": round(self.last_thaw_ms, 1)},
        )

    async def run(self, stop: asyncio.Event, activity: Callable[[], int]) -> None:
        """``tick`` every ``freeze_every_s`` until ``stop`` (a task of the service)."""
        while not stop.is_set():
            self.tick(activity())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.freeze_every_s)
