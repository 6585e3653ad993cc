#!/usr/bin/env python3
"""Replication benchmark (issue 5): bytes on the wire and RPO lag, next to rsync, borg, restic.

    .venv/bin/python bench/replication_bench.py              # 2 GiB image, 30 s lag phases
    .venv/bin/python bench/replication_bench.py --quick      # 1 GiB image, 20 s / 15 s phases
    .venv/bin/python bench/replication_bench.py --size 4GiB  # another image size

Part 1, a change series on an ext4 disk image (everything generated at run time from a fixed
seed; scratch under ``bench/out/replication/``, gitignored):

0. ``initial sync``: ``mkfs.ext4 -d`` of a generated tree (text, source code, logs, small
   config files, binaries, compressed archives, random media, a 90 MiB database-like file).
   Written into the primary journal as onboarding does (every non-zero 64 KiB chunk).
a. ``packages added``: ~12 MiB of new files in new directories (``debugfs -w``: mkdir, write).
b. ``scattered edits, deletes, appends``: 200 config files and 60 source files edited in
   place, 25 logs appended to in place, 70 files deleted. In place means what a program that
   opens a file read-write does: same inode and blocks, blocks added at the end or released
   (``debugfs -w``: ``bmap -a``, ``punch``, ``sif size/mtime``), and the data blocks whose
   content changed written into the image; deletes are ``debugfs rm``.
c. ``big file shifted``: the 90 MiB file rewritten in place with 5 bytes inserted at offset
   3000 (every block after it changes; one block is added at the end).

Per step the image is compared with the previous one at 4 KiB granularity; the changed blocks,
adjacent ones merged (up to 1 MiB, 64 ops per ``write_many`` as the NBD splitter batches), are
written into a primary ``journal.Journal`` and shipped by a real ``replicator.sender.Sender``
(default ``Target``: zstd level 3, no cap) to ``cdp replica serve`` (a subprocess) through a
byte-counting TCP proxy (another process) on loopback. The receiver keeps its state across
steps. CPU is process CPU time (``os.times`` for the sender's process, ``/proc/PID/stat`` for
the receiver) over the shipping phase only. After each step the primary journal is compared
with the image, and the replica's per-chunk BLAKE3 (``GET digest``) with the image's.

Peers on the same image file, same invocation: ``rsync --no-whole-file --inplace --stats``
and the same with ``-z`` (to a destination copy of the previous image; sent + received),
``borg create`` (1.2, ``--encryption=none``, default chunker and lz4: ``deduplicated_size``),
``restic backup`` (repo v2, default compression: ``data_added``, which restic 0.14 reports
uncompressed, and the repository's growth on disk). Also zstd -3 of the written blocks: one
frame per step, and one frame per 4 KiB block.

Part 2, RPO lag (same receiver, group ``rpo``, ``Target.bandwidth`` = 12,500,000 B/s): a
steady writer of random 64 KiB writes at 5 MB/s for 30 s (``--quick``: 20 s) plus a probe
writing a 4 KiB timestamped block every 200 ms at a fixed offset; a poller asks the receiver
for its durable seq every 10 ms, and a probe has arrived when that seq reaches the probe's
seq (the probe's content at that seq is checked afterwards through ``GET digest``). Then the
writer runs at 25 MB/s for 30 s (``--quick``: 15 s), stops, and the time until the sender's
acked seq equals the primary's last seq is the drain time; the proxy's byte count over 10 s
windows gives the shipping rate against the cap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402
import blake3  # noqa: E402
import zstandard  # noqa: E402

from journal import Journal  # noqa: E402
from replicator.digest import chunk_digests  # noqa: E402
from replicator.sender import Sender, Target  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
BLOCK = 4096
CHUNK = 64 * KiB  # the journal's default chunk size (and the digest granularity)
MAX_IO = 1 * MiB  # largest merged guest write
OPS_PER_BATCH = 64  # writes per write_many, as the NBD splitter batches a burst
TOKEN = "replication-bench-token-6c1f0e"
VOL = "disk0"
SEED = 20240505
BIG_FILE = "/srv/db/big.dat"
BIG_SIZE = 90 * MiB
LINK = 12_500_000  # "100Mbit"


def log(msg: str) -> None:
    print(msg, flush=True)


def now() -> float:
    return time.perf_counter()


def mib(n: float) -> float:
    return n / MiB


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def tree_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_size
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=900, **kw)


# ---------------------------------------------------------------------------- content
class Gen:
    """Deterministic file content: prose, source code, logs, configs, binaries, archives."""

    LETTERS = "etaoinshrdlucmfwypvbgkjqxz"

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        r = self.r
        self.vocab = [
            "".join(r.choices(self.LETTERS, k=r.choice((1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 11))))
            for _ in range(30_000)
        ]
        self.cw = list(itertools.accumulate(1 / (i + 1) ** 1.05 for i in range(len(self.vocab))))
        self.idents = [w for w in self.vocab[200:6000] if len(w) > 2]
        # a skewed byte distribution: what executables and libraries look like to a compressor
        table = bytearray(256)
        common = [0, 0, 0, 0, 0xFF, 0x48, 0x89, 0x8B, 0x24, 0xE8, 0x01, 0x00, 0x0F, 0x85, 0x45]
        for i in range(256):
            table[i] = common[i % len(common)] if i < 128 else r.randrange(256)
        self.skew = bytes(table)

    def words(self, n: int) -> list[str]:
        return self.r.choices(self.vocab, cum_weights=self.cw, k=n)

    def text(self, n: int) -> bytes:
        out: list[bytes] = []
        have = 0
        while have < n:
            w = self.words(min(200_000, n // 5 + 16))
            lines = [" ".join(w[i : i + 12]) for i in range(0, len(w), 12)]
            b = ("\n".join(lines) + "\n").encode()
            out.append(b)
            have += len(b)
        return b"".join(out)[:n]

    def code(self, n: int) -> bytes:
        r, ids = self.r, self.idents
        tpl = (
            "def {a}_{b}({c}, {d}=None):",
            "    {a} = {b}.{c}({d}, {n})",
            "    if {a} > {n}:",
            "        return {b}_{c}",
            "    for {a} in range({n}):",
            "        {a}.append({b}[{c}])",
            "# {t}",
            "class {A}{B}({C}):",
            "    self.{a} = {b}",
            '    raise {A}Error("{t}")',
            "",
            "import {a}.{b}",
            "from {a} import {b}, {c}",
            "    {a}: dict[str, int] = {{}}",
        )
        lines: list[str] = []
        have = 0
        while have < n:
            a, b, c, d = r.choices(ids, k=4)
            t = " ".join(self.words(r.randrange(3, 9)))
            s = r.choice(tpl).format(
                a=a,
                b=b,
                c=c,
                d=d,
                n=r.randrange(1000),
                t=t,
                A=a.capitalize(),
                B=b.capitalize(),
                C=c.capitalize(),
            )
            lines.append(s)
            have += len(s) + 1
        return ("\n".join(lines) + "\n").encode()[:n]

    def log_lines(self, n: int, t0: int) -> bytes:
        r = self.r
        lines = []
        have = 0
        t = t0
        while have < n:
            t += r.randrange(1, 5000)
            svc = r.choice(("sshd", "nginx", "postgres", "cron", "kernel", "app"))
            lvl = r.choice(("INFO", "INFO", "INFO", "WARN", "DEBUG", "ERROR"))
            msg = " ".join(self.words(r.randrange(4, 12)))
            s = (
                f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t // 1000))}.{t % 1000:03d}Z "
                f"host1 {svc}[{r.randrange(100, 30000)}]: {lvl} {msg} id={r.getrandbits(32):08x} "
                f"ms={r.randrange(1, 900)}"
            )
            lines.append(s)
            have += len(s) + 1
        return ("\n".join(lines) + "\n").encode()[:n]

    def config(self, n: int) -> bytes:
        r = self.r
        lines = [f"# {' '.join(self.words(6))}"]
        have = len(lines[0])
        sec = 0
        while have < n:
            if r.random() < 0.1:
                sec += 1
                s = f"[{r.choice(self.idents)}{sec}]"
            else:
                s = f"{r.choice(self.idents)}_{r.choice(self.idents)} = {r.randrange(100000)}"
            lines.append(s)
            have += len(s) + 1
        return ("\n".join(lines) + "\n").encode()

    def binary(self, n: int) -> bytes:
        """Executable-like: skewed bytes, embedded strings, some zero padding."""
        r = self.r
        out = []
        have = 0
        while have < n:
            k = r.random()
            m = r.randrange(512, 16 * KiB)
            if k < 0.6:
                out.append(r.randbytes(m).translate(self.skew))
            elif k < 0.8:
                out.append(self.text(m // 4).replace(b" ", b"\0"))
            elif k < 0.9:
                out.append(bytes(m // 2))
            else:
                out.append(r.randbytes(m))
            have += len(out[-1])
        return b"".join(out)[:n]

    def compressed(self, n: int) -> bytes:
        """A real deflate stream (like .gz/.deb/.jar payloads): about incompressible."""
        out = []
        have = 0
        while have < n:
            raw = self.binary(min(n - have, 4 * MiB) * 5 // 4 + 4096)
            out.append(zlib.compress(raw, 6))
            have += len(out[-1])
        return b"".join(out)[:n]

    def random(self, n: int) -> bytes:
        return self.r.randbytes(n)

    def database(self, n: int) -> bytes:
        """Pages of rows: text fields, integers, some blobs (a database or VM-ish file)."""
        r = self.r
        out = []
        have = 0
        while have < n:
            k = r.random()
            if k < 0.45:
                out.append(self.text(64 * KiB))
            elif k < 0.75:
                out.append(self.binary(64 * KiB))
            elif k < 0.85:
                rows = b"".join(
                    struct.pack("<QIId", i, r.getrandbits(32), r.randrange(1000), r.random())
                    for i in range(64 * KiB // 24)
                )
                out.append(rows.ljust(64 * KiB, b"\0"))
            else:
                out.append(r.randbytes(64 * KiB))
            have += len(out[-1])
        return b"".join(out)[:n]

    def size(self, median: int, lo: int, hi: int) -> int:
        return int(min(hi, max(lo, self.r.lognormvariate(0, 1.1) * median)))


@dataclass
class Tree:
    """The image's files as a host directory: the model every step edits, then applies."""

    root: str
    gen: Gen
    files: dict[str, str] = field(default_factory=dict)  # fs path -> kind

    def host(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def put(self, path: str, data: bytes, kind: str) -> None:
        h = self.host(path)
        os.makedirs(os.path.dirname(h), exist_ok=True)
        with open(h, "wb") as f:
            f.write(data)
        self.files[path] = kind

    def read(self, path: str) -> bytes:
        with open(self.host(path), "rb") as f:
            return f.read()

    def remove(self, path: str) -> None:
        os.remove(self.host(path))
        del self.files[path]

    def of_kind(self, kind: str) -> list[str]:
        return sorted(p for p, k in self.files.items() if k == kind)


def build_tree(t: Tree, scale: float) -> None:
    g = t.gen

    def fill(prefix: str, kind: str, total: int, median: int, lo: int, hi: int, ext: str) -> None:
        have = 0
        k = 0
        while have < total:
            n = g.size(median, lo, hi)
            d = f"{prefix}/{g.r.choice(g.idents)}{k % 37}"
            name = f"{d}/{g.r.choice(g.idents)}_{k}{ext}"
            data = {
                "doc": g.text,
                "src": g.code,
                "bin": g.binary,
                "arc": g.compressed,
                "media": g.random,
                "etc": g.config,
            }[kind](n)
            t.put(name, data, kind)
            have += len(data)
            k += 1

    fill("/usr/share/doc", "doc", int(150 * MiB * scale), 24 * KiB, 200, 2 * MiB, ".txt")
    fill("/home/user/src/project", "src", 6 * MiB, 6 * KiB, 200, 120 * KiB, ".py")
    fill("/usr/lib/bin", "bin", int(80 * MiB * scale), 200 * KiB, 4 * KiB, 6 * MiB, ".so")
    fill("/var/cache/archives", "arc", int(80 * MiB * scale), 300 * KiB, 4 * KiB, 8 * MiB, ".gz")
    fill("/home/user/media", "media", int(90 * MiB * scale), 900 * KiB, 8 * KiB, 8 * MiB, ".jpg")
    fill("/etc", "etc", 1 * MiB, 1500, 300, 8 * KiB, ".conf")
    t0 = 1_700_000_000_000
    for k in range(30):
        t.put(f"/var/log/svc{k}.log", g.log_lines(g.size(200 * KiB, 8 * KiB, 3 * MiB), t0), "log")
    t.put(BIG_FILE, g.database(BIG_SIZE), "db")


# ---------------------------------------------------------------------------- image steps
def mkfs(tree: Tree, img: str, size: int) -> None:
    with open(img, "wb") as f:
        f.truncate(size)
    uuid = "5e1ec7ed-0000-4000-8000-00000000b005"
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-U",
            uuid,
            "-E",
            f"hash_seed={uuid}",
            "-L",
            "benchdisk",
            "-d",
            tree.root,
            img,
        ],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )


