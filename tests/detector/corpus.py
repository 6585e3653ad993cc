"""A real ext4 file system on a cdp NBD export, for the detector's corpus (tests and bench).

The kernel's own ext4 does the writing: ``cdp daemon`` serves a volume over NBD,
``nbdfuse`` turns the export into a file, a loop device turns that into a block device, and
``mkfs.ext4`` + ``mount -o discard`` put a file system on it. Ordinary workloads (real
tools: tar, gcc, sqlite3, cp of compressed files) and attacks (``openssl enc`` writing over
files in place) then run on the mount, and the daemon's detector sees exactly the block
writes a VM's disk would. Needs root, /dev/fuse and loop devices; ``available()`` says why
not when something is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "cdp"]
TOOLS = (
    "nbdfuse",
    "losetup",
    "mkfs.ext4",
    "mount",
    "umount",
    "openssl",
    "sqlite3",
    "gcc",
    "debugfs",
)


def available() -> str | None:
    """None when a disk can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (mount, loop devices)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (scripts/bootstrap installs them)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "no /dev/fuse or /dev/loop-control"
    return None


def _run(argv: list[str], *, timeout: float = 120, cwd: Path | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stdout


class Disk:
    """One protected volume with a mounted ext4 on it. Use as a context manager."""

    def __init__(self, root: Path, *, size_mib: int = 512, detector: str = "") -> None:
        self.root = root
        self.sock = Path(tempfile.mkdtemp(prefix="cdp-det-", dir="/tmp"))
        self.size_mib = size_mib
        self.cfg = root / "cdp.toml"
        self.fs = root / "fs"
        self.fuse = root / "fuse"
        self.loop: str | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.nbdfuse: subprocess.Popen[bytes] | None = None
        self.detector = detector or '[detector]\nsensitivity = "normal"\n'

    def __enter__(self) -> Disk:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self.fs.mkdir()
        self.fuse.mkdir()
        image = self.root / "disk0.raw"
        with open(image, "wb") as f:
            f.truncate(self.size_mib << 20)
        self.cfg.write_text(
            f'[daemon]\nstate_dir = "{self.root / "state"}"\n'
            f'api = "unix:{self.sock / "api.sock"}"\n'
            f'log_format = "json"\n\n[[volume]]\nname = "disk0"\nsize = "{self.size_mib}MiB"\n'
            f'source = "nbd"\nimage = "{image}"\nlisten = "unix:{self.sock / "disk0.sock"}"\n\n'
            f"{self.detector}"
        )
        log = open(self.root / "daemon.log", "wb")  # noqa: SIM115 (lives with the process)
        self.daemon = subprocess.Popen(
            [*CLI, "daemon", "--config", str(self.cfg)],
            stdout=log,
            stderr=log,
            env={**os.environ, "CDP_CONFIG": ""},
        )
        self._wait(lambda: self._onboarded(), "the daemon")
        self.nbdfuse = subprocess.Popen(
            ["nbdfuse", str(self.fuse), f"nbd+unix:///disk0?socket={self.sock / 'disk0.sock'}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait(lambda: (self.fuse / "nbd").exists(), "nbdfuse")
        self.loop = _run(["losetup", "-f", "--show", str(self.fuse / "nbd")]).strip()
        _run(["mkfs.ext4", "-q", "-E", "nodiscard", self.loop])
        _run(["mount", "-o", "discard", self.loop, str(self.fs)])

    def _onboarded(self) -> bool:
        try:
            st = self.status()
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            return False
        return bool(st["volumes"][0]["onboarding"]["state"] == "done")

    def _wait(self, cond: Any, what: str, limit_s: float = 60.0) -> None:
        end = time.monotonic() + limit_s
        while not cond():
            if self.daemon is not None and self.daemon.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited: {(self.root / 'daemon.log').read_text()[-3000:]}"
                )
            if time.monotonic() > end:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def cdp(self, *args: str) -> str:
        return _run([*CLI, *args, "--config", str(self.cfg)], timeout=120)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cdp("status", "--json"))
        return doc

    def sync(self) -> None:
        _run(["sync", "-f", str(self.fs)])

    def anomalies(self) -> list[dict[str, Any]]:
        """The detector's alarms: anomaly checkpoints in the journal (they carry the point)."""
        doc = json.loads(self.cdp("timeline", "disk0", "--since", "1h", "--json"))
        return [c for c in doc["checkpoints"] if c["kind"] == "anomaly"]

    def detector_stats(self) -> dict[str, Any]:
        return dict(self.status()["groups"][0].get("detector") or {})

    def close(self) -> None:
        """Unmount, detach, stop: each step tried even when an earlier one failed."""
        if self.loop:
            for args in (["umount", str(self.fs)], ["umount", "-l", str(self.fs)]):
                if subprocess.run(args, capture_output=True, timeout=60).returncode == 0:
                    break
                time.sleep(0.5)
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, timeout=60)
        if self.nbdfuse is not None:
            unmount = shutil.which("fusermount3") or shutil.which("fusermount")
            if unmount:
                subprocess.run(
                    [unmount, "-u", "-z", str(self.fuse)], capture_output=True, timeout=30
                )
            else:
                subprocess.run(["umount", "-l", str(self.fuse)], capture_output=True, timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nbdfuse.wait(10)
            if self.nbdfuse.poll() is None:
                self.nbdfuse.kill()
                self.nbdfuse.wait(10)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        shutil.rmtree(self.sock, ignore_errors=True)


# ---------------------------------------------------------------------- workloads
def _words(rng: Any, n: int) -> bytes:
    vocab = (
        b"invoice customer order total amount paid due date account report quarter revenue "
        b"the a of and to in is for on with as by at from project meeting notes draft final "
        b"2026 11 12 01 EUR USD 1500.00 42 7 delivered pending shipped refund"
    ).split()
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(vocab) for _ in range(12)) + b".\n"
    return bytes(out[:n])


