"""Sender and receiver over real HTTP on loopback: every point reconstructs at the DR site."""

from __future__ import annotations

import asyncio
import random

from journal import Journal
from replicator.sender import Sender

from .conftest import Site, random_writes, running, same_at, target, until


async def test_stream_replicates_every_point(primary: Journal, dr: Site) -> None:
    rng = random.Random(1)
    cps = await asyncio.to_thread(random_writes, primary, rng, 300, checkpoint_every=50)
    await asyncio.to_thread(primary.seal_pending, 100)  # some records sealed, some hot
    await asyncio.to_thread(random_writes, primary, rng, 100)
    s = Sender(target(dr.url), "g1", lambda: primary)
    async with running(s):
        last = primary.window().last_seq
        await until(lambda: s.acked_seq >= last, "replica caught up")
        more = await asyncio.to_thread(random_writes, primary, rng, 100, checkpoint_every=30)
        last = primary.window().last_seq
        await until(lambda: s.acked_seq >= last, "replica caught up again")
    rj = dr.receiver.groups["g1"].journal
    assert rj.window().last_seq == primary.window().last_seq
    for seq in [*cps, *more, 1, 17, int(last) // 2, int(last)]:
        await asyncio.to_thread(same_at, primary, rj, seq)
    assert [c.name for c in rj.checkpoints()] == [c.name for c in primary.checkpoints()]
    st = s.status()
    assert st["blocks_deduped"] > 0
    assert st["lag_s"] == 0
