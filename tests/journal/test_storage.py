"""The storage layer's cache hint: ``File.forget`` drops pages and never changes content.

Page residency is read with util-linux ``fincore`` (mincore(2) underneath), a tool nobody on
this team wrote; it is part of every Debian install.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from journal.blockstore import BlockStore
from journal.index import Index
from journal.storage import OsFile, OsStorage

PAGE = 4096


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip() or 0)


@pytest.fixture
def cached_dir(tmp_path: Path) -> Path:
    if shutil.which("fincore") is None:
        pytest.skip("util-linux fincore is not installed")
    probe = tmp_path / "probe"
    f = OsStorage().open(str(probe), create=True)
    f.append([bytes(64 * PAGE)])
    f.sync()
    f.forget(64 * PAGE)
    f.close()
    if resident(probe) != 0:
        # tmpfs keeps its pages: they are the file. Nothing to measure there.
        pytest.skip("this filesystem does not drop cached pages on POSIX_FADV_DONTNEED")
    return tmp_path


def test_forget_drops_synced_whole_pages_below_its_mark_and_keeps_the_content(
    cached_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = cached_dir / "f"
    data = random.Random(1).randbytes(256 * PAGE + 100)
    f: OsFile = OsStorage().open(str(path), create=True)
    for k in range(0, len(data), PAGE):  # page-sized writes: page-sized folios
        f.append([data[k : k + PAGE]])
    f.sync()
    whole = 257 * PAGE  # the last, partial page counts whole
    assert resident(path) == whole

    f.forget(100 * PAGE + 10)  # rounds down to whole pages
    assert resident(path) == whole - 100 * PAGE
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    f.forget(50 * PAGE)  # below the mark: no call at all
    assert calls == []
    f.forget(120 * PAGE)  # from a folio's worth before the mark, not from 0 every time
    assert calls == [(0, 120 * PAGE)]  # the mark (100 pages) is within 2 MiB of 0 here
    assert resident(path) == whole - 120 * PAGE
    monkeypatch.undo()

    assert f.pread(len(data), 0) == data  # read back from disk
    f.forget(10**12)  # beyond the end: up to the last whole page
    assert resident(path) <= PAGE
    assert f.pread(len(data), 0) == data
    # Pages a mapping holds stay (the kernel skips mapped pages); content never changes.
    assert f.mapped_read(PAGE, 99 * PAGE) == data[99 * PAGE : 100 * PAGE]
    f.forget(10**12)
    assert f.mapped_read(len(data), 0) == data
    f.close()


def test_a_large_folio_that_straddled_the_last_mark_is_dropped_by_the_next_forget(
    cached_dir: Path,
) -> None:
    """One large write may land in folios larger than a page (ext4 on newer kernels)."""
    path = cached_dir / "f"
    data = random.Random(3).randbytes(1024 * 1024)
    f = OsStorage().open(str(path), create=True)
    f.append([data])
    f.sync()
    f.forget(300 * 1024)  # may fall inside a folio, which then stays
    f.append([data])
    f.sync()
    f.forget(2 * len(data))
    assert resident(path) == 0
    assert f.pread(2 * len(data), 0) == data + data
    f.close()


def test_forget_after_truncate_drops_the_regrown_range_again(cached_dir: Path) -> None:
    path = cached_dir / "f"
    f = OsStorage().open(str(path), create=True)
    f.append([bytes(64 * PAGE)])
    f.sync()
    f.forget(64 * PAGE)
    f.truncate(16 * PAGE)
    f.append([b"\x01" * (48 * PAGE)])
    f.sync()
    assert resident(path) >= 48 * PAGE
    f.forget(64 * PAGE)
    assert resident(path) == 0
    assert f.pread(64 * PAGE, 0) == bytes(16 * PAGE) + b"\x01" * (48 * PAGE)
    f.close()


def test_a_flushed_pack_leaves_the_page_cache_and_its_blocks_still_read(
    cached_dir: Path,
) -> None:
    """Packs are written once and read rarely: after the fsync their pages are dropped."""
    index = Index(str(cached_dir / "index.db"))
    store = BlockStore(str(cached_dir / "packs"), OsStorage(), index, bytes(range(16)))
    rng = random.Random(2)
    blocks = [rng.randbytes(64 * 1024) for _ in range(64)]  # incompressible: 4 MiB stored
    refs = store.put_many(blocks)
    (pack,) = list((cached_dir / "packs").iterdir())
    assert resident(pack) >= 4 * 1024 * 1024  # written, not yet flushed: all in cache
    store.flush()
    assert resident(pack) <= 2 * 1024 * 1024  # at most the folio holding the partial last page
    assert [store.get(r) for r in refs] == blocks
    store.close()
