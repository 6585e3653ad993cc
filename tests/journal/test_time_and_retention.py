"""Journal time, holds, retention and the size cap."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from journal import Journal, JournalOptions, ManualClock, PointNotRetained
from journal.errors import NoSuchVolume
from tests.tmpfs import mounted_tmpfs

MS = 1_000_000
SMALL = JournalOptions(segment_size=32 * 1024, chunk_size=16 * 1024, pack_target=64 * 1024)


def _open(path: Path, clock: ManualClock, opts: JournalOptions = SMALL) -> Journal:
    return Journal.open(str(path), clock=clock, options=opts)


def test_clock_step_back_is_recorded_not_obeyed(tmp_path: Path) -> None:
    clock = ManualClock(1_000 * 10**9)
    j = _open(tmp_path, clock)
    j.add_volume("v", 1 << 20)
    s1 = j.write("v", 0, b"a" * 512)
    clock.advance(-3600 * 10**9)  # NTP steps the wall clock back an hour
    s2 = j.write("v", 0, b"b" * 512)
    clock.advance(10 * MS)
    s3 = j.write("v", 0, b"c" * 512)
    assert s1 < s2 < s3
    recs = {r.seq: r for r in j.records()}
    assert recs[s2].ts == recs[s1].ts  # journal time held, not moved back
    assert recs[s2].wall == 1_000 * 10**9 - 3600 * 10**9  # the step is on record
    assert recs[s1].wall is None
    # journal time stays put until the wall clock catches up again
    assert recs[s3].ts == recs[s1].ts
    clock.advance(2 * 3600 * 10**9)
    s4 = j.write("v", 0, b"d" * 512)
    t4 = next(r.ts for r in j.records(s4))
    assert t4 == clock()
    # --at T names the last seq whose journal time <= T
    assert j.seq_at_time(recs[s1].ts) == s3
    assert j.seq_at_time(t4 - 1) == s3
    assert j.seq_at_time(t4) == s4
    assert j.read("v", 0, 1, j.seq_at_time(recs[s1].ts)) == b"c"
    with pytest.raises(PointNotRetained):
        j.seq_at_time(recs[s1].ts - 1 - 3600 * 10**9)
    j.close()
    j = _open(tmp_path, clock)  # the same answers after a restart
    assert j.seq_at_time(recs[s1].ts) == s3
    j.close()


def test_unknown_volume_and_out_of_range_refused(tmp_path: Path) -> None:
    j = _open(tmp_path, ManualClock())
    j.add_volume("v", 8192)
    with pytest.raises(NoSuchVolume):
        j.write("w", 0, b"x")
    for off, n in ((-1, 1), (8192, 1), (8000, 500)):
        with pytest.raises(ValueError):
            j.write("v", off, b"x" * n)
    assert j.window().last_seq == 1  # nothing was appended
    with pytest.raises(PointNotRetained):
        j.read("v", 0, 1, 5)
    j.close()


def _fill(
    j: Journal, clock: ManualClock, rng: random.Random, n: int, size: int
) -> dict[int, bytes]:
    disk = bytearray(j.read("v", 0, size))
    images = {}
    for _ in range(n):
        clock.advance(MS)
        off = rng.randrange(0, size - 8192)
        data = rng.randbytes(rng.choice([512, 4096, 8192]))
        s = j.write("v", off, data)
        disk[off : off + len(data)] = data
        images[s] = bytes(disk)
    j.sync()
    j.seal_pending(1000)
    return images


def test_fold_preserves_retained_points_and_respects_holds(tmp_path: Path) -> None:
    clock = ManualClock()
    rng = random.Random(7)
    size = 256 * 1024
    j = _open(tmp_path, clock)
    j.add_volume("v", size)
    images = _fill(j, clock, rng, 300, size)
    seqs = sorted(images)
    hold_at = seqs[100]
    j.set_hold("snapshot", "nightly", hold_at)
    r = j.apply_retention(keep_ns=0, now_ns=clock() + 10**12)
    assert r.folded_segments > 0
    assert j.window().first_seq <= hold_at  # never folded past the hold
    for s in seqs:
        if s >= j.window().first_seq:
            assert j.read("v", 0, size, s) == images[s]
    j.release_hold("snapshot", "nightly")
    r2 = j.apply_retention(keep_ns=0, now_ns=clock() + 10**12)
    assert j.window().first_seq > hold_at
    assert r2.blocks_collected >= 0
    for s in seqs:
        if s >= j.window().first_seq:
            assert j.read("v", 0, size, s) == images[s]
    with pytest.raises(PointNotRetained):
        j.read("v", 0, 10, hold_at)
    j.close()
    j = _open(tmp_path, clock)  # base manifest and holds survive a restart
    assert j.read("v", 0, size) == images[seqs[-1]]
    j.close()


def test_size_cap_releases_oldest_replica_hold_visibly(tmp_path: Path) -> None:
    clock = ManualClock()
    rng = random.Random(3)
    size = 256 * 1024
    j = _open(tmp_path, clock)
    j.add_volume("v", size)
    images = _fill(j, clock, rng, 100, size)
    first = min(images)
    j.set_hold("replica", "dr1", first)
    images.update(_fill(j, clock, rng, 300, size))
    r = j.apply_retention(keep_ns=10**15, max_bytes=j.size_bytes() // 3)
    assert [h.name for h in r.released_holds] == ["dr1"]
    assert r.history_short
    st = j.status()
    assert st.history_short
    assert any("dr1" in a for a in st.alerts)
    assert j.read("v", 0, size) == images[max(images)]
    j.close()


def test_snapshot_hold_is_never_released_by_the_cap(tmp_path: Path) -> None:
    clock = ManualClock()
    j = _open(tmp_path, clock)
    j.add_volume("v", 128 * 1024)
    images = _fill(j, clock, random.Random(5), 200, 128 * 1024)
    j.set_hold("snapshot", "locked", min(images))
    r = j.apply_retention(keep_ns=0, max_bytes=1)
    assert r.released_holds == ()
    assert j.window().first_seq <= min(images)
    assert j.read("v", 0, 128 * 1024, min(images)) == images[min(images)]
    j.close()


def test_index_deleted_is_rebuilt_identically(tmp_path: Path) -> None:
    clock = ManualClock()
    j = _open(tmp_path, clock)
    j.add_volume("v", 256 * 1024)
    images = _fill(j, clock, random.Random(11), 200, 256 * 1024)
    j.checkpoint("before-upgrade")
    j.sync()
    j.seal_pending(1000)
    j.close()
    j = _open(tmp_path, clock)
    before = j.index.dump()
    j.close()
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / f"index.sqlite{suffix}"
        if p.exists():
            p.unlink()
    j = _open(tmp_path, clock)
    assert j.index.dump() == before
    assert j.find_checkpoint("before-upgrade") is not None
    assert j.read("v", 0, 256 * 1024, max(images)) == images[max(images)]
    j.close()
    (tmp_path / "index.sqlite").write_bytes(b"this is not a database" * 100)
    j = _open(tmp_path, clock)
    assert j.recovery.index_rebuilt
    assert j.index.dump() == before
    j.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs") as mnt:
        yield mnt


def test_size_cap_on_small_tmpfs_never_fails_an_append(small_tmpfs: Path) -> None:
    """40 MiB of writes through a 24 MiB filesystem with an 8 MiB cap: no append fails."""
    clock = ManualClock()
    opts = JournalOptions(segment_size=1 << 20, chunk_size=64 * 1024, pack_target=2 << 20)
    j = _open(small_tmpfs / "j", clock, opts)
    size = 4 << 20
    j.add_volume("v", size)
    j.set_hold("replica", "dr1", 1)
    rng = random.Random(1)
    disk = bytearray(size)
    cap = 8 << 20
    for i in range(640):  # 640 x 64 KiB = 40 MiB of incompressible data
        clock.advance(MS)
        off = rng.randrange(0, size // 65536) * 65536
        data = rng.randbytes(65536)
        j.write("v", off, data)
        disk[off : off + 65536] = data
        if i % 16 == 0:
            j.sync()
            j.seal_pending(100)
            j.apply_retention(keep_ns=10**15, max_bytes=cap)
    j.sync()
    assert j.read("v", 0, size) == bytes(disk)
    st = j.status()
    assert st.history_short and any("dr1" in a for a in st.alerts)
    j.close()
