"""``python -m cdp.demo``: protect a disk image, corrupt it, and get it back, end to end.

What an admin would type, run for real: every step is a command (``qemu-img``, ``qemu-io``,
``mkfs.ext4``, ``debugfs``, and ``cdp`` itself: the daemon and the CLI run as subprocesses,
not as library calls). Each command is printed before it runs, with its output below it.

1. Make a 64 MiB raw disk image holding an ext4 file system with a few files.
2. Write a config protecting it (``source = "nbd"``: the daemon serves the image as an NBD
   export and journals every write on its way in), start ``cdp daemon``, wait until the
   image as found is the first point, ``cdp status``, ``nbdinfo`` on the export.
3. Write through the export with a real NBD client (``qemu-io``), then
   ``cdp checkpoint disk0 --name before-corruption``.
4. Corrupt the disk through the export: ``qemu-io`` writes 4 MiB of random data over the
   file system's start; ``cdp status``; the journal's latest point equals the image.
5. ``cdp restore disk0 --at checkpoint:before-corruption --output restored.raw``, then show
   with ``qemu-img compare`` that it equals the disk as it was and differs from the
   corrupted one, and read a file back from it with ``debugfs``.
6. At the DR site: the same restore from the replica (``--config dr.toml``), which the
   primary has been shipping to all along (``cdp replica serve`` on loopback, started in
   step 2; ``cdp status`` shows the RPO lag and the bytes on the wire).
7. Stop both services with SIGTERM (exit 0).

Exits 0 when every step did what it should, 1 otherwise (the daemon is stopped either way).
The work folder is removed at the end unless ``--keep`` is given. Needs qemu-utils and
e2fsprogs (``scripts/bootstrap`` installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IMAGE_SIZE = "64M"
DEADLINE_S = 60.0  # the longest any single wait may take before the demo gives up
TOOLS = ("qemu-img", "qemu-io", "mkfs.ext4", "debugfs", "e2fsck", "nbdinfo")
EXPORT = "nbd+unix:///disk0?socket=disk0.sock"  # what a hypervisor would attach

FILES = {
    "hello.txt": "Hello from the protected disk.\n",
    "notes/plan.txt": "1. protect disk0\n2. make a checkpoint\n3. survive the corruption\n",
    "notes/numbers.csv": "".join(f"{i},{i * i}\n" for i in range(2000)),
}

CONFIG = """\
# cdp demo: one disk image, served over NBD; every write is journaled on its way in.
[daemon]
state_dir = "state"          # the journal lives here
api = "unix:api.sock"        # where the cdp commands reach the daemon
log_format = "text"

[[volume]]
name = "disk0"
size = "64MiB"
source = "nbd"               # the daemon is the disk: a write splitter (true CDP)
image = "disk0.raw"
listen = "unix:disk0.sock"   # qemu -drive file=nbd+unix:///disk0?socket=disk0.sock

[retention]
journal = "24h"              # any point in the last 24 hours can be restored

[[replica]]                  # ship every write to a DR site (here: on this machine)
name = "dr1"
url = "http://127.0.0.1:{port}"
token_file = "dr1.token"     # the bearer token, read from a file, never from argv
"""

DR_CONFIG = """\
# cdp demo DR site: receives the primary's journal and keeps its own history.
[daemon]
log_format = "text"

