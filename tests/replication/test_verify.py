"""`verify` compares the replica's latest with the primary chunk by chunk, and names misses."""

from __future__ import annotations

import asyncio
import random

from journal import Journal, WriteRecord
from replicator.sender import Sender, verify_replica
from replicator.source import prepare

from .conftest import SMALL, Site, random_writes, running, target, until


async def test_verify_identical_then_names_the_diverged_chunk(primary: Journal, dr: Site) -> None:
    rng = random.Random(5)
    await asyncio.to_thread(random_writes, primary, rng, 120)
    s = Sender(target(dr.url), "g1", lambda: primary)
    async with running(s):
        last = primary.window().last_seq
        await until(lambda: s.acked_seq >= last, "replica caught up")
    rep = await verify_replica(target(dr.url), "g1", primary, "vm1-disk0")
    assert rep.ok and rep.seq == last and rep.chunks == (8 << 20) // SMALL.chunk_size

    # Make the replica diverge: the same seq holds other bytes at DR than at the primary.
    seq = primary.write("vm1-disk0", 3 * SMALL.chunk_size + 512, b"P" * 4096)
    forged = WriteRecord(
        seq, primary.ts_of(seq), "vm1-disk0", 3 * SMALL.chunk_size + 512, 4096, b"D" * 4096
    )
    p = prepare([forged], SMALL.chunk_size)
    rj = dr.receiver.groups["g1"].journal
    blocks = {k: bytes(v) for k, v in p.inline.items()}
    await asyncio.to_thread(rj.append_replicated, p.records, blocks)
    await asyncio.to_thread(rj.sync)
    rep = await verify_replica(target(dr.url), "g1", primary, "vm1-disk0")
    assert rep.seq == seq
    assert rep.mismatched == (3,)
    rep1 = await verify_replica(target(dr.url), "g1", primary, "vm1-disk1")
    assert rep1.ok
