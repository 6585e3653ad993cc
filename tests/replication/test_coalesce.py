"""`coalesce`: a block rewritten within the window ships once; checkpoints stay exact."""

from __future__ import annotations

import asyncio
import random

from journal import Journal
from replicator.sender import Sender

from .conftest import Site, running, same_at, target, until


def _hot_rewrites(j: Journal, rng: random.Random) -> list[int]:
    cps = []
    for round_ in range(3):
        for _ in range(60):  # the same 8 blocks, rewritten over and over
            j.write("vm1-disk0", rng.randrange(8) * 4096, rng.randbytes(4096))
        cps.append(j.checkpoint(f"round{round_}"))
    return cps


async def _ship(primary: Journal, dr: Site, coalesce_ns: int) -> Sender:
    s = Sender(target(dr.url, coalesce_ns=coalesce_ns), "g1", lambda: primary)
    async with running(s):
        await until(lambda: s.acked_seq >= primary.window().last_seq, "caught up")
    return s


async def test_coalesce_ships_last_versions_only(primary: Journal, dr: Site) -> None:
    cps = await asyncio.to_thread(_hot_rewrites, primary, random.Random(4))
    s = await _ship(primary, dr, coalesce_ns=2 * 10**9)
    rj = dr.receiver.groups["g1"].journal
    assert rj.window().last_seq == primary.window().last_seq
    for seq in cps:  # every checkpoint is exact at the DR site
        await asyncio.to_thread(same_at, primary, rj, seq)
    assert s.stats.coalesced_bytes > 0
    # 3 rounds x 8 blocks of last versions, not 180 writes
    assert s.stats.block_bytes_sent <= 3 * 8 * 4096, s.stats


async def test_without_coalesce_every_version_ships(primary: Journal, dr: Site) -> None:
    cps = await asyncio.to_thread(_hot_rewrites, primary, random.Random(4))
    s = await _ship(primary, dr, coalesce_ns=0)
    rj = dr.receiver.groups["g1"].journal
    for seq in [*cps, 5, 77, 150]:  # any point, not only checkpoints
        await asyncio.to_thread(same_at, primary, rj, seq)
    assert s.stats.coalesced_bytes == 0
    assert s.stats.block_bytes_sent >= 150 * 4096
