"""CPU per record of sealing small random writes (what an NBD guest's 4 KiB writes cost later).

The NBD splitter's 4k figures drop once the sealer starts, because sealing one 4 KiB record
(decode, hash, look up, compress, pack, index, rewrite the segment) runs in the daemon's
process and shares its GIL. This measures that cost alone: N random 4 KiB writes into a
fresh journal, the last hot segment rolled, then every segment sealed on this thread; it
prints the process CPU (all threads) per record.

    .venv/bin/python bench/seal_small.py                   # 60,000 records, 3 runs
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/seal_small.py   # A/B another tree

Run A/B pairs alternated: the box is shared, and the CPU per record moves with its load.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from journal import Journal, JournalOptions  # first: PYTHONPATH picks the tree under test

sys.path.insert(0, str(Path(__file__).parent))
from journal_bench import force_roll  # (it puts this checkout first on the path)

VOLUME = 1 << 30


def one_run(path: Path, n: int, seed: int) -> tuple[float, float]:
    """(records sealed per second of wall time, µs of process CPU per record)."""
    shutil.rmtree(path, ignore_errors=True)
    j = Journal.open(str(path), options=JournalOptions())
    try:
        j.add_volume("v", VOLUME)
        rnd = random.Random(seed)
        pool = os.urandom(4096 * 1024)  # each write a random 4 KiB slice of it: no two alike
        for _ in range(n):
            k = rnd.randrange(1024 * 4096 - 4096)
            j.write("v", rnd.randrange(VOLUME // 4096) * 4096, pool[k : k + 4096])
        force_roll(j)
        t0, c0 = time.perf_counter(), time.process_time()
        while j.seal_pending(1):
            pass
        flush = j.store.flush
        try:  # the block rows too: they are indexed in batches, which a run may not fill
            flush(index=True)
        except TypeError:  # a tree from before batched indexing: its flushes indexed them
            flush()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        j.close()
        shutil.rmtree(path, ignore_errors=True)
    return n / wall, cpu / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(Path(__file__).parent / "tmp" / "seal_small"))
    a = ap.parse_args()
    import journal

    print(f"journal from {Path(journal.__file__).parent}, {a.records} random 4 KiB writes")
    rates, costs = [], []
    for r in range(a.runs):
        rate, cost = one_run(Path(a.dir), a.records, r)
        rates.append(rate)
        costs.append(cost)
        print(f"  run {r + 1}: {rate:,.0f} records/s sealed, {cost:.1f} µs CPU per record")
    print(
        f"median: {statistics.median(rates):,.0f} records/s, "
        f"{statistics.median(costs):.1f} µs CPU per record"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
