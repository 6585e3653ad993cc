"""Corruption quarantine: spot in-place encryption in the write stream, pin the last clean point.

The signature of ransomware on a block device is a burst of *overwrites* that turn blocks
holding compressible data (text, databases, executables) into incompressible ones, in place.
Writing incompressible data into empty or trimmed space (copying tarballs, JPEGs, video onto
a disk) is ordinary, so is rewriting data that was already incompressible.

How it is measured, cheaply: each written piece is sampled (its first ``SAMPLE`` bytes) and
compressed with zstd level 1 (a few microseconds per sample, off the acknowledgement path:
the detector tails the journal like a replica sender does). Each 4 KiB block of each volume
keeps one byte: the compressibility class of what it last held (``EMPTY`` for never written, zero
or trimmed; otherwise the sampled ratio). A chunk nobody has seen since the daemon started
is looked up once in the journal (the bytes as of just before the write), so a restart
never blinds the detector.

One byte-class per 4 KiB block (a file system's block): a small file shares a chunk with
others, so a coarser map would see the second file's old content as the first one's new.

Scoring: over a sliding window of journal time (``window_ns``), the bytes of suspicious
overwrites (was compressible, now incompressible) against all overwrites of non-empty
blocks. Two corrections keep ordinary rewrites of dead space from scoring like encryption:

* Overwrites the other way (incompressible before, compressible now) cancel suspicious
  ones byte for byte. New content written over a dead file system's blocks (a fresh mkfs
  over a used, untrimmed disk, then a copy) turns text into gzip as often as gzip into text;
  encryption never makes a block compressible.
* Overwrites of incompressible data with incompressible data count half in the
  denominator: an attacker encrypting ``.gz`` and ``.jpg`` files writes them, and so does a
  copy over freed tarballs, so they say little either way; counted fully they dilute an
  attack on a home directory full of compressed files for seconds.

An alarm needs at least ``min_bytes`` of net suspicious overwrites and a score of at least
``min_fraction``. The burst starts at its first suspicious write since the window was last
quiet; the point just before it is the last clean point.

What it cannot tell apart: incompressible files copied onto space that held compressible
files which were deleted but never trimmed. Without ``discard`` in the guest (or a periodic
``fstrim``) the block device cannot know those blocks were free; docs/config.md says so.
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
BLOCK = 4096  # file systems allocate in 4 KiB blocks: one class per block
EMPTY = 0  # never written, zeroes or trimmed: filling it with anything is ordinary
Sensitivity = Literal["low", "normal", "high"]


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Thresholds; ``sensitivity`` picks them (``normal`` is the default)."""

    window_ns: int = 10 * 10**9
    min_bytes: int = 512 << 10
    min_fraction: float = 0.25  # file system metadata rewritten around each file dilutes it
    incompressible: float = 0.97  # sampled zstd ratio at or above: looks encrypted/compressed
    redundant_weight: float = 0.5  # incompressible over incompressible, in the denominator
    compressible: float = 0.90  # at or below: held ordinary data before
    cooldown_ns: int = 60 * 10**9  # at most one alarm a minute, bursts or not
    burst_gap_ns: int = 5 * 60 * 10**9  # a slow attack pausing less than this is one burst,
    # and one burst raises one alarm: every later one would pin the same last clean point

    @classmethod
    def for_sensitivity(cls, s: Sensitivity) -> DetectorConfig:
        if s == "high":
            return cls(min_bytes=128 << 10, min_fraction=0.15)
        if s == "low":
            return cls(min_bytes=4 << 20, min_fraction=0.5)
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
    suspicious_bytes: int  # compressible -> incompressible, in the window
    reverse_bytes: int  # incompressible -> compressible, in the window (cancels as many)
    overwrite_bytes: int
    score: float  # what crossed ``min_fraction``


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
    incompressible: int = 0  # bytes overwritten in place with incompressible data (any before)
    reverse: int = 0  # overwritten the other way: incompressible before, compressible now


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
    maps: dict[str, dict[int, int]] = field(default_factory=dict)  # volume -> block -> class
    max_blocks: int = 4_000_000  # per volume (about 0.3 GB of RAM); forgotten ones are re-read
    window: deque[_Event] = field(default_factory=deque)
    burst_first: tuple[int, int] | None = None  # (seq, ts) of the burst's first suspicious write
    last_suspicious_ts: int = 0
    # recent in-place incompressible overwrites (ts, seq): an attack that begins with files
    # that were already compressed (.gz, .jpg) leaves no suspicious transition there, so the
    # burst's start is walked back through these
    recent_hi: deque[tuple[int, int]] = field(default_factory=deque)
    quiet_until: int = 0
    alarmed_burst: int | None = None  # burst_first seq of the last alarm: one alarm per burst
    detections: list[Detection] = field(default_factory=list)
    sampled: int = 0
    sampled_bytes: int = 0
    _sus: int = 0  # suspicious bytes in the window
    _over: int = 0  # overwritten bytes in the window
    _redundant: int = 0  # of those, incompressible over incompressible
    _reverse: int = 0  # of those, incompressible -> compressible
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
                # forget the range (a later write asks the journal: zeroes there, so EMPTY);
                # storing a class per block would cost RAM per byte trimmed (mkfs, fstrim)
                m = self.maps.get(r.volume)
                if m:
                    lo, hi = r.offset // BLOCK, (r.offset + r.length - 1) // BLOCK
                    if hi - lo + 1 <= len(m):
                        for b in range(lo, hi + 1):
                            m.pop(b, None)
                    else:
                        for b in [b for b in m if lo <= b <= hi]:
                            del m[b]
            elif isinstance(r, WriteRecord) and r.data is not None:
                if r.volume in self.excluded:
                    continue
                d = self._write(r)
                if d is not None:
                    out.append(d)
        return out

    def _write(self, r: WriteRecord) -> Detection | None:
        assert r.data is not None
        data = memoryview(r.data)
        m = self.maps.setdefault(r.volume, {})
        suspicious = overwrite = incompressible = reverse = 0
        first, last = r.offset // BLOCK, (r.offset + r.length - 1) // BLOCK
        unknown = [b for b in range(first, last + 1) if b not in m]
        if unknown:  # one journal read for what this write covers and nobody saw yet
            lo, hi = (
                max(unknown[0] * BLOCK, r.offset),
                min((unknown[-1] + 1) * BLOCK, r.offset + r.length),
            )
            before = memoryview(self.prior(r.volume, lo, hi - lo, r.seq - 1))
            for b in unknown:
                a = max(b * BLOCK, r.offset) - lo
                m[b] = ratio_class(before[a : a + SAMPLE], self._cctx) if len(before) > a else EMPTY
        for b in range(first, last + 1):
            a = max(b * BLOCK, r.offset)
            z = min((b + 1) * BLOCK, r.offset + r.length)
            new = ratio_class(data[a - r.offset : a - r.offset + min(SAMPLE, z - a)], self._cctx)
            self.sampled += 1
            self.sampled_bytes += min(SAMPLE, z - a)
            old = m[b]
            if old != EMPTY:
                overwrite += z - a
                if new >= self._hi():
                    incompressible += z - a
                    if old <= self._lo():
                        suspicious += z - a
                elif old >= self._hi() and new <= self._lo():
                    reverse += z - a
            m[b] = new
        if len(m) > self.max_blocks:
            for _ in range(len(m) - self.max_blocks // 2):  # forget the oldest-seen half
                m.pop(next(iter(m)))
        if overwrite == 0:
            return None
        return self._score(
            _Event(r.ts, r.seq, suspicious, overwrite, r.volume, incompressible, reverse)
        )

    def _score(self, ev: _Event) -> Detection | None:
        cfg = self.config
        w = self.window
        w.append(ev)
        self._sus += ev.suspicious  # running sums: scoring costs the same at any write rate
        self._over += ev.overwrite
        self._redundant += ev.incompressible - ev.suspicious
        self._reverse += ev.reverse
        if ev.incompressible:
            self.recent_hi.append((ev.ts, ev.seq))
        while self.recent_hi and self.recent_hi[0][0] < ev.ts - cfg.burst_gap_ns:
            self.recent_hi.popleft()
        while w and w[0].ts < ev.ts - cfg.window_ns:
            old = w.popleft()
            self._sus -= old.suspicious
            self._over -= old.overwrite
            self._redundant -= old.incompressible - old.suspicious
            self._reverse -= old.reverse
        if ev.suspicious:
            if self.burst_first is None or ev.ts - self.last_suspicious_ts > cfg.burst_gap_ns:
                self.burst_first = (ev.seq, ev.ts)  # a new burst (or the first)
            self.last_suspicious_ts = ev.ts
        sus = self._sus
        if sus == 0 or self.burst_first is None:
            return None
        if ev.ts < self.quiet_until or self.burst_first[0] == self.alarmed_burst:
            return None  # the point before this burst is pinned already
        net = sus - self._reverse
        if net < cfg.min_bytes:
            return None
        total = self._over
        score = net / max(1.0, total - cfg.redundant_weight * self._redundant)
        if score < cfg.min_fraction:
            return None
        seq0, ts0 = self._walk_back(*self.burst_first)
        d = Detection(
            tuple(sorted({e.volume for e in w if e.suspicious})),
            seq0,
            seq0 - 1,
            ts0,
            ev.seq,
            ev.ts,
            sus,
            self._reverse,
            total,
            score,
        )
        self.quiet_until = ev.ts + cfg.cooldown_ns
        self.alarmed_burst = self.burst_first[0]
        self.detections.append(d)
        return d

    def _walk_back(self, seq: int, ts: int) -> tuple[int, int]:
        """The earliest in-place incompressible overwrite chained (no pause over the window)
        to the burst's first suspicious write: the attack may have begun with files that
        were compressed already. An earlier clean point is still clean; a later one is not.
        """
        for t, s in reversed(self.recent_hi):
            if s >= seq:
                continue
            if t < ts - self.config.window_ns:
                break
            seq, ts = s, t
        return seq, ts
