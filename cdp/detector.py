"""Corruption quarantine: spot in-place encryption in the write stream, pin the last clean point.

The signature of ransomware on a block device is a burst of *overwrites* that turn blocks
holding compressible data (text, databases, executables) into incompressible ones, in place.
Writing incompressible data into empty or trimmed space (copying tarballs, JPEGs, video onto
a disk) is ordinary, so is rewriting data that was already incompressible.

How it is measured, cheaply: each written piece is sampled (its first ``SAMPLE`` bytes) and
compressed with zstd level 1 (a few microseconds per sample, off the acknowledgement path
and off the daemon's GIL: the detector runs in its own process, cdp/detector_worker.py, fed
by a ring the journal's tap fills, cdp/detector_feed.py). Each 4 KiB block of each volume
keeps one byte: the compressibility class of what it last held (``EMPTY`` for never written,
zero or trimmed; otherwise the sampled ratio). A block nobody has seen since the worker
started is looked up once in the journal (the bytes as of just before the write), so a
restart never blinds the detector.

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

An alarm needs at least ``min_bytes`` of net suspicious overwrites, a score of at least
``min_fraction``, and that at least ``min_incompressible`` of the window's overwrites wrote
incompressible data. An encryptor makes everything it overwrites incompressible; ordinary
content replacement (the fresh file system above, whose new files land on old text) writes
text as well: in the benchmark's replays its windows held 38 % incompressible overwrites at
their highest score, every attack's window 83-100 % at its alarm. The burst starts at its
first suspicious write since the window was last quiet; the point just before it is the
last clean point.

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
UNSEEN = 255  # a class no sample yields (ratio_class stops at 254): ask ``prior``
Sensitivity = Literal["low", "normal", "high"]


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Thresholds; ``sensitivity`` picks them (``normal`` is the default)."""

    window_ns: int = 10 * 10**9
    min_bytes: int = 512 << 10
    min_fraction: float = 0.25  # file system metadata rewritten around each file dilutes it
    min_incompressible: float = 0.6  # share of the window's overwrites that wrote such data
    incompressible: float = 0.97  # sampled zstd ratio at or above: looks encrypted/compressed
    redundant_weight: float = 0.5  # incompressible over incompressible, in the denominator
    compressible: float = 0.90  # at or below: held ordinary data before
    cooldown_ns: int = 60 * 10**9  # at most one alarm a minute, bursts or not
    burst_gap_ns: int = 5 * 60 * 10**9  # a slow attack pausing less than this is one burst,
    # and one burst raises one alarm: every later one would pin the same last clean point

    @classmethod
    def for_sensitivity(cls, s: Sensitivity) -> DetectorConfig:
        if s == "high":
            return cls(min_bytes=128 << 10, min_fraction=0.15, min_incompressible=0.5)
        if s == "low":
            return cls(min_bytes=4 << 20, min_fraction=0.5, min_incompressible=0.7)
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


class Write:
    """A write as the detector reads it from its ring: the fields of a ``WriteRecord`` it
    uses, built for a tenth of the cost (a frozen dataclass sets each field through
    ``object.__setattr__``; at 20,000 writes a second that is a few percent of a core)."""

    __slots__ = ("data", "length", "offset", "seq", "ts", "volume")

    def __init__(
        self, seq: int, ts: int, volume: str, offset: int, length: int, data: bytes | memoryview
    ) -> None:
        self.seq, self.ts, self.volume = seq, ts, volume
        self.offset, self.length, self.data = offset, length, data


Observed = Record | Write


def _class_of(stored: int, n: int) -> int:
    return max(1, min(UNSEEN - 1, round(stored / n * 250)))


# The class of a full sample by its compressed size: the same arithmetic, done once. The
# worker classifies one sample per guest write, so each step here is paid 20,000 times a
# second; the table, the comparison with zeroes (a memcmp, against a count of every byte)
# and compressing the view without a copy took 0.7-1 µs off each ``ratio_class`` call
# (docs/benchmarks.md).
_FULL_CLASS = bytes(_class_of(k, SAMPLE) for k in range(2 * SAMPLE))
_ZEROES = bytes(SAMPLE)


def ratio_class(sample: bytes | memoryview, cctx: zstandard.ZstdCompressor) -> int:
    """1..254 for the sample's zstd ratio (x250: room above 1.0 for incompressible frames).

    EMPTY for zeroes: filling empty space is never suspicious.
    """
    if isinstance(sample, memoryview) and (
        sample.ndim != 1 or sample.format != "B" or not sample.contiguous
    ):  # len() would count items, not bytes
        sample = bytes(sample)
    n = len(sample)
    if not n or sample == (_ZEROES if n == SAMPLE else bytes(n)):
        return EMPTY
    stored = len(cctx.compress(sample))
    if n == SAMPLE and stored < len(_FULL_CLASS):
        return _FULL_CLASS[stored]
    return _class_of(stored, n)  # tiny samples pass 1.02: not UNSEEN


