"""Our NBD export (journaling every write) against qemu-nbd on an identical raw file.

The same fio jobs (--ioengine=nbd) run against both servers, alternated, median of N runs;
the table prints both and the ratio. After each of our runs the script waits, before the
peer's run, until the daemon has sealed every rolled segment and its detector has scored
every write (so that our background work never slows the peer), and reports that backlog
and its drain time; "all incl. drain" is the CPU of the daemon and its detector worker per
write, the drain included.

    .venv/bin/python bench/nbd_bench.py             # full: 10 s jobs, 30 s sequential, N=3
    .venv/bin/python bench/nbd_bench.py --quick     # 3 s jobs, N=3
    .venv/bin/python bench/nbd_bench.py --job "4k randwrite QD16"   # only that job
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = [
    ("4k randwrite QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], "iops"),
    ("4k randwrite QD16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"], "iops"),
    ("64k randwrite QD8", ["--rw=randwrite", "--bs=64k", "--iodepth=8"], "iops"),
    ("1M seq write QD4", ["--rw=write", "--bs=1M", "--iodepth=4"], "bw"),
    (
        "4k randwrite QD16 flush/32",
        ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--fsync=32"],
        "iops",
    ),
]
SIZE = "1G"
# The daemon runs from this script's checkout: ``python -m`` puts the working directory
# first on sys.path, ahead of PYTHONPATH, so an A/B must run each checkout's own script.
ROOT = Path(__file__).resolve().parent.parent


def fio(uri: str, args: list[str], runtime: int) -> dict:  # type: ignore[type-arg]
    cmd = [
        "fio",
        "--name=b",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={SIZE}",
        f"--runtime={runtime}",
        "--time_based",
        "--refill_buffers",
        "--output-format=json",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    w = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return {"iops": w["iops"], "bw": w["bw_bytes"] / 1e6, "ios": w["total_ios"]}


def api(sock: str, path: str) -> dict:  # type: ignore[type-arg]
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    return json.loads(raw.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def wait_socket(path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise TimeoutError(path)


def cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the daemon and of each child (the detector worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for who, p in [("daemon", pid)] + [("worker", int(k)) for k in kids.split()]:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        out[who] = out.get(who, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


def profile(out: str, job: str, daemon: int, seconds: int) -> list[subprocess.Popen[bytes]]:
    """py-spy (raw stacks, all threads) of the daemon and its children for one fio run."""
    Path(out).mkdir(parents=True, exist_ok=True)
    kids = subprocess.run(["pgrep", "-P", str(daemon)], capture_output=True, text=True)
    spies = []
    for who, pid in [("daemon", daemon)] + [("worker", int(p)) for p in kids.stdout.split()]:
        dest = Path(out) / f"{job.replace(' ', '_').replace('/', '-')}-{who}-{pid}.txt"
        spies.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(seconds),
                    "-r",
                    "200",
                    "--threads",
                    "--nonblocking",
                    "-f",
                    "raw",
                    "-o",
                    str(dest),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return spies


def settle(api_sock: str, limit_s: float = 600.0) -> tuple[int, float, bool]:
    """Wait until the daemon has sealed every rolled segment and its detector has scored
    every write; returns the backlog found (rolled segments), how long that took, and
    whether ``limit_s`` ran out first.

    The detector is done when it has scored up to the journal's last seq, or when its
    position has not moved for a second: a record that is not a guest write (the anomaly
    checkpoint of an alarm) is never scored, so it may stay the last seq.
    """
    t0 = time.monotonic()
    backlog, scored, still_since = -1, -1, t0
    while time.monotonic() - t0 < limit_s:
        g = api(api_sock, "/v1/status")["groups"][0]
        if backlog < 0:
            backlog = int(g["unsealed_segments"])
        det = g.get("detector")
        now = time.monotonic()
        done = det is None or int(det["scored_seq"]) >= int(g["window"]["last_seq"])
        if det is not None and int(det["scored_seq"]) != scored:
            scored, still_since = int(det["scored_seq"]), now
        if not g["unsealed_segments"] and (done or now - still_since >= 1.0):
            return backlog, now - t0, False
        time.sleep(0.25)
    return backlog, time.monotonic() - t0, True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(Path(__file__).parent / "tmp" / "nbd_bench"))
    ap.add_argument(
        "--job",
        action="append",
        choices=[j[0] for j in JOBS],
        help="run only this job (repeatable); default: all",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the daemon and its detector worker in each job's first cdp run",
    )
    ap.add_argument(
        "--no-detector",
        action="store_true",
        help="[detector] enabled = false (A/B of the detector's cost to guests)",
    )
    a = ap.parse_args()
    runtime, seq_runtime = (3, 5) if a.quick else (10, 30)
    work = Path(a.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="cdpb-", dir="/tmp"))
    ours_img, peer_img = work / "ours.raw", work / "peer.raw"
    for img in (ours_img, peer_img):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), SIZE], check=True)
    cfg = work / "cdp.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{work / "state"}"\napi = "unix:{sock_dir}/api.sock"\n'
        + ("[detector]\nenabled = false\n" if a.no_detector else "")
        + f'[[volume]]\nname = "disk0"\nsize = "1GiB"\nsource = "nbd"\n'
        f'image = "{ours_img}"\nlisten = "unix:{sock_dir}/ours.sock"\n'
    )
    with open(work / "daemon.log", "w") as log:
        ours = subprocess.Popen(
            [sys.executable, "-m", "cdp", "daemon", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=ROOT,
        )
    where = subprocess.run(
        [sys.executable, "-c", "import cdp, journal; print(cdp.__file__, journal.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    print(f"daemon code: {' '.join(str(Path(w).parent) for w in where)}")
    peer = subprocess.Popen(
        [
            "qemu-nbd",
            f"--socket={sock_dir}/peer.sock",
            "--format=raw",
            "--export-name=disk0",
            "--persistent",
            "--cache=writeback",
            str(peer_img),
        ]
    )
    try:
        wait_socket(f"{sock_dir}/ours.sock")
        wait_socket(f"{sock_dir}/api.sock")  # bound just after the export's: do not race it
        wait_socket(f"{sock_dir}/peer.sock")
        # Onboarding compares the whole image with the journal first; jobs start after it.
        t0 = time.monotonic()
        while (
            api(f"{sock_dir}/api.sock", "/v1/status")["volumes"][0]["onboarding"]["state"] != "done"
            and time.monotonic() - t0 < 120
        ):
            time.sleep(0.2)
        uris = {
            "cdp": f"nbd+unix:///disk0?socket={sock_dir}/ours.sock",
            "qemu-nbd": f"nbd+unix:///disk0?socket={sock_dir}/peer.sock",
        }
        print(
            f"fio jobs, {runtime} s each ({seq_runtime} s sequential), median of {a.runs}, "
            "alternated; cdp journals every write"
        )
        print(f"{'job':30} {'cdp':>12} {'qemu-nbd':>12} {'ratio':>7}")
        for name, args, key in JOBS:
            if a.job and name not in a.job:
                continue
            rt = seq_runtime if key == "bw" else runtime
            res: dict[str, list[float]] = {"cdp": [], "qemu-nbd": []}
            cost: dict[str, list[float]] = {}
            drains: list[tuple[int, float]] = []
            for k in range(a.runs):
                for who in ("cdp", "qemu-nbd"):
                    spies = (
                        profile(a.profile, name, ours.pid, rt)
                        if (a.profile and who == "cdp" and k == 0)
                        else []
                    )
                    c0 = cpu_s(ours.pid) if who == "cdp" else {}
                    r = fio(uris[who], args, rt)
                    res[who].append(r[key])
                    if who != "cdp":
                        continue
                    c1 = cpu_s(ours.pid)
                    for part, v in c1.items():
                        cost.setdefault(part, []).append((v - c0.get(part, 0.0)) / r["ios"] * 1e6)
                    # What the run left to do (sealing, scoring) is done before the peer
                    # runs, so it never slows the peer, and its CPU is ours.
                    backlog, took, timed_out = settle(f"{sock_dir}/api.sock")
                    if timed_out:
                        print(f"{'':30} (the daemon did not settle within {took:.0f} s)")
                    c2 = cpu_s(ours.pid)
                    cost.setdefault("all incl. drain", []).append(
                        sum(c2.values()) - sum(c0.values())
                    )
                    cost["all incl. drain"][-1] *= 1e6 / r["ios"]
                    drains.append((backlog, took))
                    for spy in spies:
                        spy.wait(30)
            m = {k: statistics.median(v) for k, v in res.items()}
            unit = "MB/s" if key == "bw" else "IOPS"
            print(
                f"{name:30} {m['cdp']:>9.0f} {unit:<2} {m['qemu-nbd']:>9.0f} {unit:<2} "
                f"{m['cdp'] / m['qemu-nbd']:>6.0%}",
                flush=True,
            )
            print(
                f"{'':30} runs: cdp {[round(x) for x in res['cdp']]}, "
                f"qemu-nbd {[round(x) for x in res['qemu-nbd']]}",
                flush=True,
            )
            print(
                f"{'':30} CPU per write (µs, median): "
                + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in cost.items()),
                flush=True,
            )
            print(
                f"{'':30} backlog after each run (segments, s to drain it and to finish "
                f"scoring): {[(b, round(t, 1)) for b, t in drains]}",
                flush=True,
            )
    finally:
        ours.send_signal(signal.SIGTERM)
        peer.terminate()
        ours.wait(60)
        peer.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
