"""The crash model itself: FaultyStorage must lose exactly what a power loss may lose."""

from __future__ import annotations

import errno
import os
import random

import pytest

from .faulty_storage import FaultyStorage, SimulatedCrash


@pytest.fixture
def fs(tmp_path) -> FaultyStorage:
    s = FaultyStorage(str(tmp_path / "root"))
    s.makedirs(os.path.join(s.root, "d"))
    s.sync_dir(s.root)
    return s


def p(fs: FaultyStorage, *parts: str) -> str:
    return os.path.join(fs.root, *parts)


def image(fs: FaultyStorage, mode: str, seed: int = 0) -> dict[str, bytes]:
    return fs.snapshot().crash_image_files(mode, random.Random(seed))


def test_unsynced_appends_are_lost_synced_ones_kept(fs: FaultyStorage) -> None:
    f = fs.open(p(fs, "d", "a"), create=True)
    fs.sync_dir(p(fs, "d"))
    assert f.append([b"hello ", memoryview(b"world")]) == 0
    f.sync()
    assert f.append([b"!!"]) == 11
    assert f.pread(100, 0) == b"hello world!!" and f.size() == 13
    assert image(fs, "drop_all") == {"d/a": b"hello world"}
    assert image(fs, "process") == {"d/a": b"hello world!!"}


def test_new_file_needs_its_folder_synced(fs: FaultyStorage) -> None:
    f = fs.open(p(fs, "d", "a"), create=True)
    f.append([b"data"])
    f.sync()  # data durable, directory entry not
    assert image(fs, "drop_all") == {}
    fs.sync_dir(p(fs, "d"))
    assert image(fs, "drop_all") == {"d/a": b"data"}


def test_rename_and_remove_need_the_folder_synced(fs: FaultyStorage) -> None:
    for name, data in (("old", b"1"), ("tmp", b"2")):
        f = fs.open(p(fs, "d", name), create=True)
        f.append([data])
        f.sync()
    fs.sync_dir(p(fs, "d"))
    fs.replace(p(fs, "d", "tmp"), p(fs, "d", "old"))
    assert fs.read_all(p(fs, "d", "old")) == b"2"
    assert image(fs, "drop_all") == {"d/old": b"1", "d/tmp": b"2"}
    fs.sync_dir(p(fs, "d"))
    assert image(fs, "drop_all") == {"d/old": b"2"}
    fs.remove(p(fs, "d", "old"))
    assert image(fs, "drop_all") == {"d/old": b"2"}
    seen = {tuple(sorted(image(fs, "dirents", s))) for s in range(40)}
    assert seen == {(), ("d/old",)}
    fs.sync_dir(p(fs, "d"))
    assert image(fs, "drop_all") == {}


def test_new_folder_needs_its_parent_synced(tmp_path) -> None:
    fs = FaultyStorage(str(tmp_path / "root"))
    fs.makedirs(p(fs, "x", "y"))
    assert os.path.isdir(p(fs, "x", "y"))  # real folders exist, for SQLite
    f = fs.open(p(fs, "x", "y", "f"), create=True)
    f.append([b"z"])
    f.sync()
    fs.sync_dir(p(fs, "x", "y"))
    assert image(fs, "drop_all") == {}  # x/ itself was never made durable
    fs.sync_dir(p(fs, "x"))
    assert image(fs, "drop_all") == {}
    fs.sync_dir(fs.root)
    assert image(fs, "drop_all") == {"x/y/f": b"z"}
    lax = FaultyStorage(str(tmp_path / "lax"), strict_mkdir=False)
    lax.makedirs(p(lax, "x"))
    g = lax.open(p(lax, "x", "f"), create=True)
    lax.sync_dir(p(lax, "x"))
    g.append([b"q"])
    g.sync()
    assert image(lax, "drop_all") == {"x/f": b"q"}


def _unsynced_file(fs: FaultyStorage) -> tuple[bytes, bytes]:
    f = fs.open(p(fs, "d", "a"), create=True)
    fs.sync_dir(p(fs, "d"))
    rng = random.Random(5)
    durable = rng.randbytes(700)
    f.append([durable])
    f.sync()
    later = b""
    for _ in range(6):
        chunk = rng.randbytes(rng.randint(100, 1500))
        f.append([chunk])
        later += chunk
    return durable, later