@dataclass(slots=True)
class _Event:
    ts: int
    seq: int
    suspicious: int
    overwrite: int
    volume: str
    incompressible: int = 0  # bytes overwritten in place with incompressible data (any before)
    reverse: int = 0  # overwritten the other way: incompressible before, compressible now


PAGE = 256  # blocks per page of a volume's class map (1 MiB of volume)
SPREAD = 4  # samples of a long write before it is trusted to be of one kind
_LEARNED = bytes([EMPTY] + [UNSEEN] * 255)  # a written_blocks map byte -> its class


@dataclass(frozen=True, slots=True)
class _Tables:
    """``bytes.translate`` tables, class -> 0/1, for counting transitions in C."""

    nonempty: bytes
    low: bytes  # held compressible data
    high: bytes  # incompressible
    made_low: bytes  # written compressible (zeroes count: the incompressible data is gone)
    kind: bytes  # 0 empty, 1 compressible, 2 between, 3 incompressible

    @classmethod
    def of(cls, lo: int, hi: int) -> _Tables:
        r = range(256)
        return cls(
            bytes(int(c != EMPTY) for c in r),
            bytes(int(c != EMPTY and c <= lo) for c in r),
            bytes(int(c >= hi) for c in r),
            bytes(int(c <= lo) for c in r),
            bytes(0 if c == EMPTY else 3 if c >= hi else 1 if c <= lo else 2 for c in r),
        )


def _both(a: bytes, b: bytes) -> bytes:
    """Bytewise AND of two 0/1 strings, in C (one big-int AND instead of a loop)."""
    n = len(a)
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(n, "little")


