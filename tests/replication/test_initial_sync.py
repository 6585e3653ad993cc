"""A replica added after the primary folded history starts from the primary's base."""

from __future__ import annotations

import asyncio
import random

from journal import Journal
from replicator.sender import Sender

from .conftest import Site, random_writes, running, same_at, target, until


async def test_seed_from_base_then_stream(primary: Journal, dr: Site) -> None:
    rng = random.Random(3)
    await asyncio.to_thread(random_writes, primary, rng, 200)
    primary.write("vm1-disk0", 0, b"\x07" * (1 << 20))
    await asyncio.to_thread(primary.seal_pending, 100)
    rep = await asyncio.to_thread(primary.apply_retention, keep_ns=0)
    assert rep.folded_segments > 0
    base = int(primary.window().first_seq)
    assert base > 0
    s = Sender(target(dr.url), "g1", lambda: primary)
    async with running(s):
        await until(lambda: s.acked_seq >= primary.window().last_seq, "seeded and caught up")
        cp = await asyncio.to_thread(primary.checkpoint, "after-seed")
        await asyncio.to_thread(random_writes, primary, rng, 30)
        await until(lambda: s.acked_seq >= primary.window().last_seq, "streaming")
    rj = dr.receiver.groups["g1"].journal
    assert int(rj.window().first_seq) == base
    for seq in (base, cp, int(primary.window().last_seq)):
        await asyncio.to_thread(same_at, primary, rj, seq)
    # only allocated data travelled: the zero parts of the 12 MiB of volumes did not
    allocated = sum(len(c) for _, (_, c) in primary.base_state()[2].items()) * 65536
    assert s.stats.block_bytes_sent <= allocated + (4 << 20)
