"""The record codec: the fast paths write the same bytes as the general encoder.

Sealing re-encodes every write with ``encode_sealed_write`` and capture frames writes with
``encode_write_header``; both must produce exactly the bytes ``encode`` gives for the
record they stand for, or a rebuilt index and a replica would read another format.
"""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from journal import codec
from journal.types import BlockId, BlockRef, Seq, WriteRecord

u64 = st.integers(min_value=0, max_value=2**63 - 1)
refs_st = st.lists(
    st.builds(
        BlockRef,
        st.binary(min_size=32, max_size=32).map(BlockId),
        st.integers(min_value=1, max_value=1 << 20),
        u64,
        u64,
    ),
    min_size=1,
    max_size=8,
).map(tuple)
head_st = st.tuples(u64.map(Seq), u64, st.text(min_size=1, max_size=40), u64, st.none() | u64)


@given(head_st, refs_st)
def test_sealed_write_is_the_general_encoding(head, refs) -> None:
    seq, ts, volume, offset, wall = head
    length = sum(r.length for r in refs)
    hot = WriteRecord(seq, ts, volume, offset, length, b"", (), wall)
    sealed = WriteRecord(seq, ts, volume, offset, length, None, refs, wall)
    got = codec.encode_sealed_write(hot, refs)
    assert got == codec.encode(sealed)
    # the layout docs/design/journal-format.md gives, packed by msgpack itself
    body = [[r.block_id, r.length, r.pack, r.pack_offset] for r in refs]
    assert got == msgpack.packb([codec.T_WRITE, seq, ts, wall, volume, offset, length, body])
    assert codec.decode(got) == sealed


@given(head_st, st.binary(min_size=1, max_size=70_000))
def test_inline_write_header_plus_data_is_the_general_encoding(head, data) -> None:
    seq, ts, volume, offset, wall = head
    rec = WriteRecord(seq, ts, volume, offset, len(data), data, (), wall)
    framed = codec.encode_write_header(seq, ts, wall, volume, offset, len(data)) + data
    assert framed == codec.encode(rec)
    assert codec.decode(framed) == rec
