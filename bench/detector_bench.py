#!/usr/bin/env python3
"""Corruption detector benchmark (issue 7): detection, false alarms, CPU cost.

    .venv/bin/python bench/detector_bench.py             # 3 runs per attack, 10 min ordinary loop
    .venv/bin/python bench/detector_bench.py --quick     # 1 run per attack, 3 min loop, 256 MiB CPU
    .venv/bin/python bench/detector_bench.py --minutes 30

Needs root, /dev/fuse, loop devices and the tools of ``tests/detector/corpus.py`` (a real ext4
on the daemon's NBD export: nbdfuse + loop device + ``mount -o discard``).

1. Attacks. Each of ``in-place``, ``partial``, ``slow`` (``corpus.attack``, 12 s as the
   test) on a fresh aged ``corpus.Disk``, ``--reps`` times (default 3; ``--quick``: 1).
   Detected = an anomaly checkpoint within 30 s after the attack ended; time-to-detect = the
   first anomaly checkpoint's journal ``ts_ns`` minus the attack's start (floor 10 s). The
   anomaly snapshot is restored (``cdp restore --at snapshot:NAME``) and every victim file
   (``corpus.victims``, as the test) is read out of the image with debugfs and compared with
   its checksum from before the attack: one ``debugfs -f`` with a ``dump`` per file (the same
   bytes as ``cat``); a file that does not match is read again with ``debugfs -R "cat PATH"``,
   as the test does.
   Control: the same check on the ``latest`` point must find the files the attack touched.
2. Ordinary corpus. One fresh Disk: ``corpus.age``, each of ``corpus.ORDINARY`` and then a
   fresh file system (``mkfs.ext4 -F`` over the used one), the new anomaly checkpoints after
   each (after the detector has caught up: its ``sampled`` counter stopped moving). Then, on
   that fresh file system, a loop for ``--minutes`` of wall time: ``corpus.age`` once, then the
   ORDINARY workloads over and over, their outputs deleted (``discard`` mount: freed blocks
   are trimmed, and the allocator reuses them) after each round. Alarms / hours of the loop,
   and the guest's bytes in that time (``capture.bytes_written`` of ``cdp status --json``).
   ``--nodiscard-minutes M`` adds the same loop on another fresh Disk remounted without
   ``discard`` (ext4's default): deleted files' blocks keep their content for the next file.
3. CPU. In this process, ``GroupDetector.observe`` on ``WriteRecord``s with inline data
   (a third text-like, a third random, a third zero 4 KiB blocks) covering 1 GiB
   (``--quick``: 256 MiB) of a volume, 64 KiB and 4 KiB writes (kinds mixed inside each
   record), and 1 MiB writes of one kind each (as a file's data): once with every block unseen
   (``prior`` returns b""), then twice more over the same blocks (the comparison path: the
   same data, and the data shifted by one block so a third of the blocks go text -> random),
   records 1 s apart in journal time so the scoring window stays small; the process CPU
   time of ``observe`` alone. Then the cost per record with the 10 s window holding 1k-20k
   overwrite events (a steady write rate of 100-2,000 records/s), since scoring sums the
   window on every overwrite. And the daemon's counters from the ordinary run:
   ``detector.sampled_bytes`` / ``capture.bytes_written``.

The bench runs its work in a child process of its own session; Ctrl-C (or SIGTERM) is passed
to that child as SIGINT, which unwinds every ``with corpus.Disk`` (unmount, detach the loop
device, stop nbdfuse and the daemon). The parent then looks for mounts, loop devices and
processes that still name its scratch folder (``bench/out/detector/run-PID``), removes what
it finds (by mount point, device and pid) and warns; it also prints ``mount | grep fuse``
and ``losetup -a`` as they are at the end. Results: ``bench/out/detector/results.json``
(``results-quick.json``, ``results-cpu.json`` for ``--quick`` and ``--cpu-only``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from cdp.detector import BLOCK, DetectorConfig, GroupDetector  # noqa: E402
from journal import WriteRecord  # noqa: E402
from tests.detector import corpus  # noqa: E402

OUT = ROOT / "bench" / "out" / "detector"
KINDS = ("in-place", "partial", "slow")
TTD_FLOOR_S = 10.0
CLK = os.sysconf("SC_CLK_TCK")


def say(*a: object) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------- load, CPU
def _proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v[:8])
    return total - idle, total


def _ours() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def proc_cpu(pid: int) -> float:
    """utime + stime of a live process, seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            f_ = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f_[11]) + int(f_[12])) / CLK


