"""Segment files: append-only runs of checksummed frames. Segments are the source of truth.

Layout (little endian; full description in docs/design/journal-format.md)::

    header  56 B  magic "CDPJSEG1" | version u16 | flags u16 | reserved u32 | segment_no u64
                  | first_seq u64 | journal uuid 16 B | xxh3_64(previous 48 bytes) u64
    frame   24 B  length u32 | synced_upto u32 | prev_checksum u64 | checksum u64
            + payload (a msgpack record, see codec.py)

``checksum`` = xxh3_64(frame header[0:16] + payload, seed = segment seed ^ frame offset), so a
frame only validates at the place it was written, in the segment it was written to.
``prev_checksum`` chains frames, so a stale or reordered frame breaks the chain.
``synced_upto`` is the durable end of the segment when the frame was written: a later valid
frame claiming a durable end beyond a damaged frame proves the damage is corruption of
durable data (an error), not a torn tail from a crash (truncated and reported).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from .errors import SegmentCorrupt, SegmentHeaderTorn
from .storage import File

MAGIC = b"CDPJSEG1"
VERSION = 1
FLAG_SEALED = 1
HEADER = struct.Struct("<8sHHIQQ16sQ")
FRAME = struct.Struct("<IIQQ")
_FRAME16 = struct.Struct("<IIQ")  # a frame header without its checksum
HEADER_SIZE = HEADER.size  # 56
FRAME_SIZE = FRAME.size  # 24
MAX_FRAME = 80 * 1024 * 1024
MAX_SEGMENT = (1 << 32) - 1  # synced_upto is u32
FLAG_META = 1 << 31  # in a frame's length: a journal note, not a record (no seq)
_MASK = (1 << 64) - 1


def segment_seed(journal_uuid: bytes, segment_no: int) -> int:
    return xxhash.xxh3_64_intdigest(journal_uuid + segment_no.to_bytes(8, "little"))


def frame_checksum(
    seed: int, offset: int, head16: bytes, payload: Sequence[bytes | memoryview]
) -> int:
    h = xxhash.xxh3_64(seed=(seed ^ offset) & _MASK)
    h.update(head16)
    for p in payload:
        h.update(p)
    return h.intdigest()


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    segment_no: int
    first_seq: int
    journal_uuid: bytes
    sealed: bool

    def encode(self) -> bytes:
        body = HEADER.pack(
            MAGIC,
            VERSION,
            FLAG_SEALED if self.sealed else 0,
            0,
            self.segment_no,
            self.first_seq,
            self.journal_uuid,
            0,
        )[:48]
        return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")

    @property
    def checksum(self) -> int:
        return int.from_bytes(self.encode()[48:], "little")


def decode_header(buf: bytes | memoryview, name: str) -> SegmentHeader:
    if len(buf) < HEADER_SIZE:
        raise SegmentHeaderTorn(name, 0, "shorter than a segment header")
    magic, version, flags, _, seg_no, first_seq, uuid, csum = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise SegmentHeaderTorn(name, 0, "not a cdp segment header (bad magic)")
    if xxhash.xxh3_64_intdigest(buf[:48]) != csum:
        raise SegmentHeaderTorn(name, 0, "segment header checksum mismatch")
    if version != VERSION:
        raise SegmentCorrupt(name, 0, f"unsupported segment version {version}")
    return SegmentHeader(seg_no, first_seq, uuid, bool(flags & FLAG_SEALED))


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int  # of the frame header in the file
    payload: memoryview
    meta: bool = False  # a note (e.g. "segments up to N are durable"), not a record


@dataclass(frozen=True, slots=True)
class ScanResult:
    header: SegmentHeader
    frames: list[Frame]
    end: int  # offset just past the last valid frame
    last_checksum: int
    last_synced_claim: int
    torn_at: int | None  # offset of the first invalid byte when the tail is torn
    torn_reason: str | None
    durable_segment_claim: int = -1  # highest segment a durability note vouches for


def scan(
    buf: bytes | memoryview,
    name: str,
    *,
    journal_uuid: bytes,
    tail_allowed: bool,
    segment_no: int | None = None,
) -> ScanResult:
    """Parse a whole segment image and apply the recovery rule.

    ``tail_allowed`` is True only for the newest hot segment: older and sealed segments were
    fsynced completely before anything newer existed, so any damage there is corruption.
    """
    header = decode_header(buf, name)
    if header.journal_uuid != journal_uuid:
        raise SegmentCorrupt(name, 0, "segment belongs to another journal")
    if segment_no is not None and header.segment_no != segment_no:
        raise SegmentCorrupt(
            name, 0, f"header says segment {header.segment_no}: the file was renamed or copied"
        )
    seed = segment_seed(journal_uuid, header.segment_no)
    view = memoryview(buf)
    frames: list[Frame] = []
    pos, prev, synced_claim = HEADER_SIZE, header.checksum, 0
    size = len(buf)
    while pos < size:
        reason = _check_frame(view, pos, size, seed, prev)
        if reason is not None:
            if not tail_allowed:
                raise SegmentCorrupt(name, pos, reason)
            durable_end = _later_durable_claim(view, pos, size, seed)
            if durable_end > pos:
                raise SegmentCorrupt(
                    name, pos, f"{reason}; a later frame shows this range was durable"
                )
            return ScanResult(
                header, frames, pos, prev, synced_claim, pos, reason, _durable_claim(frames)
            )
        raw_len, synced, _, csum = FRAME.unpack_from(view, pos)
        length = raw_len & ~FLAG_META
        payload = view[pos + FRAME_SIZE : pos + FRAME_SIZE + length]
        frames.append(Frame(pos, payload, bool(raw_len & FLAG_META)))
        synced_claim = max(synced_claim, synced)
        prev = csum
        pos += FRAME_SIZE + length
    return ScanResult(header, frames, pos, prev, synced_claim, None, None, _durable_claim(frames))


def read_frames(
    buf: bytes, base: int, seed: int, prev: int, name: str
) -> list[tuple[int, memoryview, bool, int]]:
    """Complete frames of ``buf`` (file bytes from offset ``base``), chained from ``prev``.

    For reading durable records back (a replica sender): the bytes are known complete up to
    a frame boundary, so a frame cut off by the end of ``buf`` just ends the read, while a
    checksum or chain failure is corruption. Returns (offset, payload, meta, checksum).
    """
    view = memoryview(buf)
    out: list[tuple[int, memoryview, bool, int]] = []
    pos, size = 0, len(buf)
    while size - pos >= FRAME_SIZE:
        raw_len, _, prev_csum, csum = FRAME.unpack_from(view, pos)
        length = raw_len & ~FLAG_META
        if pos + FRAME_SIZE + length > size and 0 < length <= MAX_FRAME:
            break
        payload = view[pos + FRAME_SIZE : pos + FRAME_SIZE + length]
        off = base + pos
        if (
            length == 0
            or length > MAX_FRAME
            or frame_checksum(seed, off, bytes(view[pos : pos + 16]), (payload,)) != csum
        ):
            raise SegmentCorrupt(name, off, "frame checksum mismatch")
        if prev_csum != prev:
            raise SegmentCorrupt(name, off, "frame does not chain to the previous one")
        out.append((off, payload, bool(raw_len & FLAG_META), csum))
        prev = csum
        pos += FRAME_SIZE + length
    return out


def durable_note(segment_no: int) -> bytes:
    """Payload of the note "every segment up to ``segment_no`` is durable"."""
    return b"D" + segment_no.to_bytes(8, "little")


def _durable_claim(frames: list[Frame]) -> int:
    best = -1
    for f in frames:
        if f.meta and len(f.payload) == 9 and bytes(f.payload[0:1]) == b"D":
            best = max(best, int.from_bytes(f.payload[1:9], "little"))
    return best


def _check_frame(view: memoryview, pos: int, size: int, seed: int, prev: int | None) -> str | None:
    if size - pos < FRAME_SIZE:
        return "partial frame header"
    raw_len, synced, prev_csum, csum = FRAME.unpack_from(view, pos)
    length = raw_len & ~FLAG_META
    if length == 0:
        return "zero frame length"
    if length > MAX_FRAME:
        return f"frame length {length} exceeds the limit"
    if synced > pos:
        return "frame claims a durable end beyond itself"
    if pos + FRAME_SIZE + length > size:
        return "partial frame (file ends inside it)"
    payload = view[pos + FRAME_SIZE : pos + FRAME_SIZE + length]
    if frame_checksum(seed, pos, bytes(view[pos : pos + 16]), (payload,)) != csum:
        return "frame checksum mismatch"
    if prev is not None and prev_csum != prev:
        return "frame does not chain to the previous one (stale or reordered)"
    return None


def _later_durable_claim(view: memoryview, bad: int, size: int, seed: int) -> int:
    """Largest synced_upto claimed by any self-valid frame after ``bad`` (0 if none).

    Frames validate on their own (the checksum binds their offset), so a byte-wise search
    cannot be fooled by stale data; this only runs on the recovery path.
    """
    best = 0
    for pos in range(bad + 1, size - FRAME_SIZE + 1):
        length = int.from_bytes(view[pos : pos + 4], "little") & ~FLAG_META
        if length == 0 or length > MAX_FRAME or pos + FRAME_SIZE + length > size:
            continue
        if _check_frame(view, pos, size, seed, None) is None:
            best = max(best, int.from_bytes(view[pos + 4 : pos + 8], "little"))
    return best


class SegmentWriter:
    """Appends frames to one open segment file. Not thread-safe: the journal serializes."""

    def __init__(
        self, file: File, header: SegmentHeader, *, prev_checksum: int, synced_upto: int
    ) -> None:
        self.file = file
        self.header = header
        self._seed = segment_seed(header.journal_uuid, header.segment_no)
        self._prev = prev_checksum
        self.synced_upto = synced_upto

    @classmethod
    def create(cls, file: File, header: SegmentHeader) -> SegmentWriter:
        file.append([header.encode()])
        return cls(file, header, prev_checksum=header.checksum, synced_upto=0)

    def append(self, payload: Sequence[bytes | memoryview]) -> tuple[int, int]:
        """Frame and write one record; returns (frame offset, payload offset)."""
        length = sum(len(p) for p in payload)
        if length > MAX_FRAME:
            raise ValueError(f"record of {length} bytes exceeds the frame limit")
        pos = self.file.size()
        head16 = struct.pack("<IIQ", length, self.synced_upto, self._prev)
        csum = frame_checksum(self._seed, pos, head16, payload)
        self.file.append([head16, csum.to_bytes(8, "little"), *payload])
        self._prev = csum
        return pos, pos + FRAME_SIZE

    def append_note(self, payload: bytes) -> None:
        """Write a note frame (flagged in its length; it carries no record and no seq)."""
        pos = self.file.size()
        head16 = struct.pack("<IIQ", len(payload) | FLAG_META, self.synced_upto, self._prev)
        csum = frame_checksum(self._seed, pos, head16, (payload,))
        self.file.append([head16, csum.to_bytes(8, "little"), payload])
        self._prev = csum

    def append_many(
        self, payloads: Sequence[Sequence[bytes | memoryview]], lengths: Sequence[int]
    ) -> list[int]:
        """Frame several records and write them with one writev; returns payload offsets.

        ``lengths`` are the payloads' sizes, which the caller knows already (summing the
        parts again cost the capture path a generator per record). Nothing is committed to
        the chain until the write returns, so a failed write leaves the writer as it was
        (the journal then stops and recovery truncates the torn tail).
        """
        pos = self.file.size()
        prev = self._prev
        parts: list[bytes | memoryview] = []
        offsets = []
        synced, seed, pack = self.synced_upto, self._seed, _FRAME16.pack
        for payload, length in zip(payloads, lengths, strict=True):
            if length > MAX_FRAME:
                raise ValueError(f"record of {length} bytes exceeds the frame limit")
            head16 = pack(length, synced, prev)
            prev = frame_checksum(seed, pos, head16, payload)
            parts.append(head16)
            parts.append(prev.to_bytes(8, "little"))
            parts.extend(payload)
            offsets.append(pos + FRAME_SIZE)
            pos += FRAME_SIZE + length
        self.file.append(parts)
        self._prev = prev
        return offsets

    def size(self) -> int:
        return self.file.size()

    def sync(self) -> int:
        """fdatasync; returns the offset now known durable."""
        end = self.file.size()
        self.file.sync()
        self.synced_upto = min(end, MAX_SEGMENT)
        return end


def write_frames(header: SegmentHeader, payloads: Iterator[bytes]) -> bytes:
    """A complete segment image in memory (used when sealing: the sealed file is written whole)."""
    out = bytearray(header.encode())
    seed = segment_seed(header.journal_uuid, header.segment_no)
    prev = header.checksum
    for p in payloads:
        pos = len(out)
        # A sealed segment is written and fsynced whole, so every frame is durable.
        head16 = struct.pack("<IIQ", len(p), pos if pos <= MAX_SEGMENT else 0, prev)
        csum = frame_checksum(seed, pos, head16, (p,))
        out += head16
        out += csum.to_bytes(8, "little")
        out += p
        prev = csum
    return bytes(out)