def age(d: Disk) -> None:
    """A used file system: documents, documentation and sources copied, a third deleted."""
    import random

    rng = random.Random(7)
    dst = d.fs / "home"
    dst.mkdir(exist_ok=True)
    docs = dst / "documents"
    docs.mkdir(exist_ok=True)
    for k in range(12):  # office documents, reports, logs: the data ransomware goes for
        (docs / f"report-{k}.txt").write_bytes(_words(rng, rng.randrange(1 << 20, 3 << 20)))
    for src in ("/usr/share/doc", "/usr/share/perl", "/usr/lib/python3.11/email"):
        if os.path.isdir(src):
            shutil.copytree(src, dst / Path(src).name, symlinks=True, dirs_exist_ok=True)
    d.sync()
    for k, p in enumerate(sorted((dst / "doc").glob("*"))):
        if k % 3 == 0:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    d.sync()


def package_install(d: Disk) -> None:
    """Unpack a tree of libraries and modules, as dpkg does (many files, mixed content)."""
    out = d.fs / "usr-local"
    out.mkdir(exist_ok=True)
    src = "/usr/lib/python3/dist-packages"
    tar = subprocess.Popen(["tar", "-C", src, "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(out), "-xf", "-"], stdin=tar.stdout, check=True, timeout=300)
    tar.wait(60)
    d.sync()


def compile_project(d: Disk) -> None:
    """Generate a C project on the disk and build it with gcc (objects, a binary)."""
    proj = d.fs / "build"
    proj.mkdir(exist_ok=True)
    for k in range(60):
        (proj / f"m{k}.c").write_text(
            f"#include <stdio.h>\nint f{k}(int x) {{ int s = 0; for (int i = 0; i < x; i++)"
            f" s += i * {k}; return s; }}\n"
            + "".join(
                f'static const char *t{k}_{j} = "message {j} of module {k}";\n' for j in range(50)
            )
        )
    (proj / "main.c").write_text("int main(void) { return 0; }\n")
    for k in range(60):
        _run(["gcc", "-O1", "-c", f"m{k}.c", "-o", f"m{k}.o"], cwd=proj)
    _run(["gcc", "-o", "app", "main.c", *[f"m{k}.o" for k in range(60)]], cwd=proj)
    d.sync()


def sqlite_load(d: Disk) -> None:
    """A SQLite database loaded and updated in many transactions (pages rewritten in place)."""
    import random
    import sqlite3

    rng = random.Random(1)
    db = sqlite3.connect(d.fs / "app.db")
    db.execute("CREATE TABLE IF NOT EXISTS acct (id INTEGER PRIMARY KEY, name TEXT, bal INT)")
    for t in range(40):
        db.executemany(
            "INSERT INTO acct (name, bal) VALUES (?, ?)",
            [(f"customer-{t}-{i}-{rng.choice(['a', 'b', 'c'])}", rng.randrange(10**6))
             for i in range(500)],
        )  # fmt: skip
        db.execute("UPDATE acct SET bal = bal + 1 WHERE id % 7 = ?", (t % 7,))
        db.commit()
    db.close()
    d.sync()


def copy_compressed(d: Disk) -> None:
    """Copy already-compressed files in: tarballs (gzip, xz, zstd) and random 'media'."""
    out = d.fs / "downloads"
    out.mkdir(exist_ok=True)
    _run(["tar", "-czf", str(out / "doc.tar.gz"), "-C", "/usr/share", "doc"], timeout=300)
    _run(["tar", "-cJf", str(out / "perl.tar.xz"), "-C", "/usr/share", "perl"], timeout=300)
    with open(out / "video.mp4", "wb") as f:  # incompressible, like encoded media
        f.write(os.urandom(24 << 20))
    shutil.copy(out / "doc.tar.gz", out / "doc-copy.tar.gz")
    d.sync()


ORDINARY = {
    "package install": package_install,
    "compile": compile_project,
    "sqlite load": sqlite_load,
    "copy compressed files": copy_compressed,
}


# ---------------------------------------------------------------------- attacks
def victims(d: Disk, min_size: int = 8192) -> list[Path]:
    return sorted(
        p for p in (d.fs / "home").rglob("*") if p.is_file() and not p.is_symlink()
        and p.stat().st_size >= min_size
    )  # fmt: skip


def checksums(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def encrypt_in_place(path: Path, *, limit: int | None = None) -> None:
    """openssl enc over the file's own blocks (dd conv=notrunc): what ransomware does."""
    n = path.stat().st_size if limit is None else min(limit, path.stat().st_size)
    enc = subprocess.Popen(
        [
            "openssl",
            "enc",
            "-aes-256-ctr",
            "-nosalt",
            "-pbkdf2",
            "-pass",
            "pass:cdp-test",
            "-in",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a partial encryptor closes the pipe early: EPIPE is fine
    )
    subprocess.run(
        ["dd", f"of={path}", "conv=notrunc,fsync", "bs=64k", "iflag=fullblock",
         f"count={(n + 65535) // 65536}", "status=none"],
        stdin=enc.stdout, check=True, timeout=60,
    )  # fmt: skip
    assert enc.stdout is not None
    enc.stdout.close()  # dd is done: openssl gets EPIPE instead of waiting for a reader
    enc.wait(60)


def attack(d: Disk, kind: str, *, seconds: float = 30.0) -> tuple[float, list[Path]]:
    """Run an attack; returns (wall time of its start, files it touched)."""
    files = victims(d, 1 << 20 if kind == "partial" else 8192)
    if kind == "slow":  # one document at a time, a pause between them: minutes for all
        files = sorted((d.fs / "home" / "documents").glob("*"))
    t0 = time.time()
    touched: list[Path] = []
    for p in files:
        if time.time() - t0 > seconds:
            break
        encrypt_in_place(p, limit=1 << 20 if kind == "partial" else None)
        touched.append(p)
        if kind == "slow":
            time.sleep(5.0)
    return t0, touched
