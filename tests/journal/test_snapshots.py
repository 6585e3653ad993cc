"""Snapshots outlive the journal window, share blocks, and locks hold against every path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from journal import Journal, JournalOptions, ManualClock, NoSuchSnapshot, SnapshotLocked

SMALL = JournalOptions(segment_size=256 * 1024, chunk_size=16 * 1024, pack_target=1 << 20)
SIZE = 1 << 20
SEC = 10**9


def _open(path: Path, clock: ManualClock) -> Journal:
    return Journal.open(str(path), clock=clock, options=SMALL)


def _churn(j: Journal, rng: random.Random, n: int) -> None:
    for _ in range(n):
        length = rng.choice([512, 4096, 20_000, 70_000])
        off = rng.randrange(0, SIZE - length)
        if rng.random() < 0.1:
            j.zero("v", off, length)
        else:
            j.write("v", off, rng.randbytes(length) if rng.random() < 0.7 else b"\1" * length)


def _fold_all(j: Journal, clock: ManualClock) -> None:
    j.write("v", 0, b"roll" * 1024)  # let the segments before this one fold
    while j.seal_pending(100):
        pass
    clock.advance(10 * SEC)
    j.apply_retention(keep_ns=SEC)


def test_snapshots_stay_exact_across_folds_reopen_and_gc(tmp_path: Path) -> None:
    clock = ManualClock(1_000 * SEC)
    rng = random.Random(9)
    j = _open(tmp_path / "j", clock)
    j.add_volume("v", SIZE)
    model: dict[str, bytes] = {}
    for k in range(6):
        _churn(j, rng, 80)
        clock.advance(SEC)
        s = j.create_snapshot(f"s{k}")
        model[s.name] = j.read("v", 0, SIZE)
        if k % 2:
            _fold_all(j, clock)
    _churn(j, rng, 80)
    _fold_all(j, clock)
    assert j.window().first_seq > max(s.seq for s in j.snapshots()), "all folded past"
    assert all(s.materialized for s in j.snapshots())
    for name, want in model.items():
        out = bytearray(SIZE)
        j.read_snapshot_into(name, "v", 0, memoryview(out))
        assert bytes(out) == want, name
    j.close()
    j = _open(tmp_path / "j", clock)  # manifests and the catalog are on disk
    for name, want in model.items():
        out = bytearray(SIZE)
        j.read_snapshot_into(name, "v", 0, memoryview(out))
        assert bytes(out) == want, name
    # deleting snapshots lets their blocks go (a full repack shows what is still live)
    j.store.collect(j._live_blocks(), repack_below=1.0)
    before = j.status().pack_bytes
    for name in model:
        j.delete_snapshot(name)
    j.store.collect(j._live_blocks(), repack_below=1.0)
    assert j.status().pack_bytes < before
    with pytest.raises(NoSuchSnapshot):
        j.read_snapshot_into("s0", "v", 0, memoryview(bytearray(10)))
    j.close()


def test_snapshot_inside_the_window_reads_through_the_journal(tmp_path: Path) -> None:
    clock = ManualClock(1_000 * SEC)
    j = _open(tmp_path / "j", clock)
    j.add_volume("v", SIZE)
    j.write("v", 0, b"a" * 4096)
    s = j.create_snapshot("early")
    j.write("v", 0, b"b" * 4096)
    assert j.snapshot_point("early") == (s.seq, True)
    out = bytearray(4096)
    j.read_snapshot_into("early", "v", 0, memoryview(out))
    assert bytes(out) == b"a" * 4096
    with pytest.raises(ValueError):
        j.create_snapshot("early")  # names are unique
    with pytest.raises(ValueError):
        j.create_snapshot("../escape")
    j.close()


def test_a_locked_snapshot_survives_every_delete_and_fold(tmp_path: Path) -> None:
    clock = ManualClock(1_000 * SEC)
    j = _open(tmp_path / "j", clock)
    j.add_volume("v", SIZE)
    j.write("v", 0, b"keep" * 1024)
    until = clock() + 14 * 86400 * SEC
    j.create_snapshot("locked", locked_until=until)
    j.write("v", 0, b"gone" * 1024)
    with pytest.raises(SnapshotLocked):
        j.delete_snapshot("locked")
    with pytest.raises(SnapshotLocked):
        j.delete_snapshot("locked", now_ns=until - 1)
    assert j.lock_snapshot("locked", until - 86400 * SEC).locked_until == until  # never shorter
    _fold_all(j, clock)
    _fold_all(j, clock)
    out = bytearray(4096)
    j.read_snapshot_into("locked", "v", 0, memoryview(out))
    assert bytes(out) == b"keep" * 1024
    j.close()
    j = _open(tmp_path / "j", clock)
    with pytest.raises(SnapshotLocked):
        j.delete_snapshot("locked")  # the lock is on disk too
    with pytest.raises(SnapshotLocked):
        j.delete_snapshot("locked", now_ns=until)  # a caller's clock cannot end a lock early
    clock.set(until)
    j.delete_snapshot("locked")
    assert j.snapshots() == []
    j.close()
