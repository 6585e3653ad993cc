"""How the daemon's processes run Python's cyclic garbage collector.

Why a policy at all: a journal keeps about three Python objects per write in memory (the
version map's extents, the records of hot segments), so after a few hundred thousand 4 KiB
writes the daemon holds a million tracked objects. CPython's collector runs a full
(generation 2) collection whenever the survivors have grown by a quarter, and a full
collection walks every tracked object: at a million objects that stalled the event loop,
which is every guest's I/O, for 137-198 ms, and it grows with the journal window. The young
collections that promote those objects cost CPU on top. `bench/gc_cost.py` measures both:
15.8 µs of CPU per 4 KiB ``write_many`` record with the defaults, 14.2 with this policy,
longest pause 179 ms against 12 ms (docs/benchmarks.md).

Those objects never form reference cycles (refcounting frees them), so walking them finds
nothing. The policy, after Instagram's use of ``gc.freeze``:

* a larger young generation (``young`` allocations between collections): 17 collections
  instead of 1,316 over 300,000 writes;
* every ``freeze_every_s`` the young generations are collected (what was allocated since
  the last freeze: a few milliseconds) and what survives moves to the permanent generation
  (``gc.freeze()``, a constant-time list splice), so later collections walk only what was
  allocated since and no pause grows with the journal;
* the price: an object that was frozen and later becomes part of a garbage cycle is not
  collected until it is thawed. When no writes or reads were seen for ``thaw_idle_s`` and
  the last thaw is ``thaw_every_s`` old, everything is unfrozen, collected once in full and
  frozen again, a pause where no guest was seen working; under constant load that happens
  after ``thaw_max_s`` anyway, logged as a warning with the pause it took.
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
    freeze_every_s: float = 0.25
    thaw_idle_s: float = 30.0
    thaw_every_s: float = 600.0
    thaw_max_s: float = 6 * 3600.0
    collector: Collector = field(default=gc)
    clock: Callable[[], float] = time.monotonic
    thaws: int = field(default=0, init=False)
    thaws_under_load: int = field(default=0, init=False)  # at thaw_max_s, guests writing
    last_thaw_at: float | None = field(default=None, init=False)  # on ``clock``
    last_thaw_found: int = field(default=0, init=False)  # what the last full pass freed
    last_thaw_ms: float = field(default=0.0, init=False)
    _frozen_at: float = field(default=0.0, init=False, repr=False)
    _thawed_at: float = field(default=0.0, init=False, repr=False)
    _activity: int | None = field(default=None, init=False, repr=False)
    _active_at: float = field(default=0.0, init=False, repr=False)

    def install(self) -> None:
        """Set the thresholds and freeze what the process built while starting."""
        self.collector.set_threshold(self.young, 20, 10)
        now = self.clock()
        self._frozen_at = self._thawed_at = self._active_at = now
        self.collector.freeze()

    def tick(self, activity: int) -> None:
        """Call about every ``freeze_every_s``; ``activity`` is a count that grows with
        guest or replica I/O (it only has to change while the process is busy)."""
        now = self.clock()
        if activity != self._activity:
            self._activity, self._active_at = activity, now
        idle = now - self._active_at >= self.thaw_idle_s
        since = now - self._thawed_at
        if (idle and since >= self.thaw_every_s) or since >= self.thaw_max_s:
            self._thaw(now, under_load=not idle)
        elif now - self._frozen_at >= self.freeze_every_s:
            self.collector.collect(1)  # cycles made since the last freeze are freed first
            self.collector.freeze()
            self._frozen_at = now

    def _thaw(self, now: float, *, under_load: bool) -> None:
        frozen = self.collector.get_freeze_count()
        t0 = time.perf_counter()
        self.collector.unfreeze()
        found = self.collector.collect()
        self.collector.freeze()
        self.last_thaw_ms = (time.perf_counter() - t0) * 1e3
        self.last_thaw_found, self.thaws = found, self.thaws + 1
        self.thaws_under_load += under_load
        self._thawed_at = self._frozen_at = self.last_thaw_at = now
        log.log(
            logging.WARNING if under_load else logging.INFO,
            "full garbage collection" + (" under load" if under_load else ""),
            extra={"objects": frozen, "freed": found, "pause_ms": round(self.last_thaw_ms, 1)},
        )

    def status(self) -> dict[str, object]:
        """For ``GET /v1/status``: a full pass under load pauses guest I/O, so an admin
        who sees ``thaws_under_load`` grow, or a long ``last_thaw_ms``, knows why I/O
        stalled then (each thaw is also logged)."""
        age = None if self.last_thaw_at is None else round(self.clock() - self.last_thaw_at, 1)
        return {
            "frozen_objects": self.collector.get_freeze_count(),
            "thaws": self.thaws,
            "thaws_under_load": self.thaws_under_load,
            "last_thaw_age_s": age,
            "last_thaw_ms": round(self.last_thaw_ms, 1),
            "last_thaw_freed": self.last_thaw_found,
        }

    async def run(self, stop: asyncio.Event, activity: Callable[[], int]) -> None:
        """``tick`` every ``freeze_every_s`` until ``stop`` (a task of the service)."""
        while not stop.is_set():
            try:
                self.tick(activity())
            except Exception:  # housekeeping never takes the service down
                log.exception("garbage collector policy failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.freeze_every_s)
