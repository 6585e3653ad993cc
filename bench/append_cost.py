"""CPU per 4 KiB write of what the NBD loop does in Python before a reply: the journal's
``write_many`` (records, frames, the segment writev, the volume map) and the detector's tap
(the copy into its ring), each alone, plus the record constructors they use.

The NBD benchmark's figures move by 20 % between runs on this shared box, so a change of
a microsecond per write cannot be seen there; here it can. Batches of 12 writes (what
``data_received`` hands the server at 4k QD16), 36,000 writes a run, thread CPU time,
median of the runs:

    .venv/bin/python bench/append_cost.py
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/append_cost.py   # A/B a tree

Run A/B pairs alternated. The reader's side of the ring (the worker process in the
daemon) is drained between batches and not counted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import journal  # first: PYTHONPATH picks the tree under test
from cdp.detector_feed import Ring, RingReader, RingWriter
from journal import Journal, Record, Seq, WriteRecord

BATCH, BATCHES = 12, 3000
VOLUME = 1 << 30


def _ops(rnd: random.Random) -> list[list[tuple[int, memoryview, int, bool]]]:
    bufs = [memoryview(os.urandom(4096)) for _ in range(64)]

    def one() -> tuple[int, memoryview, int, bool]:
        return rnd.randrange(VOLUME // 4096) * 4096, bufs[rnd.randrange(64)], 4096, False

    return [[one() for _ in range(BATCH)] for _ in range(BATCHES)]


def tap_us(rnd: random.Random) -> float:
    """µs of thread CPU per write for ``RingWriter.tap`` alone."""
    ring = Ring.create()
    w, r = RingWriter(ring, after=0), RingReader(ring)
    spent, seq = 0.0, 1
    for ops in _ops(rnd):
        recs: list[Record] = [
            WriteRecord(Seq(seq + k), 1, "disk0", op[0], 4096, b"") for k, op in enumerate(ops)
        ]
        seq += len(ops)
        t0 = time.thread_time()
        w.tap(recs, ops)
        spent += time.thread_time() - t0
        r.take()
    r.release()
    ring.close()
    return spent / (BATCH * BATCHES) * 1e6


def write_many_us(rnd: random.Random, folder: str) -> float:
    """µs of thread CPU per write for ``Journal.write_many`` with no tap (a segment of
    64 MiB rolls once a run; its sealing runs on the journal's own threads, not counted)."""
    path = os.path.join(folder, "j")
    shutil.rmtree(path, ignore_errors=True)
    j = Journal.open(path)
    try:
        j.add_volume("disk0", VOLUME)
        batches = _ops(rnd)
        t0 = time.thread_time()
        for ops in batches:
            j.write_many("disk0", ops)
        return (time.thread_time() - t0) / (BATCH * BATCHES) * 1e6
    finally:
        j.close()
        shutil.rmtree(path, ignore_errors=True)


def constructors_us() -> dict[str, float]:
    """µs per record built the way the hot paths build them (and with the dataclass)."""
    from journal.types import BlockId, BlockRef

    out = {
        "WriteRecord()": timeit.timeit(
            lambda: WriteRecord(Seq(1), 2, "v", 3, 4, b"", (), None), number=200_000
        ) * 5,
        "BlockRef()": timeit.timeit(
            lambda: BlockRef(BlockId(b"x"), 2, 3, 4), number=200_000
        ) * 5,
    }  # fmt: skip
    fast = getattr(journal.types, "new_write", None)
    if fast is not None:
        out["new_write()"] = timeit.timeit(
            lambda: fast(Seq(1), 2, "v", 3, 4, b"", (), None), number=200_000
        ) * 5  # fmt: skip
        ref = journal.types.new_block_ref
        out["new_block_ref()"] = timeit.timeit(
            lambda: ref(BlockId(b"x"), 2, 3, 4), number=200_000
        ) * 5  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=str(Path(__file__).parent / "tmp"))
    a = ap.parse_args()
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    print(f"journal code: {Path(journal.__file__).parent}")
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        taps, writes = [], []
        for k in range(a.runs):
            taps.append(tap_us(random.Random(k)))
            writes.append(write_many_us(random.Random(k), folder))
    print(f"tap:        {statistics.median(taps):.2f} µs/write  runs {[round(x, 2) for x in taps]}")
    print(f"write_many: {statistics.median(writes):.2f} µs/write  runs "
          f"{[round(x, 2) for x in writes]}")  # fmt: skip
    for name, us in constructors_us().items():
        print(f"{name:16} {us:.2f} µs")


if __name__ == "__main__":
    main()
