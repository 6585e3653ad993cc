"""What Python's cyclic collector costs the capture path, with and without cdp/gc_policy.py.

    .venv/bin/python bench/gc_cost.py              # 300,000 random 4 KiB records, 3 rounds
    .venv/bin/python bench/gc_cost.py --writes 1000000

Each run is a fresh process (the collector's state is process-wide) that appends random
4 KiB writes to a real journal with ``write_many`` in batches of 4, as the NBD splitter
does at QD16, and prints the CPU per record, the collections, their total time and the
longest pause (a pause stalls the event loop, so every guest, for that long). The two
settings are alternated; the table is the median of the rounds. Scratch under
``bench/tmp/`` (gitignored), removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(mode: str, writes: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from cdp.gc_policy import GcPolicy
    from journal import Journal

    st = {"runs": 0, "gc_s": 0.0, "max_ms": 0.0, "full": 0}
    t0 = [0.0]

    def cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            t0[0] = time.perf_counter()
            return
        dt = time.perf_counter() - t0[0]
        st["runs"] += 1
        st["gc_s"] += dt
        st["max_ms"] = max(st["max_ms"], dt * 1e3)
        st["full"] += info["generation"] == 2

    (ROOT / "bench" / "tmp").mkdir(parents=True, exist_ok=True)
    d = tempfile.mkdtemp(dir=ROOT / "bench" / "tmp", prefix="gc-cost-")
    try:
        j = Journal.open(d + "/j")
        j.add_volume("v", 1 << 30)
        data = memoryview(os.urandom(4096 * 64))
        rng = random.Random(1)
        policy = GcPolicy() if mode == "policy" else None
        if policy is not None:
            policy.install()
        gc.callbacks.append(cb)
        cpu = time.process_time()
        for i in range(0, writes, 4):
            ops = [
                (rng.randrange(262_144) * 4096, data[(k % 64) * 4096 : (k % 64 + 1) * 4096],
                 4096, False)
                for k in range(i, i + 4)
            ]  # fmt: skip
            j.write_many("v", ops)
            if policy is not None:
                policy.tick(i)
        cpu = time.process_time() - cpu
        gc.callbacks.remove(cb)
        out = {"us_per_write": cpu / writes * 1e6, **st, "objects": len(gc.get_objects())}
        j.close()
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", choices=["default", "policy"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.writes)))
        return 0
    res: dict[str, list[dict[str, float]]] = {"default": [], "policy": []}
    for _ in range(a.rounds):
        for mode in res:
            p = subprocess.run(
                [sys.executable, __file__, "--one", mode, "--writes", str(a.writes)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            res[mode].append(json.loads(p.stdout))
    print(f"{a.writes} random 4 KiB records, write_many of 4, median of {a.rounds} (alternated)")
    print(f"{'collector':10} {'µs CPU/rec':>11} {'collections':>12} {'full':>5} "
          f"{'GC s':>6} {'max pause ms':>13} {'tracked objects':>16}")  # fmt: skip
    for mode, runs in res.items():

        def med(k: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[k] for r in runs)

        print(f"{mode:10} {med('us_per_write'):>11.1f} {med('runs'):>12.0f} {med('full'):>5.0f} "
              f"{med('gc_s'):>6.2f} {med('max_ms'):>13.1f} {med('objects'):>16.0f}")  # fmt: skip
        print(f"{'':10} runs µs/rec {[round(r['us_per_write'], 1) for r in runs]}, "
              f"max pause ms {[round(r['max_ms'], 1) for r in runs]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
