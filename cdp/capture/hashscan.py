"""Hash-scan capture: find what changed in a volume with no change tracking at all.

Each pass reads the volume chunk by chunk (rate-limited, so production comes first), hashes
each chunk with xxh3-128 and journals the chunks whose hash moved since the last pass. A
chunk with no remembered hash (first pass, or after a restart) is compared byte for byte with
what the journal holds at its latest seq, so a restart never re-journals unchanged data and
never misses a change made while the daemon was down.

The first pass of a volume is its onboarding: the image as found becomes the first point.
A scan of a live file is not write-order consistent (no splitter sees the writes); its
points are consistent only when the volume is quiet, as with any CBT-less backup tool.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import xxhash

from journal import Journal


@dataclass(slots=True)
class ScanProgress:
    """Live counters, read by status from another thread (plain int/bool assignments)."""

    passes: int = 0
    scanning: bool = False
    scanned_bytes: int = 0
    total_bytes: int = 0
    changed_bytes: int = 0
    last_scan_ns: int = 0
    last_error: str | None = None
    first_point_seq: int | None = None
    history: list[int] = field(default_factory=list)


class RateLimiter:
    """Token bucket over bytes; ``rate_bps`` 0 means unlimited."""

    def __init__(self, rate_bps: int, *, burst_s: float = 0.25) -> None:
        self.rate = rate_bps
        self.burst = max(1, int(rate_bps * burst_s))
        self._tokens = float(self.burst)
        self._t = time.monotonic()

    def delay(self, n: int) -> float:
        """Account for n bytes; returns how long to wait to stay under the rate."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens -= n
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def take(self, n: int, stop: threading.Event) -> None:
        wait = self.delay(n)
        if wait:
            stop.wait(wait)


class HashScanner:
    def __init__(
        self, journal: Journal, volume: str, path: str, *, chunk_size: int, rate_bps: int
    ) -> None:
        self.journal = journal
        self.volume = volume
        self.path = path
        self.chunk_size = chunk_size
        self.rate_bps = rate_bps
        self._hashes: dict[int, bytes] = {}
        self.progress = ScanProgress()

    def scan_once(self, stop: threading.Event) -> int:
        """One pass; returns bytes journaled. Runs in a worker thread."""
        size = self.journal.volume_size(self.volume)
        cs = self.chunk_size
        limiter = RateLimiter(self.rate_bps)
        zero = bytes(cs)
        changed = 0
        p = self.progress
        p.scanning, p.scanned_bytes, p.total_bytes = True, 0, size
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            p.last_error, p.scanning = f"cannot open {self.path}: {e.strerror}", False
            raise
        try:
            file_size = os.fstat(fd).st_size
            for c in range((size + cs - 1) // cs):
                if stop.is_set():
                    return changed
                off = c * cs
                n = min(cs, size - off)
                data = os.pread(fd, n, off) if off < file_size else b""
                if len(data) < n:  # a shorter file reads as zeros past its end
                    data += bytes(n - len(data))
                limiter.take(n, stop)
                digest = xxhash.xxh3_128_digest(data)
                known = self._hashes.get(c)
                if known != digest:
                    if known is not None or self.journal.read(self.volume, off, n) != data:
                        if data == zero[:n]:
                            self.journal.zero(self.volume, off, n)
                        else:
                            self.journal.write(self.volume, off, data)
                        changed += n
                    self._hashes[c] = digest
                p.scanned_bytes = off + n
        finally:
            os.close(fd)
            p.scanning = False
        self.journal.sync()
        p.passes += 1
        p.changed_bytes += changed
        p.last_scan_ns = time.time_ns()
        p.last_error = None
        return changed
