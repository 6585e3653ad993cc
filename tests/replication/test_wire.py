"""replicator/wire.py: round trips, refusals, and fuzzing with untrusted bytes.

The decoders face the network: on any input they either return a well-formed message or
raise ``wire.ProtocolError`` (answered 400), never another exception, and never let a small
body expand past the limits in memory. Damage to the checksummed part of a batch (header
and records) is never accepted silently.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from replicator import wire

U63 = (1 << 63) - 1
NONE = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_NONE)
ZSTD = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_ZSTD)
DECODERS: list[Callable[[bytes], Any]] = [
    wire.decode_batch,
    wire.decode_ids,
    wire.decode_blocks,
    wire.decode_base,
]


def few(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------ strategies
ids32 = st.binary(min_size=32, max_size=32)
names = st.text(min_size=1, max_size=30).filter(lambda s: len(s.encode()) <= 200)
u63 = st.integers(0, U63)
walls = st.none() | u63
streams = st.builds(
    wire.StreamId,
    group=names,
    journal=st.binary(min_size=16, max_size=16),
    epoch=st.integers(1, U63),
    chunk_size=st.integers(4096, wire.MAX_BLOCK),
)
refs = st.builds(lambda i, n: BlockRef(BlockId(i), n, 0, 0), ids32, st.integers(1, wire.MAX_BLOCK))


_S = st.just(Seq(1))  # each record's seq is set by the batch
records = st.one_of(
    st.builds(
        WriteRecord,
        _S,
        u63,
        names,
        u63,
        st.integers(1, U63),
        st.none(),
        st.lists(refs, max_size=4).map(tuple),
        walls,
    ),
    st.builds(ZeroRecord, _S, u63, names, u63, st.integers(1, U63), st.booleans(), walls),
    st.builds(CheckpointRecord, _S, u63, names, st.sampled_from(CheckpointKind), walls),
    st.builds(VolumeRecord, _S, u63, names, st.integers(1, U63), walls),
)


@st.composite
def batches(draw: st.DrawFn, max_records: int = 6) -> wire.Batch:
    first = draw(st.integers(1, 1 << 62))
    rs = draw(st.lists(records, min_size=1, max_size=max_records))
    recs = tuple(dataclasses.replace(r, seq=Seq(first + k)) for k, r in enumerate(rs))
    blocks = draw(st.dictionaries(ids32, st.binary(max_size=300), max_size=4))
    return wire.Batch(draw(streams), first, first + len(recs) - 1, recs, blocks)


bases = st.builds(
    wire.Base,
    streams,
    st.integers(1, U63),
    u63,
    st.dictionaries(
        names,
        st.tuples(st.integers(1, U63), st.dictionaries(u63, ids32, max_size=6)),
        max_size=4,
    ),
)
codecs = st.sampled_from([wire.CODEC_NONE, wire.CODEC_ZSTD])
block_maps = st.dictionaries(ids32, st.binary(max_size=2000), max_size=6)


# ------------------------------------------------------------------ round trips
@few(150)
@given(b=batches(), codec=codecs, level=st.sampled_from([1, 3, 9]))
def test_batch_round_trip(b: wire.Batch, codec: int, level: int) -> None:
    body = wire.encode_batch(b, codec=codec, level=level)
    assert body[:4] == wire.MAGIC and body[4] == wire.VERSION and body[5] == codec
    assert wire.decode_batch(body) == b


@few(100)
@given(ids=st.lists(ids32, max_size=40))
def test_ids_round_trip(ids: list[bytes]) -> None:
    assert wire.decode_ids(wire.encode_ids(ids)) == ids  # order and duplicates kept


@few(100)
@given(blocks=block_maps, codec=codecs)
def test_blocks_round_trip(blocks: dict[bytes, bytes], codec: int) -> None:
    assert wire.decode_blocks(wire.encode_blocks(blocks, codec=codec)) == blocks


@few(100)
@given(base=bases)
def test_base_round_trip(base: wire.Base) -> None:
    assert wire.decode_base(wire.encode_base(base)) == base


def test_refs_of_keeps_first_use_order_once() -> None:
    a, b, c = (bytes([k]) * 32 for k in (1, 2, 3))
    w1 = WriteRecord(Seq(1), 0, "v", 0, 8192, None, (BlockRef(BlockId(b), 4096, 0, 0),) * 2)
    z = ZeroRecord(Seq(2), 0, "v", 0, 512)
    w2 = WriteRecord(
        Seq(3),
        0,
        "v",
        0,
        8192,
        None,
        (BlockRef(BlockId(a), 10, 0, 0), BlockRef(BlockId(b), 4, 0, 0)),
    )
    w3 = WriteRecord(Seq(4), 0, "v", 0, 100, None, (BlockRef(BlockId(c), 100, 0, 0),))
    assert list(wire.refs_of([w1, z, w2, w3]).items()) == [(b, 4096), (a, 10), (c, 100)]


# ------------------------------------------------------------------ encoder contract
def _stream() -> wire.StreamId:
    return wire.StreamId("g1", bytes(16), 1, 65536)


def _batch(recs: list[Record], **kw: Any) -> wire.Batch:
    return wire.Batch(
        _stream(),
        kw.get("first", recs[0].seq),
        kw.get("last", recs[-1].seq),
        tuple(recs),
        kw.get("blocks", {}),
    )


def _cp(seq: int) -> CheckpointRecord:
    return CheckpointRecord(Seq(seq), seq, f"cp{seq}", CheckpointKind.USER)


def test_encoder_refuses_data_and_unknown_codecs() -> None:
    with pytest.raises(ValueError, match="refs"):
        wire.encode_batch(_batch([WriteRecord(Seq(1), 0, "v", 0, 3, b"abc")]))
    with pytest.raises(ValueError):
        wire.encode_batch(_batch([_cp(1)]), codec=9)
    assert issubclass(wire.ProtocolError, ValueError)


# ------------------------------------------------------------------ specific refusals
def _raw_batch(head: Any, recs: Any, blocks: Any = (), *, s: bytes | None = None) -> bytes:
    """A codec-none batch from msgpack objects, with a correct checksum unless ``s``."""
    h = msgpack.packb(head, use_bin_type=True)
    r = msgpack.packb(recs, use_bin_type=True)
    if s is None:
        x = xxhash.xxh3_128()
        x.update(h)
        x.update(r)
        s = x.digest()
    return NONE + msgpack.packb({"h": h, "r": r, "b": list(blocks), "s": s}, use_bin_type=True)


HEAD = [["g1", bytes(16), 1, 65536], 5, 6]
CP5, CP6 = [3, 5, 0, None, "a", "user"], [3, 6, 0, None, "b", "crash"]
ID = bytes(range(32))


def test_checksum_is_xxh3_of_header_and_records() -> None:
    b = wire.decode_batch(_raw_batch(HEAD, [CP5, CP6]))  # our own checksum: accepted
    assert [r.seq for r in b.records] == [5, 6] and b.stream == wire.StreamId(
        "g1", bytes(16), 1, 65536
    )
    with pytest.raises(wire.ProtocolError, match="checksum"):
        wire.decode_batch(_raw_batch(HEAD, [CP5, CP6], s=bytes(16)))


REFUSED_BATCHES: dict[str, bytes] = {
    "not consecutive": _raw_batch([HEAD[0], 5, 7], [CP5, [3, 7, 0, None, "b", "crash"]]),
    "last does not match": _raw_batch([HEAD[0], 5, 9], [CP5, CP6]),
    "first does not match": _raw_batch([HEAD[0], 4, 6], [CP5, CP6]),
    "no records": _raw_batch([HEAD[0], 5, 6], []),
    "seq 0": _raw_batch([HEAD[0], 0, 0], [[3, 0, 0, None, "a", "user"]]),
    "bool as seq": _raw_batch([HEAD[0], 1, 1], [[3, True, 0, None, "a", "user"]]),
    "negative ts": _raw_batch([HEAD[0], 5, 5], [[3, 5, -1, None, "a", "user"]]),
    "float wall": _raw_batch([HEAD[0], 5, 5], [[3, 5, 0, 1.5, "a", "user"]]),
    "unknown checkpoint kind": _raw_batch([HEAD[0], 5, 5], [[3, 5, 0, None, "a", "nope"]]),
    "unhashable checkpoint kind": _raw_batch([HEAD[0], 5, 5], [[3, 5, 0, None, "a", {}]]),
    "empty checkpoint name": _raw_batch([HEAD[0], 5, 5], [[3, 5, 0, None, "", "user"]]),
    "long checkpoint name": _raw_batch([HEAD[0], 5, 5], [[3, 5, 0, None, "x" * 201, "user"]]),
    "unknown record type": _raw_batch([HEAD[0], 5, 5], [[9, 5, 0, None, "a", "user"]]),
    "short record": _raw_batch([HEAD[0], 5, 5], [[3, 5, 0]]),
    "record not a list": _raw_batch([HEAD[0], 5, 5], [{"a": 1}]),
    "trim not bool": _raw_batch([HEAD[0], 5, 5], [[2, 5, 0, None, "v", 0, 512, 1]]),
    "zero length": _raw_batch([HEAD[0], 5, 5], [[2, 5, 0, None, "v", 0, 0, False]]),
    "negative offset": _raw_batch([HEAD[0], 5, 5], [[2, 5, 0, None, "v", -512, 512, False]]),
    "empty volume name": _raw_batch([HEAD[0], 5, 5], [[4, 5, 0, None, "", 4096]]),
    "volume size 0": _raw_batch([HEAD[0], 5, 5], [[4, 5, 0, None, "v", 0]]),
    "volume name too long": _raw_batch([HEAD[0], 5, 5], [[4, 5, 0, None, "v" * 256, 4096]]),
    "ref id short": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [[b"x" * 31, 9]]]]),
    "ref length 0": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [[ID, 0]]]]),
    "ref too long": _raw_batch(
        [HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [[ID, wire.MAX_BLOCK + 1]]]]
    ),
    "ref an int": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [5]]]),
    "ref None": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [None]]]),
    "ref too short": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [[ID]]]]),
    "ref too long list": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, [[ID, 9, 0]]]]),
    "refs not a list": _raw_batch([HEAD[0], 5, 5], [[1, 5, 0, None, "v", 0, 9, 7]]),
    "epoch 0": _raw_batch([["g1", bytes(16), 0, 65536], 5, 6], [CP5, CP6]),
    "journal uuid short": _raw_batch([["g1", bytes(15), 1, 65536], 5, 6], [CP5, CP6]),
    "chunk size small": _raw_batch([["g1", bytes(16), 1, 512], 5, 6], [CP5, CP6]),
    "empty group": _raw_batch([["", bytes(16), 1, 65536], 5, 6], [CP5, CP6]),
    "header short": _raw_batch([HEAD[0], 5], [CP5, CP6]),
    "header a map": _raw_batch({"a": 1}, [CP5, CP6]),
    "records a map": _raw_batch(HEAD, {"a": 1}),
    "block id short": _raw_batch(HEAD, [CP5, CP6], [[b"x", b"y"]]),
    "block not a pair": _raw_batch(HEAD, [CP5, CP6], [[ID]]),
    "block data a str": _raw_batch(HEAD, [CP5, CP6], [[ID, "text"]]),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BATCHES))
def test_refused_batches(name: str) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.decode_batch(REFUSED_BATCHES[name])


def test_framing_refusals() -> None:
    good = wire.encode_ids([ID])
    assert wire.decode_ids(good) == [ID]
    cases = {
        "empty": b"",
        "short": b"CDPR\x01",
        "bad magic": b"RPDC" + good[4:],
        "version 0": good[:4] + b"\x00" + good[5:],
        "version 2": good[:4] + b"\x02" + good[5:],
        "codec 2": good[:5] + b"\x02" + good[6:],
        "zstd not zstd": good[:5] + b"\x01" + good[6:],
        "trailing bytes": good + b"\x00",
        "wrong keys": NONE + msgpack.packb({"idz": []}),
        "not a map": NONE + msgpack.packb([ID]),
        "short id": NONE + msgpack.packb({"ids": [b"x" * 33]}, use_bin_type=True),
        "id a str": NONE + msgpack.packb({"ids": ["x" * 32]}, use_bin_type=True),
        "ext type": NONE + msgpack.packb({"ids": [msgpack.ExtType(1, b"x")]}, use_bin_type=True),
    }
    for body in cases.values():
        for dec in DECODERS:
            with pytest.raises(wire.ProtocolError):
                dec(body)


def test_body_over_the_limit() -> None:
    body = wire.encode_ids([ID])
    big = body + bytes(wire.MAX_BODY + 1 - len(body))
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.decode_ids(big)


def test_too_many_ids_or_blocks() -> None:
    ids = [k.to_bytes(32, "big") for k in range(wire.MAX_IDS + 1)]
    with pytest.raises(wire.ProtocolError):
        wire.decode_ids(wire.encode_ids(ids))
    assert len(wire.decode_ids(wire.encode_ids(ids[:-1]))) == wire.MAX_IDS
    raw = NONE + msgpack.packb({"blocks": [[i, b""] for i in ids]}, use_bin_type=True)
    with pytest.raises(wire.ProtocolError):
        wire.decode_blocks(raw)


def test_base_refusals() -> None:
    s = ["g1", bytes(16), 1, 65536]

    def base(**kw: Any) -> bytes:
        doc = {"stream": s, "seq": 5, "ts": 0, "volumes": {"v": [4096, [[0, ID]]]}, **kw}
        return ZSTD + zstandard.ZstdCompressor().compress(msgpack.packb(doc, use_bin_type=True))

    assert wire.decode_base(base()).volumes == {"v": (4096, {0: ID})}
    for kw in [
        {"seq": 0},
        {"ts": -1},
        {"stream": s[:3]},
        {"volumes": []},
        {"volumes": {"v": [0, []]}},
        {"volumes": {"": [4096, []]}},
        {"volumes": {7: [4096, []]}},
        {"volumes": {"v": [4096, [[-1, ID]]]}},
        {"volumes": {"v": [4096, [[0, ID[:31]]]]}},
        {"volumes": {"v": [4096, [[0]]]}},
        {"volumes": {"v": [4096, {0: ID}]}},
        {"volumes": {"v": 4096}},
        {"volumes": {f"v{k}": [4096, []] for k in range(65)}},
    ]:
        with pytest.raises(wire.ProtocolError):
            wire.decode_base(base(**kw))


# ------------------------------------------------------------------ decompression limits
def _rle_frame(out_bytes: int, byte: bytes = b"\x90") -> bytes:
    """A zstd frame with no declared size, of RLE blocks: 4 bytes per 128 KiB of output."""
    frame = bytearray((0xFD2FB528).to_bytes(4, "little")) + bytes([0x00, 0x58])
    n = out_bytes // (1 << 17)
    for k in range(n):
        hdr = (1 if k == n - 1 else 0) | (1 << 1) | ((1 << 17) << 3)
        frame += hdr.to_bytes(3, "little") + byte
    return bytes(frame)


def test_rle_frame_helper_is_valid_zstd() -> None:
    out = zstandard.ZstdDecompressor().decompressobj().decompress(_rle_frame(4 << 17, b"\x07"))
    assert out == b"\x07" * (4 << 17)


def test_decompression_bomb_stays_within_the_limit() -> None:
    """A few KiB that expand to 3 x MAX_RAW: refused without holding more than MAX_RAW."""
    bomb = ZSTD + _rle_frame(3 * wire.MAX_RAW)
    assert len(bomb) < 16 << 10
    tracemalloc.start()
    try:
        for dec in DECODERS:
            with pytest.raises(wire.ProtocolError):
                dec(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < wire.MAX_RAW + (16 << 20), f"decoding held {peak >> 20} MiB"


def test_declared_huge_frame_is_refused_before_allocation() -> None:
    frame = bytearray((0xFD2FB528).to_bytes(4, "little")) + bytes([0xE0])  # 8-byte size
    frame += (1 << 50).to_bytes(8, "little")
    frame += (1 | 2 | (16 << 3)).to_bytes(3, "little") + b"\x90"
    tracemalloc.start()
    try:
        with pytest.raises(wire.ProtocolError):
            wire.decode_ids(ZSTD + bytes(frame))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("declared", [True, False])
def test_payload_just_within_the_limit_decodes(declared: bool) -> None:
    blocks = {bytes(32): bytes(wire.MAX_RAW - 1024)}
    raw = msgpack.packb({"blocks": [[k, v] for k, v in blocks.items()]}, use_bin_type=True)
    assert len(raw) <= wire.MAX_RAW
    z = zstandard.ZstdCompressor(level=1, write_content_size=declared).compress(raw)
    del raw
    assert zstandard.get_frame_parameters(z).content_size != (
        zstandard.CONTENTSIZE_UNKNOWN if declared else 0
    )
    if declared:
        assert wire.decode_blocks(ZSTD + z) == blocks
    else:  # our senders always declare it; without it the size cannot be bounded up front
        with pytest.raises(wire.ProtocolError, match="unknown or too large"):
            wire.decode_blocks(ZSTD + z)


def test_trailing_bytes_after_the_zstd_frame_are_refused() -> None:
    body = wire.encode_ids([bytes(32)])
    z = ZSTD + zstandard.ZstdCompressor().compress(body[len(ZSTD) :])
    assert wire.decode_ids(z) == [bytes(32)]
    with pytest.raises(wire.ProtocolError):
        wire.decode_ids(z + b"junk")


# ------------------------------------------------------------------ fuzzing
def only_protocol_errors(body: bytes) -> list[Any]:
    """Run every decoder; anything but a result or a ProtocolError fails the test."""
    out = []
    for dec in DECODERS:
        try:
            out.append(dec(body))
        except wire.ProtocolError:
            out.append(None)
    return out


prefixes = st.sampled_from([b"", NONE, ZSTD, ZSTD + (0xFD2FB528).to_bytes(4, "little"), b"CDPR"])


@few(300)
@given(prefix=prefixes, tail=st.binary(max_size=600))
def test_arbitrary_bytes(prefix: bytes, tail: bytes) -> None:
    only_protocol_errors(prefix + tail)


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
)
objs = st.recursive(
    leaves,
    lambda c: (
        st.lists(c, max_size=5)
        | st.dictionaries(
            st.text(max_size=4) | st.integers(-3, 3) | st.binary(max_size=3), c, max_size=4
        )
    ),
    max_leaves=20,
)


def _pack(o: Any) -> bytes:
    return msgpack.packb(o, use_bin_type=True)


@few(300)
@given(o=objs, codec=codecs)
def test_arbitrary_msgpack(o: Any, codec: int) -> None:
    raw = _pack(o)
    body = NONE + raw if codec == wire.CODEC_NONE else ZSTD + zstandard.compress(raw)
    only_protocol_errors(body)


@few(300)
@given(
    kind=st.sampled_from(["ids", "blocks", "base", "batch"]),
    vals=st.lists(objs, min_size=4, max_size=4),
)
def test_right_keys_wrong_values(kind: str, vals: list[Any]) -> None:
    if kind == "ids":
        doc = {"ids": vals[0]}
    elif kind == "blocks":
        doc = {"blocks": vals[0]}
    elif kind == "base":
        doc = dict(zip(["stream", "seq", "ts", "volumes"], vals, strict=True))
    else:  # valid checksum over arbitrary header and records: the decoder's own checks
        doc = msgpack.unpackb(_raw_batch(vals[0], vals[1], ())[6:], raw=False)
        doc["b"] = vals[2]
    only_protocol_errors(NONE + _pack(doc))


def _well_formed(b: wire.Batch) -> None:
    """What a decoded batch promises the receiver, whatever came in."""

    def u(x: Any, lo: int = 0) -> None:
        assert type(x) is int and lo <= x <= U63

    def name(x: Any) -> None:
        assert isinstance(x, str) and 1 <= len(x.encode()) <= 255

    assert isinstance(b.stream.journal, bytes) and len(b.stream.journal) == 16
    name(b.stream.group)
    u(b.stream.epoch, 1)
    assert 4096 <= b.stream.chunk_size <= wire.MAX_BLOCK
    assert [r.seq for r in b.records] == list(range(b.first_seq, b.last_seq + 1))
    for r in b.records:
        u(r.seq, 1)
        u(r.ts)
        assert r.wall is None or type(r.wall) is int
        if isinstance(r, WriteRecord | ZeroRecord):
            name(r.volume)
            u(r.offset)
            u(r.length, 1)
        if isinstance(r, WriteRecord):
            assert r.data is None
            for x in r.refs:
                assert isinstance(x.block_id, bytes) and len(x.block_id) == 32
                assert type(x.length) is int and 1 <= x.length <= wire.MAX_BLOCK
        if isinstance(r, ZeroRecord):
            assert type(r.trim) is bool
        if isinstance(r, CheckpointRecord):
            assert isinstance(r.kind, CheckpointKind)
            name(r.name)
        if isinstance(r, VolumeRecord):
            name(r.volume)
            u(r.size, 1)
    for k, v in b.blocks.items():
        assert isinstance(k, bytes) and len(k) == 32 and isinstance(v, bytes)


@few(400)
@given(b=batches(max_records=4), data=st.data())
def test_records_with_one_field_replaced(b: wire.Batch, data: st.DataObject) -> None:
    """Forged records with a valid checksum: each field of each record replaced in turn."""
    outer = msgpack.unpackb(wire.encode_batch(b, codec=wire.CODEC_NONE)[6:], raw=False)
    head, recs = msgpack.unpackb(outer["h"], raw=False), msgpack.unpackb(outer["r"], raw=False)
    where = data.draw(st.sampled_from(["record", "ref", "header", "stream", "drop", "add"]))
    k = data.draw(st.integers(0, len(recs) - 1))
    o = data.draw(objs)
    if where == "record":
        recs[k][data.draw(st.integers(0, len(recs[k]) - 1))] = o
    elif where == "ref" and recs[k][0] == wire.T_WRITE and recs[k][7]:
        refs_ = recs[k][7]
        j = data.draw(st.integers(0, len(refs_) - 1))
        if data.draw(st.booleans()):
            refs_[j] = o
        else:
            refs_[j][data.draw(st.integers(0, 1))] = o
    elif where == "header":
        head[data.draw(st.integers(0, 2))] = o
    elif where == "stream":
        head[0][data.draw(st.integers(0, 3))] = o
    elif where == "drop":
        del recs[k][data.draw(st.integers(0, len(recs[k]) - 1))]
    elif where == "add":
        recs[k].append(o)
    body = _raw_batch(head, recs, outer["b"])
    try:
        got = wire.decode_batch(body)
    except wire.ProtocolError:
        return
    _well_formed(got)
    only_protocol_errors(body)


def _mutate(data: st.DataObject, body: bytes, other: bytes) -> tuple[str, bytes]:
    how = data.draw(st.sampled_from(["flip", "flips", "truncate", "splice", "insert", "delete"]))
    n = len(body)
    if how == "flip":
        at, bit = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 7))
        return how, body[:at] + bytes([body[at] ^ (1 << bit)]) + body[at + 1 :]
    if how == "flips":
        out = bytearray(body)
        for at in data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=8)):
            out[at] ^= data.draw(st.integers(1, 255))
        return how, bytes(out)
    if how == "truncate":
        return how, body[: data.draw(st.integers(0, n - 1))]
    if how == "splice":
        i, j = data.draw(st.integers(0, n)), data.draw(st.integers(0, len(other)))
        return how, body[:i] + other[j:]
    if how == "insert":
        at = data.draw(st.integers(0, n))
        return how, body[:at] + data.draw(st.binary(min_size=1, max_size=16)) + body[at:]
    at = data.draw(st.integers(0, n - 1))
    return how, body[:at] + body[at + data.draw(st.integers(1, 16)) :]


@few(400)
@given(
    data=st.data(),
    b1=batches(max_records=4),
    b2=batches(max_records=4),
    codec=codecs,
)
def test_mutated_batches(data: st.DataObject, b1: wire.Batch, b2: wire.Batch, codec: int) -> None:
    body, other = wire.encode_batch(b1, codec=codec), wire.encode_batch(b2, codec=codec)
    how, bad = _mutate(data, body, other)
    results = only_protocol_errors(bad)
    got = results[0]
    if how == "truncate":
        assert got is None  # a cut body is never a batch
    if got is not None:
        # the checksummed part cannot change unnoticed: it is one of the two batches
        _well_formed(got)
        assert (got.stream, got.records) in [(b1.stream, b1.records), (b2.stream, b2.records)]


@few(300)
@given(
    data=st.data(),
    kind=st.sampled_from(["ids", "blocks", "base"]),
    ids=st.lists(ids32, min_size=1, max_size=8),
    blocks=block_maps.filter(bool),
    base=bases,
    codec=codecs,
)
def test_mutated_messages(
    data: st.DataObject,
    kind: str,
    ids: list[bytes],
    blocks: dict[bytes, bytes],
    base: wire.Base,
    codec: int,
) -> None:
    bodies = {
        "ids": wire.encode_ids(ids),
        "blocks": wire.encode_blocks(blocks, codec=codec),
        "base": wire.encode_base(base),
    }
    body = bodies[kind]
    _, bad = _mutate(data, body, data.draw(st.sampled_from(list(bodies.values()))))
    only_protocol_errors(bad)
