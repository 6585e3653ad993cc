"""Onboarding skips the image's holes without reading them (cdp/capture/splitter.py).

A hole reads as zeros, so a chunk inside one is compared as zeros; the journal must still end
up equal to the image everywhere: data after a hole, data sharing a chunk with a hole, and a
chunk the journal holds data for but the image now has as a hole (journaled as zeros).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from cdp.capture.splitter import onboard_export
from cdp.nbd.export import Export
from journal import Journal, JournalOptions

CS = 64 * 1024
SIZE = 64 * CS


@dataclass
class _Progress:
    onboard_scanned: int = 0


def test_onboarding_matches_an_image_with_holes(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), options=JournalOptions(chunk_size=CS))
    j.add_volume("disk0", SIZE)
    j.write("disk0", 7 * CS, b"\x07" * CS)  # stale: the image has a hole there
    img = tmp_path / "disk0.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(img, os.O_RDWR)
    os.pwrite(fd, b"\x03" * 100, 3 * CS + 5)  # data inside a chunk that is mostly hole
    os.pwrite(fd, b"\x40" * CS, 40 * CS)
    os.pwrite(fd, b"\x3f" * 10, SIZE - 10)  # the last bytes, after a long hole
    os.close(fd)
    ex = Export("disk0", SIZE, str(img), lambda: j, chunk_size=CS)
    ex.open()
    try:
        assert ex.next_data(8 * CS) in range(8 * CS, 40 * CS + 1)
        progress = _Progress()
        seq = asyncio.run(onboard_export(ex, lambda: j, 1 << 40, asyncio.Event(), progress))
        assert seq is not None
        assert progress.onboard_scanned == SIZE
        image = img.read_bytes()
        assert j.read("disk0", 0, SIZE) == image
        assert j.read("disk0", 7 * CS, CS) == bytes(CS)
    finally:
        ex.close()
        j.close()