class Meter:
    """Wall time, our CPU (self + reaped children) and the machine's busy cores over a phase."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.busy, self.total = _proc_stat()
        self.ours = _ours()

    def done(self, extra_ours: float = 0.0) -> dict[str, float]:
        wall = time.monotonic() - self.t
        busy, _ = _proc_stat()
        busy_s = (busy - self.busy) / CLK
        ours = _ours() - self.ours + extra_ours
        return {
            "wall_s": round(wall, 1),
            "ours_cpu_s": round(ours, 1),
            "machine_busy_cores": round(busy_s / max(wall, 1e-9), 2),
            "other_cores": round(max(0.0, busy_s - ours) / max(wall, 1e-9), 2),
        }


# ---------------------------------------------------------------------- corpus helpers
def anomalies(d: corpus.Disk) -> list[dict[str, Any]]:
    doc = json.loads(d.cdp("timeline", "disk0", "--since", "24h", "--json"))
    return [c for c in doc["checkpoints"] if c["kind"] == "anomaly"]


def settle(d: corpus.Disk, limit_s: float = 30.0) -> None:
    """Wait until the detector has read what was written (its sample counter stands still)."""
    d.sync()
    time.sleep(0.5)
    end = time.monotonic() + limit_s
    last = -1
    while time.monotonic() < end:
        n = int(d.detector_stats().get("sampled", 0))
        if n == last:
            return
        last = n
        time.sleep(0.7)


def alarm_details(d: corpus.Disk, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's log line and status alert of each alarm: what the detector saw."""
    logs = []
    with contextlib.suppress(OSError):
        for line in (d.root / "daemon.log").read_text(errors="replace").splitlines():
            if "possible ransomware" in line:
                with contextlib.suppress(ValueError):
                    logs.append(json.loads(line))
    alerts = [a for a in d.status()["alerts"] if "possible ransomware" in a]
    out = []
    for c in found:
        snap = c["name"].rsplit("snapshot=", 1)[1]
        out.append(
            {
                "checkpoint": c,
                "log": [x for x in logs if x.get("snapshot") == snap],
                "alerts": [a for a in alerts if f"snapshot:{snap} " in a],
            }
        )
    return out


def guest_bytes(d: corpus.Disk) -> tuple[int, int]:
    cap = d.status()["volumes"][0]["capture"]
    return int(cap["bytes_written"]), int(cap["writes"])


def fresh_fs(d: corpus.Disk) -> None:
    assert d.loop is not None
    corpus._run(["umount", str(d.fs)])
    corpus._run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", d.loop])
    corpus._run(["mount", "-o", "discard", d.loop, str(d.fs)])


def delete_outputs(d: corpus.Disk) -> None:
    """What the ORDINARY workloads made: removed, so the next round reuses the space."""
    for name in ("usr-local", "build", "app.db", "downloads"):
        p = d.fs / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    d.sync()


def verify_restore(
    d: corpus.Disk, image: Path, before: dict[str, str], *, confirm: bool = True
) -> list[str]:
    """Victim files that do not read back from the image as they were (relative paths).

    ``confirm``: a file that differs is read once more with ``debugfs -R "cat PATH"``."""
    dump = Path(tempfile.mkdtemp(prefix="dump-", dir=d.root))
    rels = ["/" + str(Path(p).relative_to(d.fs)) for p in before]
    cmds = dump / "cmds"
    cmds.write_text("".join(f'dump "{r}" {dump}/{k}\n' for k, r in enumerate(rels)))
    subprocess.run(
        ["debugfs", "-f", str(cmds), str(image)], capture_output=True, timeout=600, check=False
    )
    bad = []
    for k, (rel, digest) in enumerate(zip(rels, before.values(), strict=True)):
        f = dump / str(k)
        if f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() == digest:
            continue
        if not confirm:
            bad.append(rel)
            continue
        data = subprocess.run(  # the test's way, for the ones that did not match
            ["debugfs", "-R", f"cat {rel}", str(image)], capture_output=True, timeout=60
        ).stdout
        if hashlib.sha256(data).hexdigest() != digest:
            bad.append(rel)
    shutil.rmtree(dump, ignore_errors=True)
    return bad