def debugfs(img: str, cmds: list[str], work: str, *, write: bool = True) -> list[list[str]]:
    """One debugfs session over a command file; returns each command's output lines."""
    path = os.path.join(work, "debugfs.cmd")
    with open(path, "w") as f:
        f.write("\n".join(cmds) + "\n")
    p = run(["debugfs", *(["-w"] if write else []), "-f", path, img])
    errs = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if errs:
        raise RuntimeError(f"debugfs failed: {errs[:5]}")
    outs: list[list[str]] = []
    for ln in p.stdout.splitlines():
        if ln.startswith("debugfs: "):
            outs.append([])
        elif outs:
            outs[-1].append(ln)
    if len(outs) != len(cmds):
        raise RuntimeError(f"debugfs ran {len(outs)} of {len(cmds)} commands")
    return outs


def fsck(img: str) -> None:
    p = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"e2fsck after the step: {p.stdout[-2000:]}")


def check_files(t: Tree, img: str, work: str, paths: list[str]) -> None:
    """The file system in the image holds what the model says (debugfs dump, compared)."""
    out = os.path.join(work, "dump")
    os.makedirs(out, exist_ok=True)
    debugfs(img, [f"dump {p} {out}/{k}" for k, p in enumerate(paths)], work, write=False)
    for k, p in enumerate(paths):
        with open(f"{out}/{k}", "rb") as f:
            if f.read() != t.read(p):
                raise RuntimeError(f"{p} in the image differs from the model")
    shutil.rmtree(out)


