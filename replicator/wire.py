"""The replication wire format: pure encode/decode, with limits for untrusted bytes.

A body is ``magic "CDPR" | version u8 | codec u8 | payload``; the payload (zstd-compressed
as one frame when codec is 1: one frame per batch, not per block, compresses small blocks
far better) is one msgpack map. A batch carries a header that names the stream it belongs
to (group, the primary journal's uuid, epoch, chunk size, seq range), its records with block
refs instead of data, and the data of the blocks the receiver said it lacks. ``sum`` is an
xxh3-128 over the encoded header and records: corruption on the way (or a forged edit by
something that cannot recompute it) is refused before anything is applied. Block data is
checked by its name: a block is accepted only if its bytes hash (BLAKE3) to its id.

Spec: docs/design/replication.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash
import zstandard

from journal import (
    BlockRef,
    CheckpointKind,
    CheckpointRecord,
    Record,
    Seq,
    VolumeRecord,
    WriteRecord,
    ZeroRecord,
)
from journal.types import BlockId

MAGIC = b"CDPR"
VERSION = 1
CODEC_NONE = 0
CODEC_ZSTD = 1
PREFIX = struct.Struct("<4sBB")

MAX_BODY = 64 << 20  # bytes on the wire per request
MAX_RAW = 160 << 20  # decompressed payload per request
MAX_RECORDS = 200_000
MAX_IDS = 200_000
MAX_BLOCK = 16 << 20
MAX_BASE_CHUNKS = 1 << 22  # per volume in one base message

T_WRITE, T_ZERO, T_CHECKPOINT, T_VOLUME = 1, 2, 3, 4


class ProtocolError(ValueError):
    """A body that is not a well-formed message of this protocol (answered 400)."""


@dataclass(frozen=True, slots=True)
class StreamId:
    """Which stream a message belongs to: fencing and identity live here."""

    group: str
    journal: bytes  # uuid of the primary journal the records come from
    epoch: int
    chunk_size: int


@dataclass(frozen=True, slots=True)
class Batch:
    stream: StreamId
    first_seq: int
    last_seq: int
    records: tuple[Record, ...]  # writes carry refs (id, length), never data
    blocks: Mapping[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Base:
    """The primary's folded base: each volume's content at ``seq`` as chunk -> block id."""

    stream: StreamId
    seq: int
    ts: int
    volumes: Mapping[str, tuple[int, Mapping[int, bytes]]]


# ------------------------------------------------------------------ framing
def _frame(obj: Any, codec: int, level: int) -> bytes:
    raw: bytes = msgpack.packb(obj, use_bin_type=True)
    if codec == CODEC_ZSTD:
        raw = zstandard.ZstdCompressor(level=level).compress(raw)
    elif codec != CODEC_NONE:
        raise ValueError(f"unknown codec {codec}")
    return PREFIX.pack(MAGIC, VERSION, codec) + raw


def _unframe(body: bytes, *, max_array: int = MAX_IDS) -> Any:
    if len(body) > MAX_BODY:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    if len(body) < PREFIX.size:
        raise ProtocolError("body too short")
    magic, version, codec = PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise ProtocolError("not a cdp replication body (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    payload = memoryview(body)[PREFIX.size :]
    if codec == CODEC_ZSTD:
        try:
            # bound the output before decompressing: a small body must not expand past
            # MAX_RAW in memory (a declared frame size is allocated up front, so check it)
            size = zstandard.get_frame_parameters(payload).content_size
            if size == zstandard.CONTENTSIZE_UNKNOWN or size > MAX_RAW:
                raise ProtocolError("compressed payload of unknown or too large a size")
            d = zstandard.ZstdDecompressor().decompressobj()
            raw = d.decompress(bytes(payload))
            if not d.eof or d.unused_data or len(raw) != size:
                raise ProtocolError("compressed payload is truncated or has trailing bytes")
        except zstandard.ZstdError as e:
            raise ProtocolError(f"bad zstd payload: {e}") from e
    elif codec == CODEC_NONE:
        raw = bytes(payload)
    else:
        raise ProtocolError(f"unknown codec {codec}")
    if len(raw) > MAX_RAW:
        raise ProtocolError("payload too large")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=False,
            max_bin_len=MAX_RAW,
            max_str_len=4096,
            max_array_len=max_array,
            max_map_len=64,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable payload: {e}") from e


# ------------------------------------------------------------------ records
def _enc_record(r: Record) -> list[Any]:
    if isinstance(r, WriteRecord):
        if r.data is not None:
            raise ValueError("wire writes carry refs, not data")
        refs = [[x.block_id, x.length] for x in r.refs]
        return [T_WRITE, r.seq, r.ts, r.wall, r.volume, r.offset, r.length, refs]
    if isinstance(r, ZeroRecord):
        return [T_ZERO, r.seq, r.ts, r.wall, r.volume, r.offset, r.length, r.trim]
    if isinstance(r, CheckpointRecord):
        return [T_CHECKPOINT, r.seq, r.ts, r.wall, r.name, str(r.kind)]
    return [T_VOLUME, r.seq, r.ts, r.wall, r.volume, r.size]


def _int(x: Any, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise ProtocolError(f"{what}: expected an integer in [{lo}, {hi}]")
    return x


def _str(x: Any, what: str, maxlen: int = 255) -> str:
    if not isinstance(x, str) or not x or len(x.encode()) > maxlen:
        raise ProtocolError(f"{what}: expected a string of 1..{maxlen} bytes")
    return x


def _bytes(x: Any, what: str, n: int | None = None) -> bytes:
    if not isinstance(x, bytes) or (n is not None and len(x) != n):
        raise ProtocolError(f"{what}: expected {n if n is not None else 'some'} bytes")
    return x


def _list(x: Any, what: str, maxlen: int) -> list[Any]:
    if not isinstance(x, list) or len(x) > maxlen:
        raise ProtocolError(f"{what}: expected a list of at most {maxlen}")
    return x


def _dec_record(o: Any, k: int) -> Record:
    what = f"record {k}"
    if not isinstance(o, list) or len(o) < 4:
        raise ProtocolError(f"{what}: malformed")
    kind = o[0]
    seq = Seq(_int(o[1], f"{what} seq", 1))
    ts = _int(o[2], f"{what} ts")
    wall = None if o[3] is None else _int(o[3], f"{what} wall")
    if kind == T_WRITE and len(o) == 8:
        vol = _str(o[4], f"{what} volume")
        off, length = _int(o[5], f"{what} offset"), _int(o[6], f"{what} length", 1)
        refs = tuple(
            BlockRef(
                BlockId(_bytes(_list(x, f"{what} ref", 2)[0], f"{what} ref id", 32)),
                _int(x[1], f"{what} ref length", 1, MAX_BLOCK),
                0,
                0,
            )
            for x in _list(o[7], f"{what} refs", 1 << 16)
            if (isinstance(x, list) and len(x) == 2) or _bad(f"{what} ref")
        )
        return WriteRecord(seq, ts, vol, off, length, None, refs, wall)
    if kind == T_ZERO and len(o) == 8:
        vol = _str(o[4], f"{what} volume")
        off, length = _int(o[5], f"{what} offset"), _int(o[6], f"{what} length", 1)
        if not isinstance(o[7], bool):
            raise ProtocolError(f"{what} trim: expected a boolean")
        return ZeroRecord(seq, ts, vol, off, length, o[7], wall)
    if kind == T_CHECKPOINT and len(o) == 6:
        name = _str(o[4], f"{what} name", 200)
        try:
            ck = CheckpointKind(o[5])
        except ValueError as e:
            raise ProtocolError(f"{what}: unknown checkpoint kind") from e
        return CheckpointRecord(seq, ts, name, ck, wall)
    if kind == T_VOLUME and len(o) == 6:
        return VolumeRecord(
            seq, ts, _str(o[4], f"{what} volume"), _int(o[5], f"{what} size", 1), wall
        )
    raise ProtocolError(f"{what}: unknown record type or shape")


def _bad(what: str) -> bool:
    raise ProtocolError(f"{what}: malformed")


def _enc_stream(s: StreamId) -> list[Any]:
    return [s.group, s.journal, s.epoch, s.chunk_size]


def _dec_stream(o: Any) -> StreamId:
    o = _list(o, "stream", 4)
    if len(o) != 4:
        raise ProtocolError("stream: malformed")
    return StreamId(
        _str(o[0], "stream group"),
        _bytes(o[1], "stream journal", 16),
        _int(o[2], "stream epoch", 1),
        _int(o[3], "stream chunk size", 4096, MAX_BLOCK),
    )


def _checksum(head: bytes, recs: bytes) -> bytes:
    h = xxhash.xxh3_128()
    h.update(head)
    h.update(recs)
    return h.digest()


# ------------------------------------------------------------------ batches
def encode_batch(b: Batch, *, codec: int = CODEC_ZSTD, level: int = 3) -> bytes:
    head = msgpack.packb([_enc_stream(b.stream), b.first_seq, b.last_seq], use_bin_type=True)
    recs = msgpack.packb([_enc_record(r) for r in b.records], use_bin_type=True)
    blocks = [[k, bytes(v)] for k, v in b.blocks.items()]
    return _frame({"h": head, "r": recs, "b": blocks, "s": _checksum(head, recs)}, codec, level)


def decode_batch(body: bytes) -> Batch:
    o = _unframe(body)
    if not isinstance(o, dict) or set(o) != {"h", "r", "b", "s"}:
        raise ProtocolError("batch: expected keys h, r, b, s")
    head, recs = _bytes(o["h"], "batch header"), _bytes(o["r"], "batch records")
    if _bytes(o["s"], "batch checksum", 16) != _checksum(head, recs):
        raise ProtocolError("batch checksum mismatch: the batch was damaged or altered")
    try:
        h = msgpack.unpackb(head, raw=False, max_str_len=4096, max_bin_len=64, max_array_len=8)
        rl = msgpack.unpackb(
            recs,
            raw=False,
            max_str_len=4096,
            max_bin_len=64,
            max_array_len=max(MAX_RECORDS, 1 << 16),
            max_map_len=0,
        )
    except Exception as e:
        raise ProtocolError(f"undecodable batch: {e}") from e
    h = _list(h, "batch header", 3)
    if len(h) != 3:
        raise ProtocolError("batch header: malformed")
    stream = _dec_stream(h[0])
    first, last = _int(h[1], "first seq", 1), _int(h[2], "last seq", 1)
    records = tuple(_dec_record(x, k) for k, x in enumerate(_list(rl, "records", MAX_RECORDS)))
    if not records or records[0].seq != first or records[-1].seq != last:
        raise ProtocolError("batch seq range does not match its records")
    if any(r.seq != first + k for k, r in enumerate(records)):
        raise ProtocolError("batch records are not consecutive seqs")
    blocks: dict[bytes, bytes] = {}
    for x in _list(o["b"], "blocks", MAX_IDS):
        x = _list(x, "block", 2)
        if len(x) != 2:
            raise ProtocolError("block: malformed")
        blocks[_bytes(x[0], "block id", 32)] = _bytes(x[1], "block data")
    return Batch(stream, first, last, records, blocks)


# ------------------------------------------------------------------ dedup and base
def encode_ids(ids: Iterable[bytes]) -> bytes:
    return _frame({"ids": list(ids)}, CODEC_NONE, 0)


def decode_ids(body: bytes) -> list[bytes]:
    o = _unframe(body)
    if not isinstance(o, dict) or set(o) != {"ids"}:
        raise ProtocolError("ids: expected key ids")
    return [_bytes(x, "block id", 32) for x in _list(o["ids"], "ids", MAX_IDS)]


def encode_blocks(
    blocks: Mapping[bytes, bytes], *, codec: int = CODEC_ZSTD, level: int = 3
) -> bytes:
    return _frame({"blocks": [[k, bytes(v)] for k, v in blocks.items()]}, codec, level)


def decode_blocks(body: bytes) -> dict[bytes, bytes]:
    o = _unframe(body)
    if not isinstance(o, dict) or set(o) != {"blocks"}:
        raise ProtocolError("blocks: expected key blocks")
    out: dict[bytes, bytes] = {}
    for x in _list(o["blocks"], "blocks", MAX_IDS):
        x = _list(x, "block", 2)
        if len(x) != 2:
            raise ProtocolError("block: malformed")
        out[_bytes(x[0], "block id", 32)] = _bytes(x[1], "block data")
    return out


def encode_base(b: Base) -> bytes:
    vols = {
        name: [size, [[c, bid] for c, bid in sorted(chunks.items())]]
        for name, (size, chunks) in b.volumes.items()
    }
    return _frame(
        {"stream": _enc_stream(b.stream), "seq": b.seq, "ts": b.ts, "volumes": vols}, CODEC_ZSTD, 3
    )


def decode_base(body: bytes) -> Base:
    o = _unframe(body, max_array=MAX_BASE_CHUNKS)
    if not isinstance(o, dict) or set(o) != {"stream", "seq", "ts", "volumes"}:
        raise ProtocolError("base: expected keys stream, seq, ts, volumes")
    stream = _dec_stream(o["stream"])
    if not isinstance(o["volumes"], dict) or len(o["volumes"]) > 64:
        raise ProtocolError("base volumes: expected a map of at most 64")
    vols: dict[str, tuple[int, dict[int, bytes]]] = {}
    for name, v in o["volumes"].items():
        v = _list(v, "base volume", 2)
        if len(v) != 2:
            raise ProtocolError("base volume: malformed")
        chunks: dict[int, bytes] = {}
        for x in _list(v[1], "base chunks", MAX_BASE_CHUNKS):
            x = _list(x, "base chunk", 2)
            if len(x) != 2:
                raise ProtocolError("base chunk: malformed")
            chunks[_int(x[0], "chunk")] = _bytes(x[1], "chunk block id", 32)
        vols[_str(name, "base volume name")] = (_int(v[0], "volume size", 1), chunks)
    return Base(stream, _int(o["seq"], "base seq", 1), _int(o["ts"], "base ts"), vols)


@dataclass(frozen=True, slots=True)
class Resync:
    """A changed-block resync will write seqs first..last (a mix of two points)."""

    stream: StreamId
    first: int
    last: int


def encode_resync(r: Resync) -> bytes:
    return _frame(
        {"stream": _enc_stream(r.stream), "first": r.first, "last": r.last}, CODEC_NONE, 0
    )


def decode_resync(body: bytes) -> Resync:
    o = _unframe(body)
    if not isinstance(o, dict) or set(o) != {"stream", "first", "last"}:
        raise ProtocolError("resync: expected keys stream, first, last")
    first, last = _int(o["first"], "resync first", 1), _int(o["last"], "resync last", 1)
    if last < first:
        raise ProtocolError("resync: last before first")
    return Resync(_dec_stream(o["stream"]), first, last)


def refs_of(records: Sequence[Record]) -> dict[bytes, int]:
    """Every block id the records reference, with its length, in first-use order."""
    out: dict[bytes, int] = {}
    for r in records:
        if isinstance(r, WriteRecord):
            for x in r.refs:
                out.setdefault(x.block_id, x.length)
    return out
