"""The detector's feed: writes as capture appends them, in a ring of shared memory.

Why shared memory and a second process: the detector's per-write Python (a zstd sample,
the class map) run in a thread of the daemon holds the GIL the NBD event loop needs, and
cost guests two thirds of their 4 KiB IOPS (docs/benchmarks.md). In its own process it
costs the daemon one copy per write into this ring, under the journal's append lock.

One writer (the journal's tap, in the daemon) and one reader (cdp/detector_worker.py).
The ring is a memfd both map: a 64-byte header holding ``head`` (bytes ever written) and
``tail`` (bytes ever consumed), then ``capacity`` bytes of records, wrapping. The writer
publishes ``head`` only after a record's bytes are in place, the reader ``tail`` only after
it copied them out: each index has one writer, an aligned 8-byte store on x86-64, so
neither side locks.

A writer that finds no room drops the batch (the guest never waits for the detector) and
remembers the last seq it delivered; the next batch it can place is preceded by a ``GAP``
record naming the seqs dropped, which the reader asks the daemon to read back from the
journal. Nothing goes unscored, and a stalled detector costs capture nothing.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cdp.detector import Write
from journal import Record, WriteRecord, ZeroRecord
from journal.journal import WriteOp

HEADER = 64
_IDX = struct.Struct("<Q")
# kind, seq, ts, offset, length, name length; then the name, then a write's data
_REC = struct.Struct("<BQQQIH")
WRITE, ZERO, TRIM, GAP = 0, 1, 2, 3
DEFAULT_CAPACITY = 64 << 20


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``after+1 .. upto`` were dropped (or never tapped): read them back."""

    after: int
    upto: int


class Ring:
    """The shared ring; ``writer()`` for the daemon's side, ``reader()`` for the worker's."""

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self._mm = mmap.mmap(fd, HEADER + capacity)
        self._buf = memoryview(self._mm)

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY) -> Ring:
        fd = os.memfd_create("cdp-detector-feed")  # close-on-exec: inherited only where passed
        os.ftruncate(fd, HEADER + capacity)
        return cls(fd, capacity)

    def close(self) -> None:
        self._buf.release()
        self._mm.close()
        os.close(self.fd)

    def _head(self) -> int:
        return int(_IDX.unpack_from(self._mm, 0)[0])

    def _tail(self) -> int:
        return int(_IDX.unpack_from(self._mm, 8)[0])

    def _put(self, pos: int, data: bytes | memoryview) -> int:
        cap, n = self.capacity, len(data)
        at = pos % cap
        first = min(n, cap - at)
        self._buf[HEADER + at : HEADER + at + first] = data[:first]
        if first < n:
            self._buf[HEADER : HEADER + n - first] = data[first:]
        return pos + n

    def _get(self, pos: int, n: int) -> bytes:
        cap = self.capacity
        at = pos % cap
        first = min(n, cap - at)
        out = bytes(self._buf[HEADER + at : HEADER + at + first])
        if first < n:
            out += bytes(self._buf[HEADER : HEADER + n - first])
        return out


