"""Where a running daemon's event-loop thread spends its time: running, or waiting on what.

Run it beside a benchmark (e.g. ``bench/nbd_bench.sh --job "4k randwrite QD16" --runs 1``).
It waits for ``cdp daemon`` to start, then ``--delay`` seconds, then samples the loop
thread (the process's main thread) every ``--every`` seconds for ``--seconds``: its state
and the syscall it is blocked in, from ``/proc/PID/task/PID/stat`` and ``syscall``
(R = running or runnable; S in 202 = futex, the GIL or a lock; S in 281 = epoll_pwait,
waiting for a request), and, from ``schedstat``, the share of wall time it was on a CPU
and the share it waited for one. This tells a busy loop from a starved or an idle one,
which a profiler's samples do not.

    .venv/bin/python bench/loop_states.py --delay 5 --seconds 4 &
    bench/nbd_bench.sh --job "4k randwrite QD16" --runs 1
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import time
from pathlib import Path


def daemon_pid(timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["pgrep", "-f", "-n", "python -m cdp daemon"], capture_output=True, text=True
        ).stdout.split()
        if out:
            return int(out[0])
        time.sleep(0.1)
    raise SystemExit(f"no cdp daemon started within {timeout_s:.0f} s")


def schedstat(task: Path) -> tuple[int, int]:
    """(ns on a CPU, ns waiting for one) since the thread started."""
    run, wait, _ = task.joinpath("schedstat").read_text().split()
    return int(run), int(wait)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=float, default=5.0, help="s after the daemon starts")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--every", type=float, default=0.0005)
    ap.add_argument("--wait", type=float, default=120.0, help="s to wait for the daemon")
    a = ap.parse_args()
    pid = daemon_pid(a.wait)
    time.sleep(a.delay)
    task = Path(f"/proc/{pid}/task/{pid}")
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    try:
        run0, wait0 = schedstat(task)
        t0 = time.monotonic()
        while time.monotonic() - t0 < a.seconds:
            state = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0]
            call = task.joinpath("syscall").read_text().split()[0]
            counts[(state, call)] += 1
            time.sleep(a.every)
        run1, wait1 = schedstat(task)
        wall = (time.monotonic() - t0) * 1e9
    except FileNotFoundError:
        raise SystemExit("the daemon exited while being sampled") from None
    total = sum(counts.values())
    print(f"daemon {pid}, loop thread, {total} samples over {a.seconds:.1f} s")
    for (state, call), n in counts.most_common(8):
        print(f"  {state} {call:>8}  {100 * n / total:5.1f} %")
    print(f"  on a CPU {100 * (run1 - run0) / wall:.0f} %, waiting for one "
          f"{100 * (wait1 - wait0) / wall:.0f} % of the wall time")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
