"""Production first: a full journal never fails a guest write (issue 4).

The journal lives on a small tmpfs that a filler file has nearly filled. Writes keep
succeeding on the image while the journal cannot take them; status says protection is
broken; once space is freed the daemon reopens the journal, captures the chunks written
meanwhile, and history shows the gap. The image and the journal's latest point then agree.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.nbd.client import NbdClient
from tests.tmpfs import mounted_tmpfs

from .daemon_proc import make_daemon


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs") as mnt:
        yield mnt


async def _write(sock: str, rng: random.Random, n: int, size: int) -> None:
    c = await NbdClient.connect_unix(sock, "disk0")
    try:
        for _ in range(n):
            off = rng.randrange(0, size // 65536) * 65536
            await c.write(off, rng.randbytes(65536))
        await c.flush()  # must succeed even though the journal cannot sync
    finally:
        await c.close()


def _wait(cond, what: str, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_full_journal_keeps_guest_writing_then_recovers(tmp_path: Path, tmpfs: Path) -> None:
    size = 32 << 20
    d = make_daemon(tmp_path, size="32MiB")
    cfg = d.config.read_text().replace(
        f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{tmpfs / "state"}"'
    )
    d.config.write_text(cfg)
    d.start()
    filler = tmpfs / "filler"
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    filler.write_bytes(b"\0" * (free - (2 << 20)))  # leave 2 MiB for the journal
    rng = random.Random(5)
    try:
        asyncio.run(_write(d.nbd(), rng, 120, size))  # ~7.5 MiB: far more than fits
        st = d.status()
        vol = st["volumes"][0]
        assert vol["capture"]["protection"] == "broken", vol
        assert any("protection broken" in a for a in st["alerts"]), st["alerts"]
        filler.unlink()  # the admin frees space
        _wait(
            lambda: d.status()["volumes"][0]["capture"]["protection"] == "ok",
            "protection to resume",
        )
        gaps = d.status()["volumes"][0]["capture"]["gaps"]
        assert gaps and gaps[-1]["resumed_seq"], gaps
        image = (tmp_path / "disk0.raw").read_bytes()
        assert d.journal_image() == image
        asyncio.run(_write(d.nbd(), rng, 10, size))  # and capture goes on
        assert d.journal_image() == (tmp_path / "disk0.raw").read_bytes()
    finally:
        d.stop()
