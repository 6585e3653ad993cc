"""Time sources. Core logic never calls time.time() directly, so tests can step the clock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Returns wall-clock time in integer nanoseconds since the Unix epoch (UTC)."""

    def __call__(self) -> int: ...


def wall_clock() -> int:
    """The system's wall clock; may step backwards (NTP), which the journal records, not obeys."""
    return time.time_ns()


class ManualClock:
    """A clock that only moves when told to; for tests and simulations."""

    def __init__(self, start_ns: int = 1_700_000_000 * 10**9) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns

    def set(self, ns: int) -> None:
        self.now_ns = ns
