"""The only user of msgpack: record <-> payload bytes, with size limits for untrusted input."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import msgpack

from .types import (
    BlockId,
    BlockRef,
    CheckpointKind,
    CheckpointRecord,
    Record,
    Seq,
    VolumeRecord,
    WriteRecord,
    ZeroRecord,
    new_block_ref,
    new_write,
)

T_WRITE = 1
T_ZERO = 2
T_CHECKPOINT = 3
T_VOLUME = 4

MAX_PAYLOAD = 64 * 1024 * 1024 + 4096
_local = threading.local()


def _packb(obj: Any) -> bytes:
    """msgpack with this thread's Packer: ``msgpack.packb`` builds a new one per call, which
    is a third of the cost of packing a small record (sealing re-encodes every record)."""
    p = getattr(_local, "p", None)
    if p is None:
        p = _local.p = msgpack.Packer(use_bin_type=True)
    return p.pack(obj)  # type: ignore[no-any-return]


class DecodeError(ValueError):
    """A payload passed its checksum but is not a record we understand."""


def encode(rec: Record) -> bytes:
    """Serialize a record; inline data goes in as one msgpack bin (no per-byte work)."""
    if isinstance(rec, WriteRecord):
        if rec.data is None:
            return encode_sealed_write(rec, rec.refs)
        return _packb(
            [T_WRITE, rec.seq, rec.ts, rec.wall, rec.volume, rec.offset, rec.length, rec.data]
        )
    if isinstance(rec, ZeroRecord):
        return _packb(
            [T_ZERO, rec.seq, rec.ts, rec.wall, rec.volume, rec.offset, rec.length, rec.trim]
        )
    if isinstance(rec, CheckpointRecord):
        return _packb([T_CHECKPOINT, rec.seq, rec.ts, rec.wall, rec.name, str(rec.kind)])
    return _packb([T_VOLUME, rec.seq, rec.ts, rec.wall, rec.volume, rec.size])


def encode_sealed_write(rec: WriteRecord, refs: Sequence[BlockRef]) -> bytes:
    """``encode`` of ``rec`` with its data replaced by ``refs``, without building that
    record: sealing re-encodes every write of a segment, and a frozen record costs more to
    make than to pack."""
    body = [[r.block_id, r.length, r.pack, r.pack_offset] for r in refs]
    return _packb([T_WRITE, rec.seq, rec.ts, rec.wall, rec.volume, rec.offset, rec.length, body])


def encode_write_header(
    seq: int, ts: int, wall: int | None, volume: str, offset: int, length: int
) -> bytes:
    """The msgpack bytes of a write record up to its data: fields and the bin prefix.

    Lets the hot path frame a write without copying the data into a packed buffer: the frame
    is written as header + bin-prefix + data with one writev.
    """
    # The 7 leading fields packed as a fixarray (0x97), re-labelled as the 8-element array
    # (0x98) that encode() writes: identical bytes, one packb call.
    fields: bytes = _packb([T_WRITE, seq, ts, wall, volume, offset, length])
    return b"\x98" + fields[1:] + bin_prefix(length)


def bin_prefix(n: int) -> bytes:
    """The msgpack bin header for n bytes of data."""
    if n < 256:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def decode(payload: bytes | memoryview, *, copy: bool = True) -> Record:
    """Parse a payload that already passed its frame checksum; DecodeError if malformed.

    ``copy=False`` leaves a hot write's data as a view into ``payload`` (no copy, and the
    GIL is not held over megabytes): for sealing and recovery, which only pass it through.
    """
    if len(payload) > 2 and payload[0] == 0x98 and payload[1] == T_WRITE:
        rec = _decode_inline_write(payload, copy)
        if rec is not None:
            return rec
    try:
        obj = msgpack.unpackb(
            payload,
            use_list=True,
            raw=False,
            max_bin_len=MAX_PAYLOAD,
            max_str_len=4096,
            max_array_len=1 << 20,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types
        raise DecodeError(f"undecodable payload: {e}") from e
    try:
        kind = obj[0]
        seq, ts, wall = Seq(int(obj[1])), int(obj[2]), obj[3]
        if kind == T_WRITE:
            _, _, _, _, vol, off, length, body = obj
            if isinstance(body, bytes):
                if len(body) != length:
                    raise DecodeError("write data length does not match header")
                return new_write(seq, ts, vol, off, length, body, (), wall)
            refs = tuple(new_block_ref(BlockId(b[0]), b[1], b[2], b[3]) for b in body)
            if sum(r.length for r in refs) != length:
                raise DecodeError("block refs do not cover the write length")
            return new_write(seq, ts, vol, off, length, None, refs, wall)
        if kind == T_ZERO:
            _, _, _, _, vol, off, length, trim = obj
            return ZeroRecord(seq, ts, vol, off, length, bool(trim), wall)
        if kind == T_CHECKPOINT:
            _, _, _, _, name, ck = obj
            return CheckpointRecord(seq, ts, name, CheckpointKind(ck), wall)
        if kind == T_VOLUME:
            _, _, _, _, vol, size = obj
            return VolumeRecord(seq, ts, vol, size, wall)
    except DecodeError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise DecodeError(f"malformed record: {e}") from e
    raise DecodeError(f"unknown record type {kind!r}")


def _decode_inline_write(payload: bytes | memoryview, copy: bool) -> WriteRecord | None:
    """The common hot write: 7 small fields, then the data as the payload's last bytes."""
    u = msgpack.Unpacker(
        raw=False, max_str_len=4096, max_bin_len=0, max_array_len=0, max_map_len=0, max_ext_len=0
    )
    u.feed(bytes(payload[:320]))
    try:
        u.read_array_header()
        fields = [u.unpack() for _ in range(7)]
    except Exception:
        return None  # not the simple shape: the general decoder will say what is wrong
    pos = u.tell()
    tag = payload[pos] if pos < len(payload) else 0
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(tag)
    if width is None:
        return None
    n = int.from_bytes(payload[pos + 1 : pos + 1 + width], "big")
    start = pos + 1 + width
    _, seq, ts, wall, vol, off, length = fields
    if (
        start + n != len(payload)
        or n != length
        or not isinstance(vol, str)
        or not all(isinstance(x, int) for x in (seq, ts, off, length))
        or not (wall is None or isinstance(wall, int))
    ):
        raise DecodeError("malformed write record")
    view = memoryview(payload)[start:]
    return new_write(Seq(seq), ts, vol, off, length, view.tobytes() if copy else view, (), wall)


def pack_obj(obj: Any) -> bytes:
    """msgpack for small metadata files (manifests, holds)."""
    return bytes(msgpack.packb(obj, use_bin_type=True))


def unpack_obj(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
