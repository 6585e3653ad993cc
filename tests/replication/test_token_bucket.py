"""The bandwidth cap holds over every 10 s window (simulated clock: no wall-clock asserts)."""

from __future__ import annotations

import random

import pytest

from replicator.sender import TokenBucket


@pytest.mark.parametrize("rate", [12_500_000, 1_000_000, 250_000])
def test_any_ten_second_window_stays_within_ten_percent(rate: int) -> None:
    rng = random.Random(rate)
    t = 0.0
    bucket = TokenBucket(rate, now=lambda: t)
    sends: list[tuple[float, int]] = []  # (time the bytes went out, bytes)
    while t < 120.0:
        n = rng.choice([300, 4096, 65_536, rate // 2, rate // 3])  # batches up to half a second
        t += bucket.delay(n)  # the sender sleeps that long, then sends
        sends.append((t, n))
        t += rng.random() * 0.01 if rng.random() < 0.9 else rng.random() * 3  # idle gaps
    worst = 0.0
    for i, (t0, _) in enumerate(sends):
        total = sum(n for (ts, n) in sends[i:] if ts < t0 + 10.0)
        worst = max(worst, total / 10.0)
    assert worst <= rate * 1.10, f"{worst / rate:.3f} x the cap over a 10 s window"
    # and it is a cap, not a brake: a saturated sender gets close to the rate
    busy = sum(n for ts, n in sends if ts < 120.0) / 120.0
    assert busy > rate * 0.5


def test_an_idle_link_does_not_bank_more_than_the_burst() -> None:
    t = 0.0
    bucket = TokenBucket(1_000_000, now=lambda: t)
    t = 1000.0  # a long idle period
    assert bucket.delay(int(bucket.burst)) == 0.0
    assert bucket.delay(1_000_000) == pytest.approx(1.0, rel=0.01)