class RingWriter:
    """The daemon's end: ``tap`` is what ``Journal.set_tap`` is given."""

    def __init__(self, ring: Ring, after: int, excluded: frozenset[str] = frozenset()) -> None:
        self.ring = ring
        self.excluded = excluded
        self.delivered = after  # last seq placed in the ring (or scored before it)
        self.gap = False  # something after ``delivered`` was dropped
        self.dropped = 0  # batches dropped, for status
        self.failed = 0  # batches the tap could not place (a bug): read back like drops
        self.closed = False
        self._lock = threading.Lock()  # the tap runs wherever write_many is called
        self._names: dict[str, bytes] = {}

    def close(self) -> None:
        """No tap places anything after this returns (the ring may then be unmapped)."""
        with self._lock:
            self.closed = True

    def mark_gap(self) -> None:
        """Records appended while no tap was set (a reopened journal) must be read back."""
        with self._lock:
            self.gap = True

    def tap(self, recs: list[Record], ops: Sequence[WriteOp]) -> None:
        if not recs:
            return
        with self._lock:
            if self.closed:
                return
            try:
                if not self._place_direct(recs, ops):
                    parts, need = self._parts(recs, ops)
                    self._place(parts, need, int(recs[0].seq) - 1, int(recs[-1].seq))
            except Exception:  # never fail a write that is journaled already
                self.gap, self.failed = True, self.failed + 1

    def _name(self, volume: str) -> bytes | None:
        """The volume's name as the ring holds it, None for an excluded volume."""
        b = self._names.get(volume)
        if b is None and volume not in self.excluded:
            b = self._names[volume] = volume.encode()
        return b

    def _place_direct(self, recs: list[Record], ops: Sequence[WriteOp]) -> bool:
        """The common case in one pass: no gap to announce and room for the whole batch
        before the ring wraps, so each record is packed straight into the ring (no
        intermediate bytes per record: at 4 KiB this took about a quarter off the tap's cost,
        which is paid on the NBD loop for every write). False: nothing placed, use ``_place``."""
        if self.gap:
            return False
        r = self.ring
        head, cap = r._head(), r.capacity
        at = head % cap
        room = min(cap - (head - r._tail()), cap - at)
        need = 0
        for op in ops:
            data = op[1]
            need += _REC.size + 64 + (len(data) if data is not None else 0)
        if need > room:  # names longer than 64 bytes are counted again below
            return False
        mm, buf, pack, size = r._mm, r._buf, _REC.pack_into, _REC.size
        pos = HEADER + at
        limit = pos + room
        for rec, op in zip(recs, ops, strict=True):
            if isinstance(rec, WriteRecord):
                kind, data = WRITE, op[1]
            elif isinstance(rec, ZeroRecord):
                kind, data = (TRIM if rec.trim else ZERO), None
            else:
                continue
            name = self._name(rec.volume)
            if name is None:
                continue
            nl = len(name)
            n = len(data) if data is not None else 0
            if pos + size + nl + n > limit:
                return False  # head not published: what was packed here is unseen
            pack(mm, pos, kind, rec.seq, rec.ts, rec.offset, rec.length, nl)
            pos += size
            buf[pos : pos + nl] = name
            pos += nl
            if data is not None:
                buf[pos : pos + n] = data
                pos += n
        self.delivered = int(recs[-1].seq)
        _IDX.pack_into(mm, 0, head + pos - HEADER - at)  # publish
        return True

    def _parts(
        self, recs: list[Record], ops: Sequence[WriteOp]
    ) -> tuple[list[tuple[bytes, bytes | memoryview | None]], int]:
        parts: list[tuple[bytes, bytes | memoryview | None]] = []
        need = 0
        for rec, op in zip(recs, ops, strict=True):
            if isinstance(rec, WriteRecord):
                kind, data = WRITE, op[1]
                assert data is not None
            elif isinstance(rec, ZeroRecord):
                kind, data = (TRIM if rec.trim else ZERO), None
            else:
                continue
            name = self._name(rec.volume)
            if name is None:
                continue
            head = _REC.pack(kind, rec.seq, rec.ts, rec.offset, rec.length, len(name))
            parts.append((head + name, data))
            need += len(head) + len(name) + (rec.length if data is not None else 0)
        return parts, need

    def flush_gap(self, upto: int) -> None:
        """Place a pending gap now (the daemon calls it when writes pause)."""
        with self._lock:
            if self.gap and upto > self.delivered and not self.closed:
                self._place([], 0, upto, upto, count=False)

    def _place(self, parts: list[tuple[bytes, bytes | memoryview | None]], need: int,
               before: int, last: int, count: bool = True) -> None:  # fmt: skip
        r = self.ring
        head = r._head()
        gap = b""
        if self.gap and before > self.delivered:
            gap = _REC.pack(GAP, self.delivered, 0, before, 0, 0)
        if r.capacity - (head - r._tail()) < need + len(gap):
            self.gap = True
            self.dropped += count
            return
        pos = r._put(head, gap) if gap else head
        for meta, data in parts:
            pos = r._put(pos, meta)
            if data is not None:
                pos = r._put(pos, data)
        self.gap = False
        self.delivered = last
        _IDX.pack_into(r._mm, 0, pos)  # publish: the bytes before ``pos`` are in place


class RingReader:
    """The worker's end: records and gaps, in the order the writer placed them.

    A write's data is a view of the ring itself, not a copy (a 1 MiB write is sampled at a
    few places, so copying it out cost more than scoring it); the writer may reuse that
    space only after ``release()``, which the next ``take()`` also does.
    """

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self._pending = ring._tail()  # end of what the last take handed out

    def release(self) -> None:
        """The views of the last take are no longer used: give their space back."""
        _IDX.pack_into(self.ring._mm, 8, self._pending)

    def take(self, max_bytes: int = 16 << 20) -> list[Write | ZeroRecord | Gap]:
        """What the writer placed since the last take (about ``max_bytes`` of data at most,
        and always one record when any is there)."""
        self.release()
        r = self.ring
        cap, size, mm = r.capacity, _REC.size, r._mm
        head, pos = r._head(), self._pending
        out: list[Write | ZeroRecord | Gap] = []
        taken = 0
        while pos < head and (taken < max_bytes or not out):
            at = pos % cap
            if at + size <= cap:
                kind, seq, ts, off, ln, nl = _REC.unpack_from(mm, HEADER + at)
            else:
                kind, seq, ts, off, ln, nl = _REC.unpack(r._get(pos, size))
            pos += size
            if kind == GAP:
                out.append(Gap(seq, off))
                continue
            vol = r._get(pos, nl).decode()
            pos += nl
            if kind == WRITE:
                at = pos % cap
                data = r._buf[HEADER + at : HEADER + at + ln] if at + ln <= cap else r._get(pos, ln)
                pos += ln
                taken += ln
                out.append(Write(seq, ts, vol, off, ln, data))
            else:
                out.append(ZeroRecord(seq, ts, vol, off, ln, kind == TRIM))
        self._pending = pos
        return out
