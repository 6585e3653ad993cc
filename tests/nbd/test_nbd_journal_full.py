"""Production first (issue 4): a journal on a full tmpfs leaves the guest writing.

The daemon's state_dir is a 48 MiB tmpfs; a filler file leaves 2 MiB free, and the client
writes 8 MiB. Expected: every guest write succeeds and reads back, status says protection is
broken for the volume (alert, open gap, dirty chunks). After the filler is removed, the
daemon's repair job captures the missed chunks: protection is ok again, the gap stays
visible with the seq it resumed at, and the journal's latest point equals the image.

Needs root (mount); skipped where tmpfs cannot be mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CdpDaemon, Volume, need_tools, qemu_io

pytestmark = pytest.mark.integration

NAME = "full0"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "state"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def capture(d: CdpDaemon) -> dict[str, Any]:
    doc: dict[str, Any] = d.volume_status(NAME)["capture"]
    return doc


def protection_ok(d: CdpDaemon) -> bool:
    """Tolerates the transient 500 of test_status_answers_while_the_journal_is_reopened."""
    try:
        return bool(capture(d)["protection"] == "ok")
    except AssertionError:
        return False


@contextlib.contextmanager
def full_journal(tmpfs: Path, tmp_path: Path) -> Iterator[tuple[CdpDaemon, Path]]:
    """A daemon whose journal has 2 MiB left, and the filler file to remove."""
    short = Path(tempfile.mkdtemp(prefix="cdpnbd-", dir="/tmp"))
    d = CdpDaemon(tmp_path, short, [Volume(NAME, 32 << 20)])
    try:
        d.start()
        assert (tmp_path / "state") == tmpfs
        st = os.statvfs(tmpfs)
        filler = tmpfs / "filler"
        with open(filler, "wb") as f:
            f.write(bytes(st.f_bavail * st.f_frsize - (2 << 20)))
        yield d, filler
    finally:
        try:
            if d.running():
                d.stop()
        finally:
            d.kill()
            shutil.rmtree(short, ignore_errors=True)


def test_full_journal_keeps_the_guest_writing_and_recovers(tmpfs: Path, tmp_path: Path) -> None:
    need_tools("qemu-io", "qemu-img")
    with full_journal(tmpfs, tmp_path) as (d, filler):
        qemu_io(d.uri(NAME), "write -P 0x61 0 8M", "read -P 0x61 0 8M")
        cap = capture(d)
        assert cap["protection"] == "broken", cap
        assert cap["dirty_chunks"] > 0
        assert cap["gaps"] and cap["gaps"][-1]["ended_ns"] is None
        assert "No space left" in cap["gaps"][-1]["reason"]
        assert any(NAME in a and "protection broken" in a for a in d.status()["alerts"])
        # still writing (FUA and plain), still reading back
        qemu_io(d.uri(NAME), "write -P 0x62 8M 1M", "write -z 9M 1M", "read -P 0x62 8M 1M")
        qemu_io(d.uri(NAME), "write -P 0x63 10M 1M", "flush", writeback=True)
        assert capture(d)["protection"] == "broken"

        filler.unlink()
        d.wait_for(lambda: protection_ok(d), "protection to resume")
        cap = capture(d)
        assert cap["dirty_chunks"] == 0
        gap = cap["gaps"][-1]
        assert gap["ended_ns"] is not None and gap["resumed_seq"] is not None
        assert not any("protection broken" in a for a in d.status()["alerts"])

        qemu_io(d.uri(NAME), "write -P 0x64 12M 64k")
        qemu_io(
            d.uri(NAME),
            "read -P 0x61 0 8M",
            "read -P 0x62 8M 1M",
            "read -P 0 9M 1M",
            "read -P 0x63 10M 1M",
            "read -P 0x64 12M 64k",
        )
        d.assert_consistent(NAME)
        assert "nbd connection failed" not in d.log()


def test_status_answers_while_the_journal_is_reopened(tmpfs: Path, tmp_path: Path) -> None:
    need_tools("qemu-io")
    with full_journal(tmpfs, tmp_path) as (d, filler):
        qemu_io(d.uri(NAME), "write -P 0x61 0 8M")
        assert capture(d)["protection"] == "broken"
        failures: list[str] = []
        done = threading.Event()

        def poll() -> None:
            end = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < end:
                code, _, body = d.http("/v1/status")
                if code != 200:
                    failures.append(f"{code}: {body[:200]!r}")
                elif json.loads(body)["volumes"][0]["capture"]["protection"] == "ok":
                    return

        t = threading.Thread(target=poll)
        t.start()
        filler.unlink()
        t.join(90)
        done.set()
        assert protection_ok(d)
        assert not failures, f"{len(failures)} status calls failed during repair: {failures[:3]}"
        d.assert_log_clean()