[receiver]
listen = "127.0.0.1:{port}"
tokens_file = "receiver.tokens"
state_dir = "dr-state"
api = "unix:dr-api.sock"
"""


class DemoFailed(Exception):
    """A step did not do what it should; the message says which and how."""


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.daemon: subprocess.Popen[bytes] | None = None
        self.receiver: subprocess.Popen[bytes] | None = None
        self.port = _free_port()
        self.step_no = 0
        # Children import this very cdp package, wherever the demo was started from.
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        self.env = {
            **os.environ,
            "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
            "CDP_CONFIG": "",
        }

    # ------------------------------------------------------------------ output
    def step(self, title: str, explanation: str) -> None:
        self.step_no += 1
        print(f"\n== {self.step_no}. {title}")
        print(textwrap.fill(explanation, width=92))

    def note(self, text: str) -> None:
        print(textwrap.fill(text, width=92, initial_indent="  ", subsequent_indent="  "))

    def run(
        self,
        argv: Sequence[str],
        *,
        shown: Sequence[str] | None = None,
        expect: int | None = 0,
        quiet: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Print ``$ command``, run it in the work folder, print its output, check its code."""
        if not quiet:
            print(f"\n$ {shlex.join(shown or argv)}")
        proc = subprocess.run(
            list(argv),
            cwd=self.work,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=DEADLINE_S,
            check=False,
        )
        if not quiet:
            for line in (proc.stdout + proc.stderr).splitlines():
                print(f"  {line}")
            if expect is not None and proc.returncode != expect:
                print(f"  (exit code {proc.returncode})")
        if expect is not None and proc.returncode != expect:
            raise DemoFailed(
                f"`{shlex.join(shown or argv)}` exited {proc.returncode}, expected {expect}"
                + (f": {proc.stderr.strip()}" if quiet else "")
            )
        return proc

    def cdp(
        self,
        *args: str,
        expect: int | None = 0,
        quiet: bool = False,
        config: str = "cdp.toml",
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            [sys.executable, "-m", "cdp", *args, "--config", config],
            shown=["cdp", *args, "--config", config],
            expect=expect,
            quiet=quiet,
        )

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cdp("status", "--json", quiet=True).stdout)
        return doc

    def disk0(self) -> dict[str, Any]:
        vol: dict[str, Any] = next(v for v in self.status()["volumes"] if v["name"] == "disk0")
        return vol

    def wait(self, check: Callable[[], T | None], what: str) -> T:
        """Poll *check* until it returns a true value; fail after DEADLINE_S."""
        end = time.monotonic() + DEADLINE_S
        while True:
            self.check_daemon_alive()
            result = check()
            if result:
                return result
            if time.monotonic() > end:
                raise DemoFailed(f"gave up waiting for {what} after {DEADLINE_S:g}s")
            time.sleep(0.1)

    def check_daemon_alive(self) -> None:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise DemoFailed(f"the daemon exited with code {self.daemon.returncode}")
        if self.receiver is not None and self.receiver.poll() is not None:
            raise DemoFailed(f"the receiver exited with code {self.receiver.returncode}")

    def replica(self) -> dict[str, Any]:
        g = next(g for g in self.status()["groups"] if g["name"] == "disk0")
        r: dict[str, Any] = g["replicas"][0]
        r["primary_last_seq"] = g["window"]["last_seq"]
        return r

    def wait_replicated(self) -> None:
        def done() -> bool:
            r = self.replica()
            return bool(r["acked_seq"] == r["primary_last_seq"])

        self.wait(done, "the DR site to hold every write")

    # ------------------------------------------------------------------ steps
    def make_disk(self) -> None:
        self.step(
            "A disk with files on it",
            "A 64 MiB raw disk image, as a VM would use, with an ext4 file system holding a "
            "few files (mkfs.ext4 -d copies a folder into the new file system).",
        )
        for name, text in FILES.items():
            path = self.work / "files" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.run(["qemu-img", "create", "-f", "raw", "disk0.raw", IMAGE_SIZE])
        self.run(["mkfs.ext4", "-q", "-F", "-L", "demo", "-d", "files", "disk0.raw"])
        shown = self.run(["debugfs", "-R", "cat /hello.txt", "disk0.raw"]).stdout
        if FILES["hello.txt"] not in shown:
            raise DemoFailed("debugfs did not show hello.txt as written")

    def start_daemon(self) -> None:
        self.step(
            "Protect it",
            "The config names the image as volume disk0. `cdp daemon` serves it as an NBD "
            "export and journals every write; the image as found becomes the first point "
            "(onboarding).",
        )
        self.start_receiver()
        config = CONFIG.format(port=self.port)
        (self.work / "cdp.toml").write_text(config)
        print("\n$ cat cdp.toml")
        for line in config.splitlines():
            print(f"  {line}")
        print("\n$ cdp daemon --config cdp.toml 2>daemon.log &")
        with open(self.work / "daemon.log", "wb") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "cdp", "daemon", "--config", "cdp.toml"],
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
            )
        self.note(f"(pid {self.daemon.pid}; waiting until disk0 is onboarded)")

        def onboarded() -> bool:
            st = self.cdp("status", "--json", quiet=True, expect=None)
            if st.returncode != 0:
                return False  # not listening yet
            vol = next(v for v in json.loads(st.stdout)["volumes"] if v["name"] == "disk0")
            return bool(vol["onboarding"]["state"] == "done")

        self.wait(onboarded, "disk0 to be onboarded")
        self.cdp("status")
        self.run(["nbdinfo", EXPORT])

    def start_receiver(self) -> None:
        self.note(
            "First a DR site to replicate to: `cdp replica serve` keeps a replica journal of "
            "its own, with its own history, so it can restore any point itself. Senders "
            "authenticate with a bearer token."
        )
        token = secrets.token_urlsafe(24)
        for name in ("receiver.tokens", "dr1.token"):
            path = self.work / name
            path.write_text(token + "\n")
            path.chmod(0o600)
        dr = DR_CONFIG.format(port=self.port)
        (self.work / "dr.toml").write_text(dr)
        print("\n$ cat dr.toml")
        for line in dr.splitlines():
            print(f"  {line}")
        print("\n$ cdp replica serve --config dr.toml 2>receiver.log &")
        with open(self.work / "receiver.log", "wb") as log:
            self.receiver = subprocess.Popen(
                [sys.executable, "-m", "cdp", "replica", "serve", "--config", "dr.toml"],
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
            )

        def answers() -> bool:
            st = self.cdp("status", "--json", quiet=True, expect=None, config="dr.toml")
            return st.returncode == 0

        self.wait(answers, "the DR receiver to answer")

    def checkpoint(self) -> None:
        self.step(
            "A checkpoint before trouble",
            "Any point in the journal window can be restored by time or seq; a named "
            "checkpoint is easier to find again. (The copy of the image is only for "
            "comparing at the end; cdp does not need it.)",
        )
        self.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 48M 1M", "-c", "flush", EXPORT])
        self.run(["nbdinfo", "--map", EXPORT])
        self.cdp("checkpoint", "disk0", "--name", "before-corruption")
        self.run(["cp", "--sparse=always", "disk0.raw", "disk0.before.raw"])
        self.wait_replicated()
        self.cdp("status")
        r = self.replica()
        self.note(
            f"(replica dr1: {r['state']}, RPO lag {r['lag_s']} s; {r['logical_bytes']} bytes "
            f"written became {r['wire_bytes_out']} bytes on the wire: unallocated space is "
            "never sent, batches are zstd-compressed, blocks the DR site holds are not resent)"
        )

    def corrupt(self) -> None:
        self.step(
            "Something goes wrong",
            "4 MiB of random data lands on the start of the disk, through the export, as a "
            "guest gone wrong would write it: the superblock, the group descriptors and the "
            "inode tables are gone. The daemon journals it like any other write: it cannot "
            "tell a bad write from a good one.",
        )
        (self.work / "random.bin").write_bytes(os.urandom(4 << 20))
        self.run(["qemu-io", "-f", "raw", "-c", "write -s random.bin 0 4M", "-c", "flush", EXPORT])
        if self.run(["e2fsck", "-fn", "disk0.raw"], expect=None).returncode == 0:
            raise DemoFailed("e2fsck found nothing wrong with the corrupted disk")
        self.note("(e2fsck cannot even find the file system)")
        self.cdp("status")
        self.cdp("restore", "disk0", "--at", "latest", "--output", "latest.raw")
        self.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", "latest.raw", "disk0.raw"])
        self.note("(the journal's latest point is the disk, bit for bit: every write is in it)")

    def restore(self) -> None:
        self.step(
            "Get the disk back",
            "`cdp restore` writes the volume as it was at the checkpoint into a new sparse "
            "raw image; it never overwrites an existing file without --force.",
        )
        self.cdp(
            "restore", "disk0", "--at", "checkpoint:before-corruption", "--output", "restored.raw"
        )
        self.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", "restored.raw", "disk0.before.raw"]
        )
        self.note("(identical to the disk as it was at the checkpoint)")
        self.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", "restored.raw", "disk0.raw"],
            expect=1,
        )
        self.note("(and not the corrupted disk: exit code 1 is what we want here)")
        self.run(["e2fsck", "-fn", "restored.raw"])
        shown = self.run(["debugfs", "-R", "cat /notes/plan.txt", "restored.raw"]).stdout
        if FILES["notes/plan.txt"] not in shown:
            raise DemoFailed("the restored file system does not hold notes/plan.txt")

    def recover_at_dr(self) -> None:
        self.step(
            "Recover at the DR site too",
            "The corruption was replicated as well (the DR site cannot tell a bad write from "
            "a good one either), but the DR site keeps history: the same restore works "
            "there, from the replica journal alone, with the DR site's config.",
        )
        self.wait_replicated()
        self.cdp("status", config="dr.toml")
        self.cdp(
            "restore",
            "disk0",
            "--at",
            "checkpoint:before-corruption",
            "--output",
            "dr-restored.raw",
            config="dr.toml",
        )
        self.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", "dr-restored.raw", "disk0.before.raw"]
        )
        self.note("(the DR site gives back the disk as it was at the checkpoint, bit for bit)")

    def stop_daemon(self) -> None:
        self.step(
            "Stop",
            "SIGTERM drains the daemon and the receiver, syncs their journals and exits 0.",
        )
        if self.receiver is not None:
            _terminate(self.receiver, "receiver")
            self.receiver = None
        assert self.daemon is not None
        _terminate(self.daemon, "daemon")
        self.daemon = None

    def cleanup(self) -> None:
        """Stop services still running after a failure (SIGTERM, then SIGKILL)."""
        procs = [self.daemon, self.receiver]
        self.daemon = self.receiver = None
        for d in procs:
            if d is None or d.poll() is not None:
                continue
            d.send_signal(signal.SIGTERM)
            try:
                d.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()

    def daemon_log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.work / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _terminate(proc: subprocess.Popen[bytes], what: str) -> None:
    """SIGTERM, as systemd would, and insist on exit code 0."""
    print(f"\n$ kill -TERM {proc.pid}")
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as e:
        raise DemoFailed(f"the {what} did not exit after SIGTERM") from e
    print(f"  {what} exited with code {code}")
    if code != 0:
        raise DemoFailed(f"the {what} exited {code} after SIGTERM")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cdp.demo",
        description="Protect a disk image with cdp, corrupt it, and restore it.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"demo needs {', '.join(missing)}: run scripts/bootstrap first", file=sys.stderr)
        return 1
    # /tmp and a short name: the API socket path must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="cdp-demo-", dir="/tmp"))
    print("cdp demo: continuous data protection of a disk image, end to end.")
    print(f"Working in {work}" + ("" if args.keep else " (removed at the end; --keep keeps it)"))
    demo = Demo(work)
    t0 = time.monotonic()
    try:
        demo.make_disk()
        demo.start_daemon()
        demo.checkpoint()
        demo.corrupt()
        demo.restore()
        demo.recover_at_dr()
        demo.stop_daemon()
    except (DemoFailed, OSError, subprocess.SubprocessError) as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        tail = demo.daemon_log_tail()
        if tail:
            print(f"last lines of {work}/daemon.log:\n{tail}", file=sys.stderr)
        try:
            rtail = (work / "receiver.log").read_text(errors="replace").splitlines()[-20:]
            print(f"last lines of {work}/receiver.log:\n" + "\n".join(rtail), file=sys.stderr)
        except OSError:
            pass
        return 1
    finally:
        demo.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nDone in {time.monotonic() - t0:.1f}s: the disk was restored as it was before, "
        "at both sites."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
