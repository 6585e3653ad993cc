"""Run ``cdp daemon`` and the ``cdp`` verbs as real subprocesses, the way an admin does.

Everything a test waits for goes through :func:`wait_for`, which polls a condition until a
deadline. Deadlines only keep a broken build from hanging; no test asserts how long anything
took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cdp.cli.api_client import ApiClient
from cdp.config import load_config

T = TypeVar("T")

DEADLINE_S = 60.0
"""How long any single wait may take before the test fails (a hang guard, not a benchmark)."""

CLI = [sys.executable, "-m", "cdp"]


def need_qemu_tools() -> None:
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/bootstrap installs it)")


def wait_for(
    check: Callable[[], T | None], what: str, *, deadline_s: float = DEADLINE_S, every: float = 0.05
) -> T:
    """Call *check* until it returns a true value (not None, False, 0 or empty); return it.

    Raises AssertionError naming *what* (and the last exception *check* raised) when the
    deadline passes.
    """
    end = time.monotonic() + deadline_s
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except (AssertionError, OSError, ValueError, subprocess.SubprocessError) as e:
            result, last_error = None, e
        if result:
            return result
        if time.monotonic() > end:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(every)


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cdp-e2e-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def qemu_img_create(path: Path, size: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), size], check=True)


def qemu_io_write(path: Path, pattern: int, offset: str, length: str) -> None:
    """``qemu-io -f raw -c "write -P PATTERN OFFSET LENGTH"``: the way a guest would write."""
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 0x{pattern:02x} {offset} {length}", str(path)],
        check=True,
        capture_output=True,
    )


def qemu_img_identical(a: Path, b: Path) -> bool:
    """``qemu-img compare`` of two raw images (exit 0: identical, 1: different)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def same_bytes(a: Path, b: Path) -> bool:
    """``cmp``: byte for byte."""
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def write_config(
    folder: Path,
    *,
    image: Path,
    size: str = "16MiB",
    volume: str = "disk0",
    log_format: str = "text",
    extra: str = "",
) -> Path:
    """A config like deploy/config/cdp.example.toml's ``scan`` volume, all paths in *folder*."""
    cfg = folder / "cdp.toml"
    cfg.write_text(
        f"""# Based on deploy/config/cdp.example.toml: one hash-scanned volume.
[daemon]
state_dir = "state"
api = "unix:api.sock"
log_format = "{log_format}"
log_level = "info"
event_loop = "asyncio"

[[volume]]
name = "{volume}"
size = "{size}"
source = "scan"
path = "{image}"
poll_interval = "200ms"
scan_rate = "1GiB/s"
{extra}"""
    )
    return cfg


@dataclass
class Result:
    code: int
    out: str
    err: str


def cdp(config: Path, *argv: str, check: int | None = 0) -> Result:
    """Run ``cdp ARGV --config CONFIG``; with *check*, assert the exit code is that."""
    proc = subprocess.run(
        [*CLI, *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=DEADLINE_S,
        env={**os.environ, "CDP_CONFIG": ""},
    )
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    if check is not None:
        assert res.code == check, f"cdp {' '.join(argv)} exited {res.code}: {res.err}{res.out}"
    return res


class Daemon:
    """One ``cdp daemon --config CONFIG`` process; stderr (its log) goes to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "daemon", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "CDP_CONFIG": ""},
            )
        wait_for(self._answers, "the daemon's API to answer")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited {self.proc.returncode}:\n{self.log()}")
        try:
            self.status()
        except Exception:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        """GET /v1/status in-process: waits poll it often (the verb has its own checks)."""
        address = load_config(self.config).api_address()
        doc: dict[str, Any] = asyncio.run(ApiClient(address).get("/v1/status"))
        return doc

    def volume(self, name: str = "disk0") -> dict[str, Any]:
        vols: Sequence[dict[str, Any]] = self.status()["volumes"]
        return next(v for v in vols if v["name"] == name)

    def group(self, name: str = "disk0") -> dict[str, Any]:
        groups: Sequence[dict[str, Any]] = self.status()["groups"]
        return next(g for g in groups if g["name"] == name)

    def wait_onboarded(self, volume: str = "disk0") -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            v = self.volume(volume)
            return (
                v if v["onboarding"]["state"] == "done" and v["capture"]["last_scan_ns"] else None
            )

        return wait_for(done, f"{volume} to be onboarded")

    def wait_captured(self, after_ns: int, volume: str = "disk0") -> None:
        """Wait for a whole scan pass that started after *after_ns* (e.g. after a write).

        A pass that merely ends after the write may have read the changed chunk before it;
        the pass after that one cannot have.
        """

        def scan_end_after(t: int) -> int | None:
            last: int = self.volume(volume)["capture"]["last_scan_ns"]
            return last if last > t else None

        first_end = wait_for(lambda: scan_end_after(after_ns), "a scan pass after the write")
        wait_for(lambda: scan_end_after(first_end), "a full scan pass after the write")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=DEADLINE_S)

    def stop(self) -> int:
        """SIGTERM and wait for the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_exit()

    def kill(self) -> None:
        """Clean up after a test: SIGKILL this process if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE_S)
