"""A replica whose position the primary folded away resyncs the changed blocks only.

The primary's size cap releases the replica's hold while the DR site is down; when it comes
back, the sender compares chunk digests and ships only what differs, the DR site keeps its
older history, and the half-resynced seqs are never offered as recovery points.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from journal import Journal
from replicator.sender import Sender

from .conftest import (
    Site,
    random_writes,
    running,
    same_at,
    start_receiver,
    stop_receiver,
    target,
    until,
)


async def test_resync_after_the_size_cap_released_the_hold(
    primary: Journal, dr: Site, tokens: Path
) -> None:
    rng = random.Random(11)
    # a full first pass: the whole of both volumes written, so a full copy would be big
    primary.write("vm1-disk0", 0, rng.randbytes(8 << 20))
    primary.write("vm1-disk1", 0, rng.randbytes(4 << 20))
    cp = primary.checkpoint("replicated")
    s = Sender(target(dr.url), "g1", lambda: primary)
    async with running(s):
        last = primary.window().last_seq
        await until(lambda: s.acked_seq >= last, "first sync")
    port = int(dr.url.rsplit(":", 1)[1])
    state = dr.state_dir
    await stop_receiver(dr)  # the DR site goes away; the primary keeps writing
    r_seq = int(last)
    for _ in range(40):
        off = rng.randrange(0, (8 << 20) - 65536) // 4096 * 4096
        primary.write("vm1-disk0", off, rng.randbytes(4096))
    primary.zero("vm1-disk1", 0, 1 << 20)
    await asyncio.to_thread(random_writes, primary, rng, 50)
    primary.sync()
    # force everything sealed and folded: the size cap releases the replica hold
    primary.write("vm1-disk0", 0, b"x" * 4096)  # roll a segment so the older ones can fold
    await asyncio.to_thread(primary.seal_pending, 100)
    rep = await asyncio.to_thread(primary.apply_retention, keep_ns=0, max_bytes=1)
    assert rep.released_holds, "the size cap should have released the replica hold"
    assert primary.window().first_seq > r_seq, "the replica's position must be folded away"

    dr2 = await start_receiver(state, tokens, port)
    try:
        s2 = Sender(target(dr2.url), "g1", lambda: primary)
        async with running(s2):
            await until(lambda: s2.acked_seq >= primary.window().last_seq, "resync")
            await asyncio.to_thread(primary.write, "vm1-disk1", 8192, b"after" * 100)
            await until(lambda: s2.acked_seq >= primary.window().last_seq, "streaming after")
        rj = dr2.receiver.groups["g1"].journal
        await asyncio.to_thread(same_at, primary, rj, int(primary.window().last_seq))
        # the DR site still has its own history from before the resync
        assert rj.find_checkpoint("replicated") is not None
        assert rj.read("vm1-disk0", 0, 8 << 20, cp) == rj.read("vm1-disk0", 0, 8 << 20, r_seq)
        g = dr2.receiver.groups["g1"]
        assert g.meta is not None and len(g.meta.resyncs) == 1
        a, b = g.meta.resyncs[0]
        assert a == r_seq + 1
        assert g.not_a_point(a) is not None and g.not_a_point(b) is None
        assert g.not_a_point(r_seq) is None
        assert ("snapshot", "resync-pin") not in rj.holds  # released once complete
        # changed blocks only: no more than the chunks that differ, never a full copy
        cs = primary.opts.chunk_size
        changed = 0
        for vol in ("vm1-disk0", "vm1-disk1"):
            size = primary.volume_size(vol)
            old, new = rj.read(vol, 0, size, r_seq), primary.read(vol, 0, size, b)
            changed += sum(old[k : k + cs] != new[k : k + cs] for k in range(0, size, cs))
        assert 0 < s2.stats.block_bytes_sent <= changed * cs, (changed, s2.stats)
        assert changed * cs < 12 << 20
    finally:
        await stop_receiver(dr2)
