"""What the detector costs per 4 KiB write in the daemon's shape, part by part (issue 7).

    .venv/bin/python bench/detector_cost.py            # 40,000 random 4 KiB writes, 1 GiB

A real journal gets random 4 KiB writes of random data over a 1 GiB volume; then, in this
process, CPU time per record of: ``GroupDetector.observe`` with ``prior`` reading the
journal (the daemon's case: every block is seen for the first time), the same with an
empty ``prior`` (scoring alone), and ``Journal.read_durable`` of the same records (what
the detector did before the journal's tap handed it the writes); and ``ratio_class``
alone, on 1 KiB views of the written data (the worker samples views of its ring). Scratch under
``bench/out/`` (gitignored), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdp.daemon.detect import _inline  # noqa: E402
from cdp.detector import SAMPLE, DetectorConfig, GroupDetector, ratio_class  # noqa: E402
from journal import Journal, JournalOptions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=40_000)
    args = ap.parse_args()
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    d = tempfile.mkdtemp(dir=ROOT / "bench" / "out", prefix="detector-cost-")
    try:
        j = Journal.open(d + "/j")
        j.add_volume("disk0", 1 << 30)
        rng = random.Random(1)
        data = os.urandom(4096 * 64)
        for i in range(args.writes):
            k = i % 64
            j.write("disk0", rng.randrange(262144) * 4096, data[k * 4096 : (k + 1) * 4096])
        j.sync()
        big = dict(max_bytes=1 << 30, max_records=10**7, sync=False)
        recs, _ = j.read_durable(1, **big)  # type: ignore[arg-type]
        recs = _inline(j, recs)
        n = len(recs)

        def timed(det: GroupDetector) -> float:
            t = time.process_time()
            det.observe(recs)
            return (time.process_time() - t) / n * 1e6

        opts = JournalOptions()
        a = timed(
            GroupDetector(opts.chunk_size, DetectorConfig(), lambda v, o, m, s: j.read(v, o, m, s))
        )
        b = timed(GroupDetector(opts.chunk_size, DetectorConfig(), lambda *x: b""))
        t = time.process_time()
        j.read_durable(1, **big)  # type: ignore[arg-type]
        c = (time.process_time() - t) / n * 1e6
        print(f"{n} records of 4 KiB, CPU µs per record:")
        print(f"  observe, prior from the journal (first sight of every block): {a:.1f}")
        print(f"  observe, empty prior (scoring alone):                          {b:.1f}")
        print(f"  read_durable of the same records (the read-back the tap saves): {c:.1f}")
        det = GroupDetector(opts.chunk_size, DetectorConfig(), lambda *x: b"")
        view = memoryview(data)
        samples = [view[k * 4096 : k * 4096 + SAMPLE] for k in range(64)]
        best = min(
            timeit.timeit(lambda: [ratio_class(x, det._cctx) for x in samples], number=500)
            for _ in range(5)
        )
        us = best / 32_000 * 1e6
        print(f"  ratio_class of one 1 KiB sample (best of 5):                   {us:.2f}")
        j.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
