"""Corruption quarantine: spot in-place encryption in the write stream, pin the last clean point.

The signature of ransomware on a block device is a burst of *overwrites* that turn blocks
holding compressible data (text, databases, executables) into incompressible ones, in place.
Writing incompressible data into empty or trimmed space (copying tarballs, JPEGs, video onto
a disk) is ordinary, so is rewriting data that was already incompressible.

How it is measured, cheaply: each written piece is sampled (its first ``SAMPLE`` bytes) and
compressed with zstd level 1 (a few microseconds per sample, off the acknowledgement path:
the detector tails the journal like a replica sender does). Each chunk of each volume keeps
one byte: the compressibility class of what it last held (``EMPTY`` for never written, zero
or trimmed; otherwise the sampled ratio). A chunk nobody has seen since the daemon started
is looked up once in the journal (the bytes as of just before the write), so a restart
never blinds the detector.

Scoring: over a sliding window of journal time (``window_ns``), the bytes of suspicious
overwrites (was compressible, now incompressible) against all overwrites of non-empty
chunks. An alarm needs at least ``min_bytes`` of suspicious overwrites and that they are at
least ``min_fraction`` of the window's overwrites. The burst starts at its first suspicious
write since the window was last quiet; the point just before it is the last clean point.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import zstandard

from journal import Record, WriteRecord, ZeroRecord

log = logging.getLogger(__name__)

SAMPLE = 1024
EMPTY = 0  # never written, zeroes or trimmed: filling it with anything is ordinary
Sensitivity = Literal["low", "normal", "high"]


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Thresholds; ``sensitivity`` picks them (``normal`` is the default)."""

    window_ns: int = 10 * 10**9
    min_bytes: int = 512 << 10
    min_fraction: float = 0.5
    incompressible: float = 0.97  # sampled zstd ratio at or above: looks encrypted/compressed
    compressible: float = 0.90  # at or below: held ordinary data before
    cooldown_ns: int = 60 * 10**9  # one alarm per burst
    burst_gap_ns: int = 5 * 60 * 10**9  # a slow attack pausing less than this is one burst

    @classmethod
    def for_sensitivity(cls, s: Sensitivity) -> DetectorConfig:
        if s == "high":
            return cls(min_bytes=128 << 10, min_fraction=0.3)
        if s == "low":
            return cls(min_bytes=4 << 20, min_fraction=0.7)
        return cls()


@dataclass(frozen=True, slots=True)
class Detection:
    """A burst that looks like in-place encryption."""

    volumes: tuple[str, ...]
    first_seq: int  # first suspicious write of the burst
    last_clean_seq: int  # the point just before it
    first_ts: int
    detected_seq: int
    detected_ts: int
    suspicious_bytes: int
    overwrite_bytes: int

    @property
    def score(self) -> float:
        return self.suspicious_bytes / max(1, self.overwrite_bytes)


def ratio_class(sample: bytes | memoryview, cctx: zstandard.ZstdCompressor) -> int:
    """1..255 for the sample's zstd ratio (x250: room above 1.0 for incompressible frames).

    EMPTY for zeroes: filling empty space is never suspicious.
    """
    b = bytes(sample)
    if not b or b.count(0) == len(b):
        return EMPTY
    r = len(cctx.compress(b)) / len(b)
    return max(1, min(255, round(r * 250)))


@dataclass(slots=True)
class _Event:
    ts: int
    seq: int
    suspicious: int
    overwrite: int
    volume: str


@dataclass(slots=True)
class GroupDetector:
    """Scores one consistency group's write stream (all its volumes share the window).

    ``prior(volume, offset, length, seq)`` returns the bytes a range held just before
    ``seq`` (from the journal); it is asked once per chunk the detector has not seen.
    """

    chunk_size: int
    config: DetectorConfig
    prior: Callable[[str, int, int, int], bytes]
    excluded: frozenset[str] = frozenset()
    maps: dict[str, dict[int, int]] = field(default_factory=dict)
    window: deque[_Event] = field(default_factory=deque)
    burst_first: tuple[int, int] | None = None  # (seq, ts) of the burst's first suspicious write
    last_suspicious_ts: int = 0
    quiet_until: int = 0
    detections: list[Detection] = field(default_factory=list)
    sampled: int = 0
    sampled_bytes: int = 0
    _cctx: zstandard.ZstdCompressor = field(
        default_factory=lambda: zstandard.ZstdCompressor(
            level=1, write_content_size=False, write_checksum=False
        )
    )

    def _hi(self) -> int:
        return round(self.config.incompressible * 250)

    def _lo(self) -> int:
        return round(self.config.compressible * 250)

    def observe(self, records: Iterable[Record]) -> list[Detection]:
        """Feed records in seq order (writes with inline data); returns new detections."""
        out = []
        for r in records:
            if isinstance(r, ZeroRecord):
                m = self.maps.setdefault(r.volume, {})
                cs = self.chunk_size
                for c in range(r.offset // cs, (r.offset + r.length - 1) // cs + 1):
                    m[c] = EMPTY
            elif isinstance(r, WriteRecord) and r.data is not None:
                if r.volume in self.excluded:
                    continue
                d = self._write(r)
                if d is not None:
                    out.append(d)
        return out

    def _write(self, r: WriteRecord) -> Detection | None:
        assert r.data is not None
        cs = self.chunk_size
        data = memoryview(r.data)
        m = self.maps.setdefault(r.volume, {})
        suspicious = overwrite = 0
        pos, end = r.offset, r.offset + r.length
        while pos < end:
            c = pos // cs
            nxt = min((c + 1) * cs, end)
            piece = data[pos - r.offset : nxt - r.offset]
            new = ratio_class(piece[:SAMPLE], self._cctx)
            self.sampled += 1
            self.sampled_bytes += min(SAMPLE, len(piece))
            old = m.get(c)
            if old is None:  # not seen since start: what did it hold just before?
                old = ratio_class(self.prior(r.volume, pos, min(SAMPLE, nxt - pos), r.seq - 1),
                                  self._cctx)  # fmt: skip
            if old != EMPTY:
                overwrite += len(piece)
                if new >= self._hi() and old <= self._lo():
                    suspicious += len(piece)
            m[c] = new
            pos = nxt
        if overwrite == 0:
            return None
        return self._score(_Event(r.ts, r.seq, suspicious, overwrite, r.volume))

    def _score(self, ev: _Event) -> Detection | None:
        cfg = self.config
        w = self.window
        w.append(ev)
        while w and w[0].ts < ev.ts - cfg.window_ns:
            w.popleft()
        if ev.suspicious:
            if self.burst_first is None or ev.ts - self.last_suspicious_ts > cfg.burst_gap_ns:
                self.burst_first = (ev.seq, ev.ts)  # a new burst (or the first)
            self.last_suspicious_ts = ev.ts
        sus = sum(e.suspicious for e in w)
        if sus == 0 or self.burst_first is None:
            return None
        if ev.ts < self.quiet_until:
            return None
        total = sum(e.overwrite for e in w)
        if sus < cfg.min_bytes or sus < cfg.min_fraction * total:
            return None
        seq0, ts0 = self.burst_first
        d = Detection(
            tuple(sorted({e.volume for e in w if e.suspicious})),
            seq0,
            seq0 - 1,
            ts0,
            ev.seq,
            ev.ts,
            sus,
            total,
        )
        self.quiet_until = ev.ts + cfg.cooldown_ns
        self.detections.append(d)
        return d
