"""The fast record constructors (journal/types.py) build what the dataclasses build."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from journal.types import (
    BlockId,
    BlockRef,
    Seq,
    WriteRecord,
    _slot_setters,
    new_block_ref,
    new_write,
)

_ref = st.builds(
    lambda b, n, p, o: (BlockId(b), n, p, o),
    st.binary(min_size=32, max_size=32),
    st.integers(0, 1 << 40),
    st.integers(0, 1 << 62),
    st.integers(0, 1 << 40),
)


@given(
    seq=st.integers(0, 1 << 63),
    ts=st.integers(0, 1 << 63),
    volume=st.text(max_size=20),
    offset=st.integers(0, 1 << 50),
    data=st.one_of(st.none(), st.binary(max_size=64)),
    refs=st.lists(_ref, max_size=3),
    wall=st.one_of(st.none(), st.integers(0, 1 << 63)),
)
def test_new_write_equals_the_dataclass(
    seq: int, ts: int, volume: str, offset: int, data: bytes | None,
    refs: list[tuple[BlockId, int, int, int]], wall: int | None,
) -> None:  # fmt: skip
    fast_refs = tuple(new_block_ref(*r) for r in refs)
    slow_refs = tuple(BlockRef(*r) for r in refs)
    assert fast_refs == slow_refs and hash(fast_refs) == hash(slow_refs)
    n = len(data) if data is not None else 0
    fast = new_write(Seq(seq), ts, volume, offset, n, data, fast_refs, wall)
    slow = WriteRecord(Seq(seq), ts, volume, offset, n, data, slow_refs, wall)
    assert fast == slow
    assert dataclasses.astuple(fast) == dataclasses.astuple(slow)
    assert repr(fast) == repr(slow)


def test_the_defaults_match_and_the_records_stay_frozen() -> None:
    r = new_write(Seq(1), 2, "v", 0, 3, b"abc")
    assert r == WriteRecord(Seq(1), 2, "v", 0, 3, b"abc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.offset = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        new_block_ref(BlockId(b"x" * 32), 1, 2, 3).pack = 9  # type: ignore[misc]


def test_a_changed_field_list_is_refused_at_import() -> None:
    """Adding a field to a record must break the fast constructor loudly, not leave the
    new field unset."""

    @dataclass(frozen=True, slots=True)
    class Grown:
        a: int
        b: int

    assert len(_slot_setters(Grown, ("a", "b"))) == 2
    with pytest.raises(TypeError, match="fields changed"):
        _slot_setters(Grown, ("a",))
    with pytest.raises(TypeError, match="fields changed"):
        _slot_setters(Grown, ("b", "a"))