# ---------------------------------------------------------------------- 1. attacks
def attack_run(scratch: Path, kind: str, rep: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"attack-{kind}-{rep}-", dir=scratch))
    m = Meter()
    res: dict[str, Any] = {"kind": kind, "rep": rep}
    try:
        with corpus.Disk(root) as d:
            t = time.monotonic()
            corpus.age(d)
            res["age_s"] = round(time.monotonic() - t, 1)
            before = corpus.checksums(corpus.victims(d))
            time.sleep(1.0)
            t0, touched = corpus.attack(d, kind, seconds=12.0)  # as tests/detector
            res["attack_s"] = round(time.time() - t0, 1)
            res["touched"] = len(touched)
            res["victims"] = len(before)
            deadline = time.time() + 30
            found = anomalies(d)
            while not found and time.time() < deadline:
                time.sleep(0.2)
                found = anomalies(d)
            res["detected"] = bool(found)
            res["alarms"] = len(found)
            if found:
                res["ttd_s"] = round(found[0]["ts_ns"] / 1e9 - t0, 2)
                snap = found[0]["name"].rsplit("snapshot=", 1)[1]
                res["snapshot"] = snap
                res["checkpoint"] = found[0]["name"]
                snaps = {
                    s["name"]: s for s in json.loads(d.cdp("snapshot", "list", "disk0", "--json"))
                }
                res["locked"] = snaps[snap]["locked_until_ns"] > time.time_ns()
                image = root / "clean.raw"
                d.cdp("restore", "disk0", "--at", f"snapshot:{snap}", "--output", str(image))
                bad = verify_restore(d, image, before)
                image.unlink()
                res["intact"] = len(before) - len(bad)
                res["not_intact"] = bad[:20]
                # control: the same check on the latest point finds the files the attack hit
                d.cdp("restore", "disk0", "--at", "latest", "--output", str(image))
                res["latest_differ"] = len(verify_restore(d, image, before, confirm=False))
                image.unlink()
                res["details"] = alarm_details(d, found[:1])[0]["log"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["meter"] = m.done()
    return res


# ---------------------------------------------------------------------- 2. ordinary corpus
class Stepper:
    """Runs workloads on a disk; after each, the alarms it raised (once the detector caught up)."""

    def __init__(self, d: corpus.Disk) -> None:
        self.d = d
        self.seen = len(anomalies(d))

    def step(self, name: str, fn: Callable[[corpus.Disk], None], rows: list[Any]) -> None:
        d = self.d
        b0, _ = guest_bytes(d)
        t = time.monotonic()
        fn(d)
        settle(d)
        found = anomalies(d)
        new = found[self.seen :]
        self.seen = len(found)
        b1, _ = guest_bytes(d)
        row = {
            "workload": name,
            "wall_s": round(time.monotonic() - t, 1),
            "guest_bytes": b1 - b0,
            "alarms": len(new),
        }
        if new:
            row["details"] = alarm_details(d, new)
            say(f"  FALSE ALARM on {name!r}: {json.dumps(row['details'])[:3000]}")
        rows.append(row)
        say(f"  {name}: {row['alarms']} alarms, {row['guest_bytes'] / 2**20:.1f} MiB")


def loop(st: Stepper, minutes: float) -> dict[str, Any]:
    """``corpus.age`` once, then ORDINARY round after round, outputs deleted after each."""
    d = st.d
    assert d.daemon is not None
    pid = d.daemon.pid
    lm = Meter()
    cpu0 = proc_cpu(pid)
    b0, w0 = guest_bytes(d)
    s0 = d.detector_stats()
    t0 = time.monotonic()
    rows: list[Any] = []
    st.step("age", corpus.age, rows)
    rounds = 0
    while time.monotonic() - t0 < minutes * 60:
        for name, fn in corpus.ORDINARY.items():
            st.step(name, fn, rows)
            if time.monotonic() - t0 >= minutes * 60:
                break
        else:
            rounds += 1
            st.step("delete outputs", delete_outputs, rows)
    wall = time.monotonic() - t0
    b1, w1 = guest_bytes(d)
    s1 = d.detector_stats()
    dcpu = proc_cpu(pid) - cpu0
    alarms = sum(r["alarms"] for r in rows)
    return {
        "wall_s": round(wall, 1),
        "hours": wall / 3600,
        "full_rounds": rounds,
        "steps": len(rows),
        "alarms": alarms,
        "alarms_per_hour": alarms / (wall / 3600),
        "guest_bytes": b1 - b0,
        "guest_writes": w1 - w0,
        "sampled_bytes": s1["sampled_bytes"] - s0["sampled_bytes"],
        "daemon_cpu_s": round(dcpu, 1),
        "alarm_rows": [r for r in rows if r["alarms"]],
        "meter": lm.done(extra_ours=dcpu),
    }


def counters(d: corpus.Disk) -> dict[str, Any]:
    b, w = guest_bytes(d)
    st = d.detector_stats()
    return {
        "bytes_written": b,
        "writes": w,
        "sampled": st["sampled"],
        "sampled_bytes": st["sampled_bytes"],
        "alarms": st["alarms"],
    }


def ordinary(scratch: Path, minutes: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ordinary-", dir=scratch))
    out: dict[str, Any] = {"workloads": [], "loop": {}}
    m = Meter()
    try:
        with corpus.Disk(root) as d:
            st = Stepper(d)
            st.step("age (the used file system)", corpus.age, out["workloads"])
            for name, fn in corpus.ORDINARY.items():
                st.step(name, fn, out["workloads"])
            st.step("fresh file system", fresh_fs, out["workloads"])
            say(f"  loop: {minutes:g} min of ordinary writes on the fresh file system")
            out["loop"] = loop(st, minutes)
            out["daemon_counters"] = counters(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["meter"] = m.done()
    return out


def nodiscard(scratch: Path, minutes: float) -> dict[str, Any]:
    """The same loop with the file system remounted without ``discard`` (ext4's default):
    freed blocks keep their old content, so new files land on what deleted ones held."""
    root = Path(tempfile.mkdtemp(prefix="nodiscard-", dir=scratch))
    m = Meter()
    try:
        with corpus.Disk(root) as d:
            assert d.loop is not None
            corpus._run(["mount", "-o", "remount,nodiscard", d.loop, str(d.fs)])
            say(f"  loop: {minutes:g} min of ordinary writes, mounted without discard")
            out = {"loop": loop(Stepper(d), minutes), "daemon_counters": counters(d)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["meter"] = m.done()
    return out


# ---------------------------------------------------------------------- 3. CPU
def _text(rng: random.Random, n: int) -> bytes:
    vocab = (
        b"invoice customer order total amount paid due date account report quarter revenue "
        b"the a of and to in is for on with as by at from project meeting notes draft final "
        b"2026 11 12 01 EUR USD 1500.00 42 7 delivered pending shipped refund"
    ).split()
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(vocab) for _ in range(12)) + b".\n"
        out += str(rng.randrange(10**6)).encode() + b";"
    return bytes(out[:n])


WRAP = 1 << 20  # the pool's tail repeats its head: a record's slice never crosses the end


def make_pool(blocks: int = 4096, run: int = 1) -> bytes:
    """``blocks`` 4 KiB blocks cycling text, random, zeros every ``run`` blocks (+ ``WRAP``)."""
    rng = random.Random(7)
    text = _text(rng, 8 << 20)
    parts = []
    for i in range(blocks):
        k = (i // run) % 3
        if k == 0:
            a = rng.randrange(0, len(text) - BLOCK)
            parts.append(text[a : a + BLOCK])
        elif k == 1:
            parts.append(rng.randbytes(BLOCK))
        else:
            parts.append(bytes(BLOCK))
    pool = b"".join(parts)
    return pool + pool[:WRAP]


class Feed:
    """Writes covering a volume in order, data from the pool; seq and ts carried across passes."""

    def __init__(self, pool: bytes) -> None:
        self.pool = memoryview(pool)
        self.plen = len(pool) - WRAP
        self.seq = 0
        self.ts = 10**18

    def records(
        self, size: int, n: int, dt_ns: int, shift: int = 0, start: int = 0, batch: int = 4096
    ) -> Iterator[list[WriteRecord]]:
        """``n`` writes of ``size`` from write number ``start`` on (offset ``start * size``)."""
        i = start
        while i < start + n:
            recs = []
            for j in range(i, min(start + n, i + batch)):
                off = j * size
                p = (off + shift) % self.plen
                self.seq += 1
                self.ts += dt_ns
                recs.append(
                    WriteRecord(self.seq, self.ts, "disk0", off, size, self.pool[p : p + size])
                )
            i += len(recs)
            yield recs


class EmptyPrior:
    """The journal read for blocks the detector has not seen: here they held nothing."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, volume: str, offset: int, length: int, seq: int) -> bytes:
        self.calls += 1
        return b""


def timed_observe(det: GroupDetector, batches: Iterator[list[WriteRecord]]) -> tuple[float, int]:
    cpu = 0.0
    n = 0
    for recs in batches:
        t = time.process_time()
        det.observe(recs)
        cpu += time.process_time() - t
        n += len(recs)
    return cpu, n


def cpu_part(total: int, windows: list[int], measure: int) -> dict[str, Any]:
    pools = {1: make_pool(), 256: make_pool(run=256)}
    out: dict[str, Any] = {"bytes": total, "sizes": {}}
    m = Meter()
    # 64 KiB and 4 KiB records mix text, random and zero blocks inside one record (the
    # detector samples every block of those); 1 MiB records hold one kind each, as a file's
    # data does (4 spread samples stand for the whole record)
    for size, run in ((64 << 10, 1), (4 << 10, 1), (1 << 20, 256)):
        pool = pools[run]
        n = total // size
        prior = EmptyPrior()
        feed = Feed(pool)
        det = GroupDetector(64 << 10, DetectorConfig(), prior)
        sec = 10**9  # records 1 s apart: the window holds ~10 events
        unseen, _ = timed_observe(det, feed.records(size, n, sec))
        same, _ = timed_observe(det, feed.records(size, n, sec))
        rotated, _ = timed_observe(det, feed.records(size, n, sec, shift=BLOCK))
        gib = total / 2**30
        row: dict[str, Any] = {
            "records": n,
            "unseen_cpu_s_per_gib": unseen / gib,
            "seen_same_cpu_s_per_gib": same / gib,
            "seen_rotated_cpu_s_per_gib": rotated / gib,
            "rotated_detections": len(det.detections),
            "prior_calls": prior.calls,
            "sampled_bytes_fraction": det.sampled_bytes / (3 * total),
            "window": [],
        }
        # the window's share: W overwrite events within 10 s of journal time
        for w in windows:
            feed = Feed(pool)
            det = GroupDetector(64 << 10, DetectorConfig(), prior)
            dt = 10 * 10**9 // w  # w records per 10 s: the window holds w events once full
            timed_observe(det, feed.records(size, w + 3 * measure, dt))  # unseen: the map
            timed_observe(det, feed.records(size, w, dt))  # overwrites: the window fills
            pers = []  # then 3 stretches of `measure` overwrites, the window full: median
            for k in range(3):
                start = w + k * measure
                cpu, got = timed_observe(
                    det, feed.records(size, measure, dt, start=start, batch=256)
                )
                pers.append(cpu / got)
            per = statistics.median(pers)
            row["window"].append(
                {
                    "events": w,
                    "records_per_s": w / 10,
                    "guest_MBps": w / 10 * size / 1e6,
                    "window_len": len(det.window),
                    "us_per_record": per * 1e6,
                    "us_per_record_3": [round(x * 1e6, 1) for x in pers],
                    "cpu_s_per_gib": per * (2**30 / size),
                    "cpu_s_per_s": per * w / 10,
                    "records_per_cpu_s": 1 / per,  # at this window: one core's rate
                }
            )
        # cost per record = a + c * rate (the window holds ~10 s of overwrite events);
        # the rate one core keeps up with: r (a + c r) = 1
        xs = [p["records_per_s"] for p in row["window"]]
        ys = [p["us_per_record"] / 1e6 for p in row["window"]]
        if len(xs) >= 2:
            c_, a_ = statistics.linear_regression(xs, ys)
            row["fit_a_us"] = a_ * 1e6
            row["fit_c_us_per_record_per_s"] = c_ * 1e6
            row["flat"] = c_ * max(xs) < 0.1 * a_  # cost does not grow with the rate
            if c_ > 0 and not row["flat"]:
                r = (-a_ + (a_ * a_ + 4 * c_) ** 0.5) / (2 * c_)
                row["max_records_per_s_one_core"] = r
                row["max_MBps_one_core"] = r * size / 1e6
        out["sizes"][str(size)] = row
        say(f"  {size >> 10} KiB: {json.dumps(row)}")
    out["meter"] = m.done()
    return out


# ---------------------------------------------------------------------- report
def report_loop(what: str, o: dict[str, Any]) -> None:
    lp = o.get("loop")
    if lp:
        say(
            f"{what}: {lp['wall_s'] / 60:.1f} min, {lp['full_rounds']} full rounds, "
            f"{lp['alarms']} alarms = {lp['alarms_per_hour']:.2f}/h, guest "
            f"{lp['guest_bytes'] / 2**30:.2f} GiB in {lp['guest_writes']} writes, daemon CPU "
            f"{lp['daemon_cpu_s']} s, {lp['meter']}"
        )
    c = o.get("daemon_counters")
    if c:
        say(
            f"  daemon counters: bytes_written {c['bytes_written']}, writes {c['writes']} "
            f"(mean {c['bytes_written'] / max(1, c['writes']) / 1024:.1f} KiB), sampled_bytes "
            f"{c['sampled_bytes']} = {c['sampled_bytes'] / max(1, c['bytes_written']):.3f} "
            f"of written, alarms {c['alarms']}"
        )


def report(res: dict[str, Any]) -> None:
    say("\n==================== results ====================")
    say(f"commit {res['commit']}  {res['command']}")
    if "attacks" in res:
        say("\n| attack | runs | detected | time-to-detect median / max | clean point intact |")
        say("|---|---|---|---|---|")
        for kind in KINDS:
            rs = [r for r in res["attacks"] if r["kind"] == kind]
            if not rs:
                continue
            det = sum(1 for r in rs if r.get("detected"))
            tt = [r["ttd_s"] for r in rs if "ttd_s" in r]
            ttd = f"{statistics.median(tt):.2f} / {max(tt):.2f} s" if tt else "-"
            intact = ", ".join(
                f"{r.get('intact', 0)}/{r.get('victims', '?')}" for r in rs if r.get("detected")
            )
            say(f"| {kind} | {len(rs)} | {det}/{len(rs)} | {ttd} | {intact or '-'} |")
        for r in res["attacks"]:
            say(
                f"  {r['kind']} #{r['rep']}: detected={r.get('detected')} ttd={r.get('ttd_s')}"
                f" touched={r.get('touched')} attack_s={r.get('attack_s')} alarms="
                f"{r.get('alarms')} intact={r.get('intact')}/{r.get('victims')}"
                f" locked={r.get('locked')} latest_differ={r.get('latest_differ')} {r['meter']}"
            )
    if "ordinary" in res:
        o = res["ordinary"]
        say("\n| workload | guest MiB | false alarms |")
        say("|---|---|---|")
        for w in o["workloads"]:
            say(f"| {w['workload']} | {w['guest_bytes'] / 2**20:.0f} | {w['alarms']} |")
        report_loop("loop", o)
    if "nodiscard" in res:
        report_loop("loop without discard", res["nodiscard"])
    if "cpu" in res:
        say("\nCPU-s/GiB, records 1 s apart (small window)")
        say("| write size | unseen | seen, same data | seen, kinds rotated |")
        say("|---|---|---|---|")
        for size, row in res["cpu"]["sizes"].items():
            say(
                f"| {int(size) >> 10} KiB | {row['unseen_cpu_s_per_gib']:.2f} | "
                f"{row['seen_same_cpu_s_per_gib']:.2f} | {row['seen_rotated_cpu_s_per_gib']:.2f} |"
            )
            for p in row["window"]:
                say(
                    f"    window {p['window_len']} events ({p['records_per_s']:.0f} rec/s, "
                    f"{p['guest_MBps']:.1f} MB/s): {p['us_per_record']:.0f} us/record, "
                    f"{p['cpu_s_per_gib']:.1f} CPU-s/GiB, {p['cpu_s_per_s']:.2f} cores, "
                    f"{p['records_per_cpu_s']:.0f} records per CPU-s"
                )
            if row.get("flat"):
                say("    the cost per record does not grow with the write rate (within 10 %)")
            if "max_records_per_s_one_core" in row:
                say(
                    f"    fit: {row['fit_a_us']:.1f} us + {row['fit_c_us_per_record_per_s']:.3f}"
                    f" us x records/s; extrapolated, one core keeps up to "
                    f"{row['max_records_per_s_one_core']:.0f} overwrite records/s "
                    f"({row['max_MBps_one_core']:.1f} MB/s)"
                )
        say(f"  {res['cpu']['meter']}")
    say(f"\nload average at start {res['loadavg_start']}, end {res.get('loadavg_end')}")


def code_sha() -> str:
    """Digest of the code the daemons run (they import the working tree when they start)."""
    h = hashlib.sha256()
    for top in ("cdp", "journal", "tests/detector"):
        for p in sorted((ROOT / top).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def worker(args: argparse.Namespace) -> int:
    scratch = Path(args.scratch)
    res: dict[str, Any] = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "command": " ".join(["bench/detector_bench.py", *args.argv]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    res["code_sha_start"] = code_sha()
    t0 = time.monotonic()
    try:
        why = corpus.available()
        if why and not args.cpu_only:
            say(f"cannot make a disk here: {why}")
            return 2
        if not args.cpu_only:
            res["attacks"] = []
            for rep in range(1, args.reps + 1):
                for kind in KINDS:
                    say(f"attack {kind} #{rep} ...")
                    r = attack_run(scratch, kind, rep)
                    res["attacks"].append(r)
                    say(
                        f"  detected={r.get('detected')} ttd={r.get('ttd_s')} "
                        f"intact={r.get('intact')}/{r.get('victims')} {r['meter']}"
                    )
            say("ordinary corpus ...")
            res["ordinary"] = ordinary(scratch, args.minutes)
            if args.nodiscard_minutes > 0:
                say("ordinary loop without discard ...")
                res["nodiscard"] = nodiscard(scratch, args.nodiscard_minutes)
        say("CPU per GiB (in process) ...")
        windows = [1000, 10000] if args.quick else [1000, 5000, 10000, 20000]
        res["cpu"] = cpu_part(args.cpu_mib << 20, windows, 1000 if args.quick else 2000)
    except KeyboardInterrupt:
        say("interrupted: partial results")
        res["interrupted"] = True
    finally:
        res["total_s"] = round(time.monotonic() - t0, 1)
        res["code_sha_end"] = code_sha()
        if res["code_sha_end"] != res["code_sha_start"]:
            say(
                "WARNING: cdp/, journal/ or tests/detector/ changed during the run (daemons "
                "started later ran the new code); the figures mix two versions"
            )
        res["loadavg_end"] = os.getloadavg()
        OUT.mkdir(parents=True, exist_ok=True)
        name = "results-cpu.json" if args.cpu_only else "results.json"
        name = name.replace(".json", "-quick.json") if args.quick else name
        if res.get("interrupted"):  # never over the last complete run's file
            name = name.replace(".json", "-interrupted.json")
        (OUT / name).write_text(json.dumps(res, indent=1, default=str))
        report(res)
        say(f"total {res['total_s']} s; results in {OUT / name}")
    return 130 if res.get("interrupted") else 0


# ---------------------------------------------------------------------- parent: cleanup
def leftovers(scratch: Path) -> tuple[list[str], list[str], list[int]]:
    """Mount points, loop devices and pids that still name our scratch folder."""
    s = str(scratch)
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and s in parts[1]:
                mounts.append(parts[1])
    loops = []
    p = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    for line in p.stdout.splitlines():
        if s in line:
            loops.append(line.split(":", 1)[0])
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if s.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
    return mounts, loops, pids


def clean_up(scratch: Path) -> None:
    mounts, loops, pids = leftovers(scratch)
    if mounts or loops or pids:
        say(f"WARNING: left behind: mounts {mounts}, loop devices {loops}, pids {pids}; removing")
        for mp in sorted(mounts, key=len, reverse=True):  # the ext4 (inside) before the fuse
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(2)
        for pid in leftovers(scratch)[2]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mounts, loops, pids = leftovers(scratch)
        if mounts or loops or pids:
            say(f"WARNING: still left: mounts {mounts}, loop devices {loops}, pids {pids}")
    if not mounts:
        # a worker that died without unwinding leaves its Disks' socket folders in /tmp
        for cfg in scratch.rglob("cdp.toml"):
            with contextlib.suppress(OSError, IndexError):
                sock = Path(cfg.read_text().split('api = "unix:', 1)[1].split('"', 1)[0])
                if sock.parent.name.startswith("cdp-det-"):
                    shutil.rmtree(sock.parent, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    fuse = [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if "fuse" in ln]
    loop = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    say(f"at the end: mount | grep fuse: {len(fuse)} lines; losetup -a: {len(loop.splitlines())}")
    for ln in fuse + loop.splitlines():
        say(f"  {ln}  {'(ours!)' if str(scratch) in ln else '(not this run)'}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run per attack, 3 min loop, 256 MiB")
    ap.add_argument("--minutes", type=float, default=None, help="ordinary loop (default 10)")
    ap.add_argument(
        "--nodiscard-minutes",
        type=float,
        default=0.0,
        help="also the loop on a mount without discard (default 0: off)",
    )
    ap.add_argument("--reps", type=int, default=None, help="runs per attack (default 3)")
    ap.add_argument("--cpu-mib", type=int, default=None, help="CPU part volume (default 1024)")
    ap.add_argument("--cpu-only", action="store_true", help="only part 3 (no disks)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    args.minutes = args.minutes if args.minutes is not None else (3.0 if args.quick else 10.0)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.cpu_mib = args.cpu_mib if args.cpu_mib is not None else (256 if args.quick else 1024)
    if args.worker:
        # Ctrl-C arrives as SIGINT from the parent (SIGTERM too, should someone send one):
        # KeyboardInterrupt unwinds the disks. Set explicitly: a shell starts background jobs
        # with SIGINT ignored, and Python then keeps it ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        args.argv = [a for a in argv if a != "--worker" and not a.startswith("--scratch")]
        return worker(args)

    scratch = OUT / f"run-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, __file__, *argv, "--worker", f"--scratch={scratch}"],
        start_new_session=True,  # a terminal's Ctrl-C reaches only us; we pass it on, once
    )
    hits = [0]

    def forward(signum: int, frame: object) -> None:
        hits[0] += 1
        if hits[0] == 1:
            say("\nstopping: the worker unwinds its disks (unmount, detach, stop daemons) ...")
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGINT)
        else:
            say("still cleaning up, please wait")

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        clean_up(scratch)
    return rc


if __name__ == "__main__":
    sys.exit(main())
