"""CPU per GB of appending to a file that only grows, with and without dropping its pages.

Why this exists: packs are append-only and kept, so every byte written into one takes a new
page of the page cache. In a VM, a page the guest has not touched yet costs a fault into the
hypervisor, and that shows up as `copy_folio_from_iter_atomic` in a perf profile of the
writer. This measures it alone: a Python writer of 24 KiB `writev`s (a pack entry's size on
text-heavy data) with an fdatasync per 64 MiB, against the same writer calling
`OsFile.forget` (POSIX_FADV_DONTNEED) after each fsync, alternated, the process CPU per GB.

    .venv/bin/python bench/page_cache_cost.py              # 3 pairs of 3 GiB, ~1 min

A run right after one that freed gigabytes of pages comes out cheap either way: the kernel
reuses those warm pages first. That is why the pairs alternate and all are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from journal.storage import OsStorage

SYNC_EVERY = 64 * 1024 * 1024


def run(path: Path, total: int, forget: bool) -> tuple[float, float]:
    """(CPU-s per GB, wall MB/s) of appending ``total`` bytes."""
    if path.exists():
        path.unlink()
    parts = [os.urandom(24_000 + i) for i in range(16)]
    f = OsStorage().open(str(path), create=True)
    c0, w0 = time.process_time(), time.perf_counter()
    synced = 0
    i = 0
    while f.size() < total:
        f.append(parts[i % 16 : i % 16 + 4])
        i += 4
        if f.size() - synced >= SYNC_EVERY:
            f.sync()
            if forget:
                f.forget(f.size())
            synced = f.size()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    n = f.size()
    f.close()
    path.unlink()
    return cpu / (n / 1e9), n / wall / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=3.0, help="bytes written per run")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dir", default=str(Path(__file__).parent / "tmp" / "page_cache_cost"))
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    total = int(a.gib * (1 << 30))
    print("pair  kept in cache: CPU-s/GB  MB/s   dropped after fsync: CPU-s/GB  MB/s")
    for k in range(a.pairs):
        kept = run(d / "pack", total, forget=False)
        dropped = run(d / "pack", total, forget=True)
        print(
            f"{k + 1:4d}  {kept[0]:23.2f} {kept[1]:5.0f}   {dropped[0]:29.2f} {dropped[1]:5.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