def rewrite_in_place(
    t: Tree, img: str, work: str, new: dict[str, bytes], first: list[str] | None = None
) -> int:
    """Files rewritten in place, as a program that opens them read-write and writes does:
    same inode and blocks; a block is allocated (``bmap -a``) where non-zero data lands on a
    hole or past the end, blocks past the new end are released (``punch``), size and mtime
    are set (``sif``), and only the blocks whose content changed are written into the image
    (what writeback of the dirty pages writes). ``first``: debugfs commands to run first
    (rm). Returns the data blocks written."""

    def mapping(q: list[tuple[str, int]]) -> list[int]:
        outs = debugfs(img, [f"bmap {p} {b}" for p, b in q], work, write=False)
        return [int(o[0].split()[0]) for o in outs]

    old_q = [(p, b) for p in new for b in range(-(-os.path.getsize(t.host(p)) // BLOCK))]
    old = dict(zip(old_q, mapping(old_q), strict=True))
    zero = bytes(BLOCK)
    cmds = list(first or [])
    new_q: list[tuple[str, int]] = []
    for path, data in new.items():
        old_n = -(-os.path.getsize(t.host(path)) // BLOCK)
        new_n = -(-len(data) // BLOCK)
        for b in range(new_n):
            new_q.append((path, b))
            nonzero = data[b * BLOCK : (b + 1) * BLOCK].rstrip(b"\0") != b""
            if old.get((path, b), 0) == 0 and nonzero:
                cmds.append(f"bmap -a {path} {b}")
        if new_n < old_n:
            cmds.append(f"punch {path} {new_n}")
        cmds += [f"sif {path} size {len(data)}", f"sif {path} mtime @1700200000"]
    debugfs(img, cmds, work)
    written = 0
    with open(img, "r+b") as f:
        for (path, b), pb in zip(new_q, mapping(new_q), strict=True):
            want = new[path][b * BLOCK : (b + 1) * BLOCK].ljust(BLOCK, b"\0")
            if pb == 0:
                if want != zero:
                    raise RuntimeError(f"{path}: block {b} not allocated")
                continue
            if os.pread(f.fileno(), BLOCK, pb * BLOCK) != want:
                os.pwrite(f.fileno(), want, pb * BLOCK)
                written += 1
    for path, data in new.items():
        t.put(path, data, t.files[path])
    return written


def step_packages(t: Tree, img: str, work: str) -> str:
    g = t.gen
    cmds = ["mkdir /usr/lib/pkgs"]
    total = 0
    k = 0
    while total < 12 * MiB:
        name = f"{g.r.choice(g.idents)}-{k}.{g.r.randrange(10)}"
        d = f"/usr/lib/pkgs/{name}"
        cmds += [f"mkdir {d}", f"mkdir {d}/lib"]
        parts: list[tuple[str, bytes, str]] = [
            (f"{d}/README", g.text(g.size(4 * KiB, 500, 30 * KiB)), "doc"),
            (f"{d}/METADATA", g.config(g.size(1 * KiB, 200, 4 * KiB)), "etc"),
        ]
        for m in range(g.r.randrange(3, 9)):
            parts.append(
                (
                    f"{d}/lib/{g.r.choice(g.idents)}{m}.py",
                    g.code(g.size(12 * KiB, 1 * KiB, 80 * KiB)),
                    "src",
                )
            )
        parts.append(
            (
                f"{d}/lib/_{name.split('-')[0]}.so",
                g.binary(g.size(120 * KiB, 16 * KiB, 600 * KiB)),
                "bin",
            )
        )
        parts.append((f"{d}/data.gz", g.compressed(g.size(100 * KiB, 8 * KiB, 500 * KiB)), "arc"))
        for path, data, kind in parts:
            t.put(path, data, kind)
            cmds.append(f"write {t.host(path)} {path}")
            total += len(data)
        k += 1
    debugfs(img, cmds, work)
    fsck(img)
    check_files(t, img, work, [c.split()[2] for c in cmds if c.startswith("write ")][::7])
    return f"{k} packages, {total / MiB:.1f} MiB of files"


def step_edits(t: Tree, img: str, work: str) -> str:
    g, r = t.gen, t.gen.r
    new: dict[str, bytes] = {}
    for path in r.sample(t.of_kind("etc"), min(200, len(t.of_kind("etc")))):
        lines = t.read(path).split(b"\n")
        for _ in range(r.randrange(1, 4)):
            i = r.randrange(len(lines))
            lines[i] = f"{r.choice(g.idents)} = {r.randrange(100000)}".encode()
        new[path] = b"\n".join(lines)
    for path in r.sample(t.of_kind("src"), 60):
        lines = t.read(path).split(b"\n")
        for _ in range(r.randrange(1, 6)):
            i = r.randrange(len(lines))
            lines[i:i] = g.code(r.randrange(20, 300)).split(b"\n")[:-1]
        new[path] = b"\n".join(lines)
    grown = 0
    for path in r.sample(t.of_kind("log"), 25):
        add = g.log_lines(r.randrange(2 * KiB, 64 * KiB), 1_700_100_000_000)
        new[path] = t.read(path) + add
        grown += len(add)
    gone = r.sample(t.of_kind("doc"), 60) + r.sample(t.of_kind("media"), 10)
    blocks = rewrite_in_place(t, img, work, new, [f"rm {p}" for p in gone])
    for p in gone:
        t.remove(p)
    fsck(img)
    check_files(t, img, work, sorted(new)[::10])
    return (
        f"{len(new) - 25} files edited in place, {len(gone)} deleted, 25 logs appended "
        f"(+{grown / MiB:.2f} MiB); {blocks} data blocks rewritten"
    )


def step_shift(t: Tree, img: str, work: str) -> str:
    old = t.read(BIG_FILE)
    blocks = rewrite_in_place(t, img, work, {BIG_FILE: old[:3000] + b"\x07SHFT" + old[3000:]})
    fsck(img)
    check_files(t, img, work, [BIG_FILE])
    return (
        f"{BIG_FILE} ({len(old) / MiB:.0f} MiB) rewritten in place with 5 bytes inserted at "
        f"offset 3000; {blocks} data blocks rewritten"
    )


# ---------------------------------------------------------------------------- block diff
def nonzero_chunks(img: str, size: int) -> list[tuple[int, int]]:
    """Onboarding: every 64 KiB chunk of the image that is not all zeros, one write each."""
    zero = bytes(CHUNK)
    out = []
    with open(img, "rb") as f:
        for off in range(0, size, CHUNK):
            b = os.pread(f.fileno(), CHUNK, off)
            if b != zero[: len(b)]:
                out.append((off, len(b)))
    return out


def changed_runs(old: str, new: str, size: int) -> tuple[list[tuple[int, int]], int]:
    """4 KiB blocks that differ, adjacent ones merged up to MAX_IO; and how many blocks."""
    span = 16 * MiB
    runs: list[tuple[int, int]] = []
    nblocks = 0
    with open(old, "rb") as fo, open(new, "rb") as fn:
        for base in range(0, size, span):
            a = os.pread(fo.fileno(), span, base)
            b = os.pread(fn.fileno(), span, base)
            if a == b:
                continue
            for k in range(0, len(b), BLOCK):
                if a[k : k + BLOCK] != b[k : k + BLOCK]:
                    nblocks += 1
                    off = base + k
                    if runs and runs[-1][0] + runs[-1][1] == off and runs[-1][1] < MAX_IO:
                        runs[-1] = (runs[-1][0], runs[-1][1] + BLOCK)
                    else:
                        runs.append((off, BLOCK))
    return runs, nblocks


def write_runs(j: Journal, img: str, runs: list[tuple[int, int]]) -> dict[str, int]:
    """The guest's writes into the primary journal, plus zstd -3 of the same bytes."""
    batch = zstandard.ZstdCompressor(level=3).compressobj()
    per = zstandard.ZstdCompressor(level=3)
    zbatch = zper = logical = 0
    ops: list[tuple[int, bytes | None, int, bool]] = []
    with open(img, "rb") as f:
        for off, n in runs:
            data = os.pread(f.fileno(), n, off)
            ops.append((off, data, n, False))
            logical += n
            zbatch += len(batch.compress(data))
            for k in range(0, n, BLOCK):
                zper += len(per.compress(data[k : k + BLOCK]))
            if len(ops) >= OPS_PER_BATCH:
                j.write_many(VOL, ops)
                ops = []
    if ops:
        j.write_many(VOL, ops)
    zbatch += len(batch.flush())
    j.sync()
    return {"logical": logical, "writes": len(runs), "zstd_batch": zbatch, "zstd_per_block": zper}


# ---------------------------------------------------------------------------- proxy
def _proxy_main(upstream_port: int, port: Any, counts: Any) -> None:
    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, idx: int) -> None:
        try:
            while True:
                b = await r.read(256 * KiB)
                if not b:
                    break
                counts[idx] += len(b)
                w.write(b)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, uw, 0), pump(ur, cw, 1))

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.value = srv.sockets[0].getsockname()[1]
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


class Proxy:
    """A counting TCP proxy in its own process: ``out`` is client -> server, ``in`` back."""

    def __init__(self, upstream_port: int) -> None:
        ctx = mp.get_context("spawn")
        self.port = ctx.Value("i", 0, lock=False)
        self.counts = ctx.Array("q", 2, lock=False)
        self.proc = ctx.Process(
            target=_proxy_main, args=(upstream_port, self.port, self.counts), daemon=True
        )
        self.proc.start()
        end = time.monotonic() + 30
        while self.port.value == 0:
            if time.monotonic() > end or not self.proc.is_alive():
                raise RuntimeError("the proxy did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port.value}"

    def read(self) -> tuple[int, int]:
        return int(self.counts[0]), int(self.counts[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# ---------------------------------------------------------------------------- receiver
class ReceiverProc:
    """``cdp replica serve --config dr.toml`` as a subprocess on a loopback port."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.port = free_port()
        tokens = os.path.join(work, "tokens")
        with open(tokens, "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(tokens, 0o600)
        self.config = os.path.join(work, "dr.toml")
        with open(self.config, "w") as f:
            f.write(
                f'[daemon]\nlog_format = "json"\nlog_level = "warning"\n\n[receiver]\n'
                f'listen = "127.0.0.1:{self.port}"\ntokens_file = "{tokens}"\n'
                f'state_dir = "{os.path.join(work, "dr-state")}"\n'
                f'api = "unix:{os.path.join(work, "dr-api.sock")}"\n'
            )
        self.log = open(os.path.join(work, "receiver.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdp", "replica", "serve", "--config", self.config],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            cwd=ROOT,
            env={**os.environ, "CDP_CONFIG": ""},
        )
        self.url = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the receiver exited {self.proc.returncode}; see receiver.log")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                break
            if time.monotonic() > end:
                raise RuntimeError("the receiver did not listen within 60 s")
            time.sleep(0.05)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def remote_digests(
    http: aiohttp.ClientSession, url: str, group: str, vol: str, seq: int, first: int, count: int
) -> bytes:
    out = []
    for c in range(first, first + count, 8192):
        n = min(8192, first + count - c)
        q = f"volume={vol}&seq={seq}&first={c}&count={n}"
        async with http.get(f"{url}/v1/groups/{group}/digest?{q}", headers=auth()) as r:
            if r.status != 200:
                raise RuntimeError(f"digest: {r.status} {await r.text()}")
            out.append(await r.read())
    return b"".join(out)


def image_digests(img: str, size: int) -> list[bytes]:
    out = []
    with open(img, "rb") as f:
        for off in range(0, size, 16 * MiB):
            b = memoryview(os.pread(f.fileno(), 16 * MiB, off))
            out += [blake3.blake3(b[k : k + CHUNK]).digest() for k in range(0, len(b), CHUNK)]
    return out


def primary_matches(j: Journal, img: str, size: int) -> bool:
    cache = j.new_cache()
    buf = bytearray(8 * MiB)
    with open(img, "rb") as f:
        for off in range(0, size, len(buf)):
            n = min(len(buf), size - off)
            mv = memoryview(buf)[:n]
            mv[:] = bytes(n)
            j.read_into(VOL, off, mv, None, cache)
            if mv != os.pread(f.fileno(), n, off):
                return False
    return True


# ---------------------------------------------------------------------------- ours
async def ship(sender: Sender, j: Journal, proxy: Proxy, rcv: ReceiverProc) -> dict[str, Any]:
    """Run the sender until the receiver acknowledged the journal's last seq."""
    last = int(j.window().last_seq)
    o0, i0 = proxy.read()
    c0, r0, t0 = self_cpu(), rcv.cpu(), now()
    st0 = (sender.stats.blocks_sent, sender.stats.blocks_deduped, sender.stats.batches)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    end = time.monotonic() + 1800
    try:
        while sender.acked_seq < last:
            if task.done():
                raise RuntimeError(f"sender ended: {task.exception()!r}")
            if sender.state == "refused" or time.monotonic() > end:
                raise RuntimeError(f"sender {sender.state}: {sender.detail}")
            await asyncio.sleep(0.005)
        el, c1, r1 = now() - t0, self_cpu(), rcv.cpu()
        o1, i1 = proxy.read()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return {
        "wire_out": o1 - o0,
        "wire_in": i1 - i0,
        "seconds": el,
        "sender_cpu": c1 - c0,
        "receiver_cpu": r1 - r0,
        "blocks_sent": sender.stats.blocks_sent - st0[0],
        "blocks_deduped": sender.stats.blocks_deduped - st0[1],
        "batches": sender.stats.batches - st0[2],
        "seq": last,
    }


async def verify_step(
    http: aiohttp.ClientSession, j: Journal, rcv: ReceiverProc, img: str, size: int, seq: int
) -> dict[str, Any]:
    t0 = now()
    prim = await asyncio.to_thread(primary_matches, j, img, size)
    local = await asyncio.to_thread(image_digests, img, size)
    remote = await remote_digests(http, rcv.url, "series", VOL, seq, 0, len(local))
    bad = [k for k, d in enumerate(local) if remote[32 * k : 32 * k + 32] != d]
    return {
        "primary_ok": prim,
        "replica_ok": not bad,
        "replica_bad_chunks": bad[:10],
        "seconds": now() - t0,
    }


# ---------------------------------------------------------------------------- peers
def peer_rsync(src: str, dst: str, compress: bool) -> dict[str, Any]:
    argv = ["rsync", "--no-whole-file", "--inplace", "--stats", *(["-z"] if compress else [])]
    c0, t0 = children_cpu(), now()
    p = run([*argv, src, dst])
    el, cpu = now() - t0, children_cpu() - c0

    def num(label: str) -> int:
        m = re.search(rf"^{label}: ([\d,]+)", p.stdout, re.M)
        if m is None:
            raise RuntimeError(f"rsync --stats without {label!r}: {p.stdout[-500:]}")
        return int(m.group(1).replace(",", ""))

    sent, recv = num("Total bytes sent"), num("Total bytes received")
    same = subprocess.run(["cmp", "-s", src, dst], timeout=600).returncode == 0
    return {
        "sent": sent,
        "received": recv,
        "total": sent + recv,
        "seconds": el,
        "cpu": cpu,
        "ok": same,
    }


def peer_borg(repo: str, img: str, name: str, env: dict[str, str]) -> dict[str, Any]:
    if not os.path.exists(repo):
        run(["borg", "init", "--encryption=none", repo], env=env)
    c0, t0 = children_cpu(), now()
    p = run(
        ["borg", "create", "--json", f"{repo}::{name}", os.path.basename(img)],
        env=env,
        cwd=os.path.dirname(img),
    )
    el, cpu = now() - t0, children_cpu() - c0
    stats = json.loads(p.stdout)["archive"]["stats"]
    return {
        "total": int(stats["deduplicated_size"]),
        "seconds": el,
        "cpu": cpu,
        "original": int(stats["original_size"]),
    }


def peer_restic(repo: str, img: str, env: dict[str, str]) -> dict[str, Any]:
    if not os.path.exists(repo):
        run(["restic", "init", "--repo", repo], env=env)
    before = tree_bytes(repo)
    c0, t0 = children_cpu(), now()
    p = run(
        ["restic", "backup", "--json", "--repo", repo, os.path.basename(img)],
        env=env,
        cwd=os.path.dirname(img),
    )
    el, cpu = now() - t0, children_cpu() - c0
    summary = next(
        json.loads(ln)
        for ln in reversed(p.stdout.splitlines())
        if ln.startswith("{") and '"summary"' in ln
    )
    return {
        "data_added": int(summary["data_added"]),
        "repo_growth": tree_bytes(repo) - before,
        "total": int(summary["data_added"]),
        "seconds": el,
        "cpu": cpu,
    }


# ---------------------------------------------------------------------------- part 1
STEPS: list[tuple[str, str, Callable[[Tree, str, str], str] | None]] = [
    ("0", "initial sync", None),
    ("a", "packages added", step_packages),
    ("b", "scattered edits, deletes, appends", step_edits),
    ("c", "big file rewritten, content shifted", step_shift),
]


def series(
    a: argparse.Namespace, work: str, rcv: ReceiverProc, proxy: Proxy
) -> list[dict[str, Any]]:
    size = a.size
    scale = size / (2 * GiB)
    tree = Tree(os.path.join(work, "tree"), Gen(SEED))
    img = os.path.join(work, "disk.img")
    t0 = now()
    build_tree(tree, scale)
    content = tree_bytes(tree.root)
    mkfs(tree, img, size)
    log(
        f"image: {size / GiB:g} GiB ext4, {len(tree.files)} files, {content / MiB:.0f} MiB of "
        f"content, built in {now() - t0:.0f} s"
    )
    rs_dst = os.path.join(work, "rsync-dst.img")
    rsz_dst = os.path.join(work, "rsync-z-dst.img")
    benv = {
        **os.environ,
        "BORG_BASE_DIR": os.path.join(work, "borg-home"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }
    renv = {
        **os.environ,
        "RESTIC_PASSWORD": "bench",
        "RESTIC_CACHE_DIR": os.path.join(work, "restic-cache"),
    }
    j = Journal.open(os.path.join(work, "primary"))
    j.add_volume(VOL, size)
    sender = Sender(Target(name="dr1", url=proxy.url, token=TOKEN), "series", lambda: j)
    results = []
    runner = asyncio.Runner()
    http: aiohttp.ClientSession | None = None
    try:

        async def mk() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

        http = runner.run(mk())
        for key, title, apply in STEPS:
            log(f"[step {key}] {title}")
            res: dict[str, Any] = {"step": key, "title": title}
            t = now()
            if apply is None:
                res["what"] = f"{len(tree.files)} files, {content / MiB:.0f} MiB"
                runs = nonzero_chunks(img, size)
                res["changed_blocks"] = None
            else:
                res["what"] = apply(tree, img, work)
                runs, res["changed_blocks"] = changed_runs(rs_dst, img, size)
            res["apply_s"] = now() - t
            res["write"] = write_runs(j, img, runs)
            log(
                f"  {res['what']}; written {mib(res['write']['logical']):.2f} MiB in "
                f"{len(runs)} writes"
            )
            res["ours"] = runner.run(ship(sender, j, proxy, rcv))
            o = res["ours"]
            log(
                f"  ours: out {mib(o['wire_out']):.3f} MiB, in {mib(o['wire_in']):.3f} MiB, "
                f"{o['seconds']:.1f} s, sender {o['sender_cpu']:.2f} CPU-s, receiver "
                f"{o['receiver_cpu']:.2f} CPU-s"
            )
            res["verify"] = runner.run(verify_step(http, j, rcv, img, size, o["seq"]))
            v = res["verify"]
            log(f"  verify: primary == image {v['primary_ok']}, replica == image {v['replica_ok']}")
            if not (v["primary_ok"] and v["replica_ok"]):
                raise RuntimeError(f"step {key}: the replica does not reconstruct the primary: {v}")
            res["rsync"] = peer_rsync(img, rs_dst, False)
            res["rsync_z"] = peer_rsync(img, rsz_dst, True)
            res["borg"] = peer_borg(os.path.join(work, "borg-repo"), img, f"step-{key}", benv)
            res["restic"] = peer_restic(os.path.join(work, "restic-repo"), img, renv)
            if not (res["rsync"]["ok"] and res["rsync_z"]["ok"]):
                raise RuntimeError(f"step {key}: an rsync destination differs from the image")
            log(
                "  peers: rsync {:.2f}, rsync -z {:.2f}, borg {:.2f}, restic {:.2f} "
                "(repo +{:.2f}) MiB".format(
                    mib(res["rsync"]["total"]),
                    mib(res["rsync_z"]["total"]),
                    mib(res["borg"]["total"]),
                    mib(res["restic"]["data_added"]),
                    mib(res["restic"]["repo_growth"]),
                )
            )
            results.append(res)
    finally:
        if http is not None:
            runner.run(http.close())
        runner.close()
        j.close()
    return results


# ---------------------------------------------------------------------------- part 2
class Writer(threading.Thread):
    """Random incompressible 64 KiB writes at a steady rate (absolute schedule)."""

    def __init__(
        self, j: Journal, vol: str, area: int, rate: float, seconds: float, seed: int
    ) -> None:
        super().__init__(daemon=True)
        self.j, self.vol, self.area, self.rate, self.seconds = j, vol, area, rate, seconds
        self.written = 0
        self.r = random.Random(seed)  # a seed per writer: same bytes twice would deduplicate
        self.stop_evt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            k = 0
            while not self.stop_evt.is_set():
                due = t0 + k * 65536 / self.rate
                if due - t0 >= self.seconds:
                    break
                d = due - time.monotonic()
                if d > 0:
                    time.sleep(d)
                off = self.r.randrange(0, (self.area - 65536) // BLOCK) * BLOCK
                self.j.write(self.vol, off, self.r.randbytes(65536))
                self.written += 65536
                k += 1
        except BaseException as e:  # reported by the main thread
            self.error = e


class Probe(threading.Thread):
    """Every 200 ms a 4 KiB block with a counter and a timestamp at a fixed offset."""

    def __init__(self, j: Journal, vol: str, off: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.j, self.vol, self.off, self.seconds = j, vol, off, seconds
        self.probes: list[tuple[int, float, bytes]] = []  # seq, monotonic time, block
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            k = 0
            while True:
                due = t0 + k * 0.2
                if due - t0 >= self.seconds:
                    break
                d = due - time.monotonic()
                if d > 0:
                    time.sleep(d)
                block = struct.pack("<8sQQ", b"CDPPROBE", k, time.time_ns()).ljust(BLOCK, b"\0")
                t = time.monotonic()
                seq = self.j.write(self.vol, self.off, block)
                with self.lock:
                    self.probes.append((int(seq), t, block))
                k += 1
        except BaseException as e:
            self.error = e


async def durable_seq(http: aiohttp.ClientSession, url: str, group: str) -> int:
    async with http.get(f"{url}/v1/groups/{group}/position", headers=auth()) as r:
        return int((await r.json())["durable_seq"])


async def rpo(a: argparse.Namespace, work: str, rcv: ReceiverProc, proxy: Proxy) -> dict[str, Any]:
    vol, vsize = "rpo0", 1 * GiB
    probe_off = vsize - CHUNK  # its own chunk: the writer stays below vsize - 1 MiB
    j = Journal.open(os.path.join(work, "rpo-primary"))
    j.add_volume(vol, vsize)
    sender = Sender(
        Target(name="dr1", url=proxy.url, token=TOKEN, bandwidth=LINK), "rpo", lambda: j
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
    res: dict[str, Any] = {"link_bytes_per_s": LINK}

    async def caught_up(limit: float) -> float:
        t0 = time.monotonic()
        last = int(j.window().last_seq)
        while sender.acked_seq < last:
            if task.done() or time.monotonic() - t0 > limit:
                raise RuntimeError(f"sender did not catch up: {sender.state} {sender.detail}")
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    try:
        await caught_up(60)
        # ---- steady writer + probe
        secs = a.steady_s
        w = Writer(j, vol, vsize - MiB, 5 * MB, secs, SEED + 1)
        p = Probe(j, vol, probe_off, secs)
        arrived: dict[int, float] = {}
        o0 = proxy.read()[0]
        w.start()
        p.start()
        t0 = time.monotonic()
        while True:
            d = await durable_seq(http, rcv.url, "rpo")
            tn = time.monotonic()
            with p.lock:
                pending = [s for s, _, _ in p.probes if s not in arrived]
            for s in pending:
                if s <= d:
                    arrived[s] = tn
            if not p.is_alive() and not w.is_alive() and len(arrived) == len(p.probes):
                break
            if tn - t0 > secs + 120:
                raise RuntimeError("probes did not arrive within 120 s after the writer stopped")
            await asyncio.sleep(0.01)
        steady_el = time.monotonic() - t0
        for th in (w, p):
            if th.error is not None:
                raise RuntimeError(f"writer failed: {th.error!r}")
        lags = [arrived[s] - t for s, t, _ in p.probes]
        # the probe's content at its own seq, at the DR site
        bad = 0
        for s, _, block in p.probes:
            want = blake3.blake3(block + bytes(CHUNK - BLOCK)).digest()
            got = await remote_digests(http, rcv.url, "rpo", vol, s, probe_off // CHUNK, 1)
            bad += got != want
        res["steady"] = {
            "seconds": secs,
            "write_rate": w.written / steady_el,
            "written": w.written,
            "probes": len(lags),
            "probe_content_bad": bad,
            "lag_p50": pct(lags, 50),
            "lag_p99": pct(lags, 99),
            "lag_max": max(lags),
            "lag_mean": statistics.fmean(lags),
            "wire_out": proxy.read()[0] - o0,
        }
        s = res["steady"]
        log(
            f"  steady {w.written / steady_el / MB:.1f} MB/s: {len(lags)} probes, lag p50 "
            f"{s['lag_p50']:.3f} s, p99 {s['lag_p99']:.3f} s, max {s['lag_max']:.3f} s; "
            f"probe content wrong at DR: {bad}"
        )
        await caught_up(120)
        # ---- drain: twice the link
        dsecs = a.drain_s
        w = Writer(j, vol, vsize - MiB, 2 * LINK, dsecs, SEED + 2)
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        w.start()
        samples.append((0.0, proxy.read()[0]))
        c0, r0 = self_cpu(), rcv.cpu()
        t_stop: float | None = None
        t_done = 0.0
        backlog = last = 0
        while True:
            await asyncio.sleep(0.05)
            tn = time.monotonic() - t0
            if not samples or tn - samples[-1][0] >= 1.0:
                samples.append((tn, proxy.read()[0]))
            if t_stop is None and not w.is_alive():
                t_stop = tn
                last = int(j.window().last_seq)
                backlog = j.bytes_after(sender.acked_seq)
            if t_stop is not None and sender.acked_seq >= last:
                t_done = tn
                samples.append((tn, proxy.read()[0]))
                break
            if tn > dsecs + 600:
                raise RuntimeError("the replica did not catch up within 600 s")
        if w.error is not None:
            raise RuntimeError(f"writer failed: {w.error!r}")
        windows = []
        k = 0
        while (k + 1) * 10 <= t_done:
            a0 = min(samples, key=lambda x: abs(x[0] - 10 * k))
            a1 = min(samples, key=lambda x: abs(x[0] - 10 * (k + 1)))
            if a1[0] > a0[0]:
                windows.append((a1[1] - a0[1]) / (a1[0] - a0[0]))
            k += 1
        res["drain"] = {
            "write_seconds": dsecs,
            "write_rate": w.written / max(1e-9, t_stop or 1),
            "written": w.written,
            "backlog_at_stop": backlog,
            "drain_s": t_done - t_stop,
            "windows_bytes_per_s": windows,
            "avg_rate": statistics.fmean(windows) if windows else float("nan"),
            "worst_window_dev": max((abs(x / LINK - 1) for x in windows), default=float("nan")),
            "overall_rate": (samples[-1][1] - samples[0][1]) / t_done,
            "sender_process_cores": (self_cpu() - c0) / t_done,
            "receiver_cores": (rcv.cpu() - r0) / t_done,
            "samples": samples,
        }
        dr = res["drain"]
        log(
            f"  drain: wrote {w.written / MB:.0f} MB in {t_stop:.1f} s, backlog at stop "
            f"{backlog / MB:.0f} MB, caught up {dr['drain_s']:.1f} s after the writer stopped; "
            f"10 s windows {', '.join(f'{x / MB:.2f}' for x in windows)} MB/s (cap {LINK / MB})"
        )
        # ---- the replica is the primary
        last = int(j.window().last_seq)
        n = vsize // CHUNK
        local = await asyncio.to_thread(chunk_digests, j, vol, last, 0, n)
        remote = await remote_digests(http, rcv.url, "rpo", vol, last, 0, n)
        res["replica_ok"] = all(remote[32 * k : 32 * k + 32] == d for k, d in enumerate(local))
        log(f"  replica == primary at seq {last}: {res['replica_ok']}")
        if not res["replica_ok"]:
            raise RuntimeError("the rpo replica differs from the primary")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await http.close()
        j.close()
    return res


# ---------------------------------------------------------------------------- report
def tables(series_res: list[dict[str, Any]], rpo_res: dict[str, Any] | None) -> str:
    out = []
    if series_res:
        hdr = (
            "step",
            "written",
            "ours out",
            "ours in",
            "ours",
            "zstd-3 batch",
            "zstd-3 /4K",
            "rsync",
            "rsync -z",
            "borg",
            "restic",
            "restic repo",
        )
        rows = [hdr]
        for r in series_res:
            o = r["ours"]
            rows.append(
                (
                    f"{r['step']} {r['title']}",
                    f"{mib(r['write']['logical']):.2f}",
                    f"{mib(o['wire_out']):.2f}",
                    f"{mib(o['wire_in']):.2f}",
                    f"{mib(o['wire_out'] + o['wire_in']):.2f}",
                    f"{mib(r['write']['zstd_batch']):.2f}",
                    f"{mib(r['write']['zstd_per_block']):.2f}",
                    f"{mib(r['rsync']['total']):.2f}",
                    f"{mib(r['rsync_z']['total']):.2f}",
                    f"{mib(r['borg']['total']):.2f}",
                    f"{mib(r['restic']['data_added']):.2f}",
                    f"{mib(r['restic']['repo_growth']):.2f}",
                )
            )
        out.append(
            "Bytes per step, MiB (ours = wire out + in at the proxy; rsync = sent + received)"
        )
        out.append(_fmt(rows))
        rows = [
            (
                "step",
                "ours s",
                "sender CPU-s/MiB",
                "receiver CPU-s/MiB",
                "blocks sent/dedup",
                "rsync s/CPU",
                "rsync -z s/CPU",
                "borg s/CPU",
                "restic s/CPU",
            )
        ]
        for r in series_res:
            o = r["ours"]
            m = max(1e-9, mib(r["write"]["logical"]))
            rows.append(
                (
                    r["step"],
                    f"{o['seconds']:.1f}",
                    f"{o['sender_cpu'] / m:.4f}",
                    f"{o['receiver_cpu'] / m:.4f}",
                    f"{o['blocks_sent']}/{o['blocks_deduped']}",
                    *(
                        f"{r[p]['seconds']:.1f}/{r[p]['cpu']:.1f}"
                        for p in ("rsync", "rsync_z", "borg", "restic")
                    ),
                )
            )
        out.append("\nTime and CPU per step (CPU-s per MiB written; peers: wall s / CPU s)")
        out.append(_fmt(rows))
        out.append("\nFloor: fewer bytes than every peer on steps a and b")
        for r in series_res:
            if r["step"] not in ("a", "b", "c"):
                continue
            ours = r["ours"]["wire_out"] + r["ours"]["wire_in"]
            peers = {
                "rsync": r["rsync"]["total"],
                "rsync -z": r["rsync_z"]["total"],
                "borg": r["borg"]["total"],
                "restic": r["restic"]["data_added"],
                "restic repo": r["restic"]["repo_growth"],
            }
            best = min(peers, key=lambda k: peers[k])
            ok = all(ours < v for v in peers.values())
            tag = ("ok" if ok else "MISS") if r["step"] != "c" else ("fewer" if ok else "more")
            out.append(
                f"  step {r['step']}: ours {mib(ours):.2f} MiB vs best peer {best} "
                f"{mib(peers[best]):.2f} MiB ({ours / max(1, peers[best]):.2f}x): {tag}"
            )
    if rpo_res:
        s, d = rpo_res["steady"], rpo_res["drain"]
        out.append(f"\nRPO lag at a {LINK / MB:g} MB/s cap")
        out.append(
            f"  steady {s['write_rate'] / MB:.1f} MB/s of random 64 KiB writes for "
            f"{s['seconds']} s, "
            f"{s['probes']} probes: p50 {s['lag_p50']:.3f} s, p99 {s['lag_p99']:.3f} s, max "
            f"{s['lag_max']:.3f} s -> floor p99 < 2 s: {'ok' if s['lag_p99'] < 2 else 'MISS'}"
        )
        out.append(
            f"  drain: {d['write_rate'] / MB:.1f} MB/s for {d['write_seconds']} s, backlog "
            f"{d['backlog_at_stop'] / MB:.0f} MB at stop, caught up {d['drain_s']:.1f} s later"
        )
        out.append(
            f"  shipping rate, 10 s windows: "
            f"{', '.join(f'{x / MB:.2f}' for x in d['windows_bytes_per_s'])} MB/s; mean "
            f"{d['avg_rate'] / MB:.2f} MB/s = {d['avg_rate'] / LINK:.1%} of the cap, worst window "
            f"{d['worst_window_dev']:.1%} off -> within 10 %: "
            f"{'ok' if d['worst_window_dev'] <= 0.10 else 'MISS'}"
        )
    return "\n".join(out)


def _fmt(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "zstandard": zstandard.__version__}
    for name, argv in (
        ("rsync", ["rsync", "--version"]),
        ("borg", ["borg", "--version"]),
        ("restic", ["restic", "version"]),
        ("e2fsprogs", ["mkfs.ext4", "-V"]),
    ):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        out[name] = (p.stdout or p.stderr).splitlines()[0].strip()
    try:
        out["git"] = run(["git", "-C", ROOT, "log", "-1", "--format=%h"]).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--", "replicator", "journal"])
        if dirty.stdout.strip():
            out["git"] += " + uncommitted changes in replicator/ or journal/"
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def parse_size(text: str) -> int:
    from cdp.units import parse_size as p

    return p(text)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, default=None, help="disk image size (2GiB)")
    ap.add_argument("--quick", action="store_true", help="1 GiB image, 20 s / 15 s lag phases")
    ap.add_argument("--only", choices=("series", "rpo"), default=None, help="one part only")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "replication"), help="scratch dir")
    a = ap.parse_args()
    if a.size is None:
        a.size = 1 * GiB if a.quick else 2 * GiB
    if a.size < 512 * MiB:
        ap.error("--size: at least 512MiB (the series holds a 90 MiB file and 12 MiB of packages)")
    a.steady_s = 20 if a.quick else 30
    a.drain_s = 15 if a.quick else 30
    for tool in ("rsync", "borg", "restic", "debugfs", "mkfs.ext4", "e2fsck", "cmp"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed")
    work = a.out
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    res: dict[str, Any] = {
        "args": {k: v for k, v in vars(a).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": versions(),
        "cpus": os.cpu_count(),
    }
    log(f"replication_bench: {os.cpu_count()} CPUs, {res['versions']}, out {work}")
    t0 = now()
    rcv = ReceiverProc(work)
    proxy = Proxy(rcv.port)
    series_res: list[dict[str, Any]] = []
    rpo_res = None
    try:
        if a.only in (None, "series"):
            series_res = series(a, work, rcv, proxy)
            res["series"] = series_res
        if a.only in (None, "rpo"):
            log("[rpo] lag and drain at a 12.5 MB/s cap")
            rpo_res = asyncio.run(rpo(a, work, rcv, proxy))
            res["rpo"] = rpo_res
    finally:
        proxy.stop()
        rcv.stop()
        res["elapsed_s"] = now() - t0
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    print()
    print(tables(series_res, rpo_res))
    print(f"\nresults: {os.path.join(work, 'results.json')}  ({res['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
