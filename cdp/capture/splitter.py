"""The NBD write splitter's capture-side helpers: onboarding and the clean-shutdown marker.

The splitter itself is ``cdp/nbd/export.py`` (every write goes to the image and the journal).
What lives here is what happens around it:

- Onboarding: a volume whose image already holds data is protected from its current content.
  The image is compared chunk by chunk with the journal's latest state, and what differs is
  journaled. Each step runs on the event loop thread, the same thread that applies guest
  writes, so a guest write can never fall between reading a chunk and journaling it. Points
  before onboarding finishes are incomplete; the first complete point is the checkpoint
  ``onboarded:<volume>``, shown in status.
- Clean marker: written at a clean stop (image and journal flushed and equal), so the next
  start skips the comparison. After a crash there is no marker, and the comparison catches a
  write that reached the image but not the journal (it was never acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from typing import Protocol

from cdp.capture.hashscan import RateLimiter
from cdp.nbd.export import Export
from journal import CheckpointKind, Journal

_STEP = 64  # chunks per loop turn: bounded latency for guest I/O


class _Progress(Protocol):
    onboard_scanned: int


class CleanMarker:
    def __init__(self, group_path: str, volume: str) -> None:
        self.path = os.path.join(group_path, f"clean-{volume}.json")

    @staticmethod
    def _identity(image: str) -> dict[str, int]:
        st = os.stat(image)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}

    def write(self, image: str) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._identity(image), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def matches(self, image: str) -> bool:
        try:
            with open(self.path) as f:
                return bool(json.load(f) == self._identity(image))
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


async def onboard_export(
    ex: Export,
    journal: Callable[[], Journal],
    rate_bps: int,
    stop: asyncio.Event,
    progress: _Progress,
) -> int | None:
    """Journal whatever differs between the image and the journal; returns the first point."""
    cs = ex.chunk_size
    limiter = RateLimiter(rate_bps)
    nchunks = (ex.size + cs - 1) // cs
    zero = bytes(cs)
    for start in range(0, nchunks, _STEP):
        if stop.is_set():
            return None
        j = journal()
        data_at = -1  # next image data at or after ``off`` (holes need no read)
        for c in range(start, min(start + _STEP, nchunks)):
            off = c * cs
            n = min(cs, ex.size - off)
            if data_at < off:
                data_at = ex.next_data(off)
            data = zero[:n] if data_at >= off + n else ex.read(off, n)
            if j.read(ex.name, off, n) != data:
                if data == zero[:n]:
                    j.zero(ex.name, off, n)
                else:
                    j.write(ex.name, off, data)
            progress.onboard_scanned = off + n
        ex.drop_cache(start * cs, _STEP * cs)
        wait = limiter.delay(_STEP * cs)
        await asyncio.sleep(wait)
    j = journal()
    done = j.find_checkpoint(f"onboarded:{ex.name}")
    if done is not None:  # a catch-up after a crash: the first point stays where it was
        await asyncio.to_thread(j.sync)
        return int(done.seq)
    seq = j.checkpoint(f"onboarded:{ex.name}", CheckpointKind.CRASH)
    await asyncio.to_thread(j.sync)
    return int(seq)