@dataclass(slots=True)
class GroupDetector:
    """Scores one consistency group's write stream (all its volumes share the window).

    ``prior(volume, offset, length, seq)`` returns the bytes a range held as of ``seq``
    (from the journal; shorter past the volume's end, for a size that is not a multiple of
    4 KiB); it is asked once per block the detector has not seen.

    Per write the work is a few C calls, not a Python loop per 4 KiB block: classes live
    in one byte per block in 1 MiB pages, transitions are counted with ``bytes.translate``
    and ``count``, and a long write is sampled at ``SPREAD`` places first: when they agree
    (one file's data, the usual case) their class stands for the whole write, and only a
    write whose samples disagree is sampled block by block. At 1 MiB writes that is 4
    samples instead of 256, which keeps the detector from taking a guest's CPU (it shares
    the daemon's GIL with the NBD event loop).
    """

    chunk_size: int
    config: DetectorConfig
    prior: Callable[[str, int, int, int], bytes]
    excluded: frozenset[str] = frozenset()
    pages: dict[str, dict[int, bytearray]] = field(default_factory=dict)  # volume -> page no
    max_pages: int = 262_144  # per volume: 256 GiB of it, about 110 MB; forgotten are re-read
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
    # with the size in the frame, zstd sizes its tables to the 1 KiB sample instead of
    # clearing ones for a 512 KiB window each time: 3x faster; classes move by one step
    # (0.4 %) at most, on 4,515 samples of /usr, none across a threshold
    _cctx: zstandard.ZstdCompressor = field(
        default_factory=lambda: zstandard.ZstdCompressor(
            level=1, write_content_size=True, write_checksum=False
        )
    )
    _t: _Tables = field(init=False)

    def __post_init__(self) -> None:
        self._t = _Tables.of(self._lo(), self._hi())

    def _hi(self) -> int:
        return round(self.config.incompressible * 250)

    def _lo(self) -> int:
        return round(self.config.compressible * 250)

    def block_class(self, volume: str, block: int) -> int | None:
        """What the detector holds for one 4 KiB block (None: not seen)."""
        page = self.pages.get(volume, {}).get(block // PAGE)
        c = UNSEEN if page is None else page[block % PAGE]
        return None if c == UNSEEN else c

    def observe(self, records: Iterable[Observed]) -> list[Detection]:
        """Feed records in seq order (writes with inline data); returns new detections."""
        out = []
        for r in records:
            if isinstance(r, ZeroRecord):
                self._zero(r.volume, r.offset, r.length)
            elif isinstance(r, (Write, WriteRecord)) and r.data is not None:
                if r.volume in self.excluded:
                    continue
                d = self._write(r)
                if d is not None:
                    out.append(d)
        return out

    def unknown_pages(self, records: Iterable[Observed]) -> list[tuple[str, int, int]]:
        """``(volume, page, seq)`` for each class page that a write among ``records``
        touches and the detector holds nothing of (new to it, or forgotten), with the seq
        just before the first such write: ``learn_page`` takes the journal's map of that
        page as of that seq. Every record up to it has been observed or is in ``records``
        ahead of that write, so the map is right for each block's first write after it.
        """
        out: list[tuple[str, int, int]] = []
        asked: set[tuple[str, int]] = set()
        span = BLOCK * PAGE
        for r in records:
            if not isinstance(r, (Write, WriteRecord)) or r.data is None:
                continue
            if r.volume in self.excluded:
                continue
            pages = self.pages.get(r.volume, {})
            for p in range(r.offset // span, (r.offset + r.length - 1) // span + 1):
                if p not in pages and (r.volume, p) not in asked:
                    asked.add((r.volume, p))
                    out.append((r.volume, p, r.seq - 1))
        return out

    def learn_page(self, volume: str, page: int, written: bytes) -> None:
        """Take the journal's map of one page, a byte per block (1: may hold data): blocks
        that never held data are ``EMPTY`` at once, so the first write into empty space
        costs no ``prior`` read; the others stay unseen until one. A page known by now,
        or a map that is not a whole page, is left alone.
        """
        if len(written) == PAGE and page not in self.pages.get(volume, {}):
            self._put(volume, page * PAGE, written.translate(_LEARNED))

    def needs(self, records: Iterable[Observed]) -> list[tuple[str, int, int, int]]:
        """The ``prior`` reads that ``observe(records)`` will make, as ``(volume, offset,
        length, seq)``: a detector in its own process asks the daemon for all of them in one
        round trip. A guess that turns out wrong only costs ``observe`` a read of its own.
        """
        out: list[tuple[str, int, int, int]] = []
        known: dict[str, set[int]] = {}  # blocks an earlier record of the batch makes known
        for r in records:
            if not isinstance(r, (Write, WriteRecord, ZeroRecord)) or r.volume in self.excluded:
                continue
            first, last = r.offset // BLOCK, (r.offset + r.length - 1) // BLOCK
            s = known.setdefault(r.volume, set())
            if isinstance(r, ZeroRecord):
                if s:
                    s.difference_update([b for b in s if first <= b <= last])
                continue
            if r.data is None:
                continue
            if first == last:  # one block: the common case, without building a span
                page = self.pages.get(r.volume, {}).get(first // PAGE)
                if (page is None or page[first % PAGE] == UNSEEN) and first not in s:
                    out.append((r.volume, first * BLOCK, BLOCK, r.seq - 1))
                s.add(first)
                continue
            old = self._get(r.volume, first, last - first + 1)
            unseen = [k for k, c in enumerate(old) if c == UNSEEN and first + k not in s]
            if unseen:
                c0, c1 = first + unseen[0], first + unseen[-1] + 1
                out.append((r.volume, c0 * BLOCK, (c1 - c0) * BLOCK, r.seq - 1))
            s.update(range(first, last + 1))
        return out

    def _zero(self, volume: str, offset: int, length: int) -> None:
        """Zeroes or a trim: whole pages are dropped (RAM stays flat over mkfs and fstrim,
        and a later write asks the journal, which answers zeroes: EMPTY); edges are EMPTY."""
        pages = self.pages.get(volume)
        if not pages:
            return
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        p0, p1 = first // PAGE, last // PAGE
        span = range(p0, p1 + 1) if p1 - p0 < len(pages) else sorted(pages)
        for p in span:
            page = pages.get(p)
            if page is None or not p0 <= p <= p1:
                continue
            a, z = max(first, p * PAGE) - p * PAGE, min(last + 1, (p + 1) * PAGE) - p * PAGE
            if a == 0 and z == PAGE:
                del pages[p]
            else:
                page[a:z] = bytes(z - a)

    def _get(self, volume: str, first: int, n: int) -> bytearray:
        pages = self.pages.get(volume, {})
        out = bytearray()
        b = first
        while b < first + n:
            p, i = divmod(b, PAGE)
            k = min(PAGE - i, first + n - b)
            page = pages.get(p)
            out += bytes([UNSEEN]) * k if page is None else page[i : i + k]
            b += k
        return out

    def _put(self, volume: str, first: int, classes: bytes | bytearray) -> None:
        pages = self.pages.setdefault(volume, {})
        b, n = first, len(classes)
        while b < first + n:
            p, i = divmod(b, PAGE)
            k = min(PAGE - i, first + n - b)
            page = pages.get(p)
            if page is None:
                page = pages[p] = bytearray([UNSEEN]) * PAGE
            page[i : i + k] = classes[b - first : b - first + k]
            b += k
        if len(pages) > self.max_pages:
            for _ in range(len(pages) - self.max_pages // 2):  # forget the oldest-made half
                pages.pop(next(iter(pages)))

    def _resolve(self, volume: str, first: int, n: int, seq: int) -> None:
        """Make blocks ``first .. first+n-1`` known: one journal read (as of ``seq``) of the
        span from the first unseen one to the last. (Reading whole chunks instead, so that
        random 4 KiB writes would ask once per chunk, was measured slower: the journal's
        read of a chunk that holds other writes costs more than the reads it saves.)
        """
        old = self._get(volume, first, n)
        u0 = old.find(UNSEEN)
        if u0 < 0:
            return
        c0, c1 = first + u0, first + old.rfind(UNSEEN) + 1
        span = old[u0 : c1 - first]
        seen = self._classify(self.prior(volume, c0 * BLOCK, (c1 - c0) * BLOCK, seq), c0 * BLOCK,
                              c0, c1 - c0)  # fmt: skip
        for k in range(c1 - c0):
            if span[k] == UNSEEN:
                span[k] = seen[k]
        self._put(volume, c0, span)

    def _classify(self, data: bytes | memoryview, offset: int, first: int, n: int) -> bytes:
        """One class per block ``first .. first+n-1`` of ``data``, which starts at ``offset``."""
        view = memoryview(data)

        def one(i: int) -> int:
            a = max((first + i) * BLOCK, offset) - offset
            z = min((first + i + 1) * BLOCK - offset, view.nbytes)
            if a >= view.nbytes:
                return EMPTY
            sample = view[a : min(z, a + SAMPLE)]
            self.sampled += 1
            self.sampled_bytes += sample.nbytes
            return ratio_class(sample, self._cctx)

        if n > SPREAD:
            got = [one(i) for i in sorted({0, n // 3, (2 * n) // 3, n - 1})]
            if len({self._t.kind[c] for c in got}) == 1:  # one kind at every sample
                if got[0] != EMPTY:
                    return bytes([got[0]]) * n
                if bytes(view).count(0) == view.nbytes:  # zeroes there: check all (in C)
                    return bytes(n)
        return bytes(one(i) for i in range(n))

    def _write(self, r: WriteRecord | Write) -> Detection | None:
        assert r.data is not None
        first, last = r.offset // BLOCK, (r.offset + r.length - 1) // BLOCK
        if first == last:
            return self._write_block(r, first)
        n = last - first + 1
        self._resolve(r.volume, first, n, r.seq - 1)
        old = self._get(r.volume, first, n)
        new = self._classify(r.data, r.offset, first, n)
        self._put(r.volume, first, new)
        t = self._t
        old_b = bytes(old)
        was = old_b.translate(t.nonempty)
        if not was.count(1):
            return None  # all of it went into empty space: ordinary
        now_hi = new.translate(t.high)
        edge = self._edges(r, first, last)
        overwrite = self._bytes(was, edge)
        incompressible = self._bytes(_both(was, now_hi), edge)
        suspicious = self._bytes(_both(old_b.translate(t.low), now_hi), edge)
        reverse = self._bytes(_both(old_b.translate(t.high), new.translate(t.made_low)), edge)
        return self._score(
            _Event(r.ts, r.seq, suspicious, overwrite, r.volume, incompressible, reverse)
        )

    def _write_block(self, r: WriteRecord | Write, b: int) -> Detection | None:
        """A write within one block (4 KiB guests, metadata): the same rules, no tables."""
        assert r.data is not None
        pages = self.pages.setdefault(r.volume, {})
        p, i = divmod(b, PAGE)
        page = pages.get(p)
        if page is None or page[i] == UNSEEN:
            self._resolve(r.volume, b, 1, r.seq - 1)
            page = pages.get(p)
            if page is None:  # forgotten at once (max_pages): keep this one
                page = pages[p] = bytearray([UNSEEN]) * PAGE
        old = page[i]
        sample = memoryview(r.data)[:SAMPLE]
        self.sampled += 1
        self.sampled_bytes += sample.nbytes
        new = page[i] = ratio_class(sample, self._cctx)
        if old == EMPTY:
            return None
        t, n = self._t, r.length
        hi = t.high[new]
        return self._score(
            _Event(
                r.ts, r.seq, n * (hi & t.low[old]), n, r.volume, n * hi,
                n * (t.high[old] & t.made_low[new]),
            )
        )  # fmt: skip

    @staticmethod
    def _edges(r: WriteRecord | Write, first: int, last: int) -> tuple[int, int]:
        """Bytes the first and the last block miss of a whole block (unaligned writes)."""
        head = r.offset - first * BLOCK
        tail = (last + 1) * BLOCK - (r.offset + r.length)
        if first == last:
            return head + tail, 0
        return head, tail

    @staticmethod
    def _bytes(flags: bytes, edge: tuple[int, int]) -> int:
        total = flags.count(1) * BLOCK
        if flags and flags[0]:
            total -= edge[0]
        if len(flags) > 1 and flags[-1]:
            total -= edge[1]
        return total

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
        if score < cfg.min_fraction or sus + self._redundant < cfg.min_incompressible * total:
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