def test_keep_some_is_a_prefix_possibly_torn(fs: FaultyStorage) -> None:
    durable, later = _unsynced_file(fs)
    sizes = set()
    for seed in range(300):
        got = image(fs, "keep_some", seed)["d/a"]
        assert got[: len(durable)] == durable
        tail = got[len(durable) :]
        sizes.add(len(tail))
        n = len(tail.rstrip(b"\0"))
        assert tail[:n] == later[:n], f"seed {seed}: not a prefix of what was appended"
    assert 0 in sizes and len(later) in sizes
    assert any(s % 512 for s in sizes) and len(sizes) > 20


def test_reorder_lands_a_subset_with_zero_holes(fs: FaultyStorage) -> None:
    durable, later = _unsynced_file(fs)
    holes = 0
    for seed in range(200):
        got = image(fs, "reorder", seed)["d/a"]
        assert got[: len(durable)] == durable
        tail = got[len(durable) :]
        assert len(tail) <= len(later)
        for i, b in enumerate(tail):
            assert b in (later[i], 0), f"seed {seed}: byte {i} neither written nor zero"
        if tail and tail != later[: len(tail)]:
            holes += 1
    assert holes > 20


def test_failed_fsync_loses_the_data_for_good(fs: FaultyStorage) -> None:
    """fsyncgate: after an EIO the retried fsync succeeds but persists nothing."""
    f = fs.open(p(fs, "d", "a"), create=True)
    fs.sync_dir(p(fs, "d"))
    f.append([b"kept"])
    f.sync()
    f.append([b"LOST"])
    fault = fs.fail("sync", err=errno.EIO)
    with pytest.raises(OSError) as ei:
        f.sync()
    assert ei.value.errno == errno.EIO and fault.fired == 1
    f.sync()  # "succeeds"
    f.append([b"new"])
    f.sync()
    assert f.pread(100, 0) == b"keptLOSTnew"  # the page cache still shows it
    assert image(fs, "drop_all") == {"d/a": b"kept\0\0\0\0new"}


def test_write_faults_and_partial_writes(fs: FaultyStorage) -> None:
    f = fs.open(p(fs, "d", "a"), create=True)
    fs.fail("write", nth=2, err=errno.ENOSPC, partial=3)
    f.append([b"one"])
    with pytest.raises(OSError) as ei:
        f.append([b"two-two"])
    assert ei.value.errno == errno.ENOSPC
    assert f.pread(100, 0) == b"onetwo"
    f.append([b"3"])
    assert f.pread(100, 0) == b"onetwo3"


def test_crash_after_op_k(tmp_path) -> None:
    fs = FaultyStorage(str(tmp_path / "root"), crash_after=3)
    f = fs.open(p(fs, "a"), create=True)  # op 1
    f.append([b"x"])  # op 2
    f.sync()  # op 3
    with pytest.raises(SimulatedCrash):
        f.append([b"y"])
    with pytest.raises(SimulatedCrash):
        fs.exists(p(fs, "a"))
    assert fs.ops == 3 and [r.kind for r in fs.oplog] == ["create", "append", "sync"]
    # the crash image is usable and independent of the crashed storage
    img = fs.crash_image("process", random.Random(0))
    assert img.read_all(p(img, "a")) == b"x"
    g = img.open(p(img, "a"))
    g.append([b"z"])
    assert img.read_all(p(img, "a")) == b"xz"


def test_real_files_are_copied_into_the_image(fs: FaultyStorage) -> None:
    with open(os.path.join(fs.root, "index.sqlite"), "wb") as f:
        f.write(b"sqlite bytes")
    with open(os.path.join(fs.root, "index.sqlite-shm"), "wb") as f:
        f.write(b"shm")
    img = fs.crash_image("drop_all", random.Random(0))
    assert img.root != fs.root
    with open(os.path.join(img.root, "index.sqlite"), "rb") as f:
        assert f.read() == b"sqlite bytes"
    assert not os.path.exists(os.path.join(img.root, "index.sqlite-shm"))
    assert os.path.isdir(os.path.join(img.root, "d"))


def test_paths_outside_the_root_are_refused(fs: FaultyStorage, tmp_path) -> None:
    with pytest.raises(ValueError):
        fs.open(str(tmp_path / "elsewhere"), create=True)
    assert fs.exists(os.path.dirname(fs.root))  # ancestors: durable, untouched
    fs.sync_dir(os.path.dirname(fs.root))
