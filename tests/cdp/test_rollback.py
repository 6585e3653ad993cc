"""Rollback through a real Export and journal: many random points, then forward again."""

from __future__ import annotations

import random
from pathlib import Path

from cdp.daemon.rollback import apply_volume, mark, plan
from cdp.nbd.export import Export
from journal import Journal, JournalOptions

OPTS = JournalOptions(segment_size=512 * 1024, chunk_size=16 * 1024, pack_target=1 << 20)
SIZE = 2 << 20


def _image(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return data + bytes(SIZE - len(data))


async def test_rollback_to_random_points_and_forward_again(tmp_path: Path) -> None:
    rng = random.Random(13)
    j = Journal.open(str(tmp_path / "j"), options=OPTS)
    j.add_volume("v", SIZE)
    ex = Export("v", SIZE, str(tmp_path / "v.raw"), lambda: j, chunk_size=OPTS.chunk_size)
    ex.open()
    points = []
    for k in range(300):
        n = rng.choice([512, 4096, 40_000])
        off = rng.randrange(0, SIZE - n) // 512 * 512
        if rng.random() < 0.1:
            ex.zero(off, n, trim=True, no_hole=False)
        else:
            ex.write(off, rng.randbytes(n))
        ex.commit()
        if k % 20 == 0:
            points.append(int(j.window().last_seq))
        if k % 97 == 0:
            j.seal_pending(10)
    await ex.flush()
    latest = _image(tmp_path / "v.raw")
    assert latest == j.read("v", 0, SIZE)
    for seq in rng.sample(points, 6):
        want = j.read("v", 0, SIZE, seq)
        p = plan(j, "g", ["v"], seq, None)
        assert p.volumes[0].changed_bytes <= SIZE
        before = int(j.window().last_seq)
        pre = mark(j, f"pre-{seq}")
        apply_volume(j, p, p.volumes[0], ex)
        await ex.flush()
        assert _image(tmp_path / "v.raw") == want, f"image after rollback to {seq}"
        assert j.read("v", 0, SIZE) == want, "the rollback is journaled"
        assert j.read("v", 0, SIZE, before) == j.read("v", 0, SIZE, pre)  # history kept
        # forward again: roll back to the checkpoint taken just before
        back = plan(j, "g", ["v"], pre, None)
        apply_volume(j, back, back.volumes[0], ex)
        await ex.flush()
        assert _image(tmp_path / "v.raw") == j.read("v", 0, SIZE, pre)
    assert _image(tmp_path / "v.raw") == latest
    # a dry run is only a plan: nothing written
    last = int(j.window().last_seq)
    plan(j, "g", ["v"], points[0], None)
    assert int(j.window().last_seq) == last
    ex.close()
    j.close()


def test_plan_cost_follows_the_change(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), options=OPTS)
    j.add_volume("v", 1 << 40)  # a 1 TiB volume: planning must not walk it
    j.write("v", 0, b"a" * 4096)
    seq = int(j.window().last_seq)
    j.write("v", 5 * OPTS.chunk_size, b"b" * 4096)
    j.write("v", (1 << 40) - 4096, b"c" * 4096)
    p = plan(j, "g", ["v"], seq, None)
    assert p.volumes[0].chunks == [5, ((1 << 40) - 4096) // OPTS.chunk_size]
    j.close()
