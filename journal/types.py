"""Records and small value types shared by the journal's modules.

Every record has a ``seq`` (gap-free per journal, the only truth for ordering) and a ``ts``:
the journal time in ns, which never runs backwards. ``wall`` is set only when the wall clock
read at append time was behind ``ts`` (a clock step back), so the step is recorded, not obeyed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NewType, Protocol

Seq = NewType("Seq", int)
BlockId = NewType("BlockId", bytes)  # SHA-256 of the uncompressed block, 32 bytes


class CheckpointKind(enum.StrEnum):
    CRASH = "crash"
    APP = "app"
    USER = "user"
    ANOMALY = "anomaly"


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A piece of a write's data held in the block store.

    ``pack``/``pack_offset`` are a location hint written at seal time; the block store
    checks the hint against the id and falls back to its index when the block has moved.
    """

    block_id: BlockId
    length: int
    pack: int
    pack_offset: int


@dataclass(frozen=True, slots=True)
class WriteRecord:
    seq: Seq
    ts: int
    volume: str
    offset: int
    length: int
    data: bytes | memoryview | None  # inline data (hot segment), or None when ``refs`` has it
    refs: tuple[BlockRef, ...] = ()
    wall: int | None = None


def _slot_setters(cls: type, names: tuple[str, ...]) -> list[Callable[[object, object], None]]:
    """The slots' own setters, which a frozen class's ``__setattr__`` does not guard."""
    if tuple(f.name for f in fields(cls)) != names:
        raise TypeError(f"{cls.__name__}: fields changed, update its fast constructor")
    return [cls.__dict__[n].__set__ for n in names]


# A frozen dataclass's __init__ sets each field through object.__setattr__: about 1.2 µs
# for a WriteRecord, paid on the NBD loop once per guest write, and 0.7 µs for a BlockRef,
# paid once per block when sealing. These build equal objects for about half that
# (docs/benchmarks.md); for hot paths only.
class _NewWrite(Protocol):
    def __call__(
        self, seq: Seq, ts: int, volume: str, offset: int, length: int,
        data: bytes | memoryview | None, refs: tuple[BlockRef, ...] = ...,
        wall: int | None = ...,
    ) -> WriteRecord: ...  # fmt: skip


def _write_builder() -> _NewWrite:
    s0, s1, s2, s3, s4, s5, s6, s7 = _slot_setters(
        WriteRecord, ("seq", "ts", "volume", "offset", "length", "data", "refs", "wall")
    )
    new = object.__new__

    def new_write(
        seq: Seq, ts: int, volume: str, offset: int, length: int,
        data: bytes | memoryview | None, refs: tuple[BlockRef, ...] = (),
        wall: int | None = None,
    ) -> WriteRecord:  # fmt: skip
        """``WriteRecord(...)``, built faster."""
        r: WriteRecord = new(WriteRecord)
        s0(r, seq)
        s1(r, ts)
        s2(r, volume)
        s3(r, offset)
        s4(r, length)
        s5(r, data)
        s6(r, refs)
        s7(r, wall)
        return r

    return new_write


def _ref_builder() -> Callable[[BlockId, int, int, int], BlockRef]:
    s0, s1, s2, s3 = _slot_setters(BlockRef, ("block_id", "length", "pack", "pack_offset"))
    new = object.__new__

    def new_block_ref(block_id: BlockId, length: int, pack: int, pack_offset: int) -> BlockRef:
        """``BlockRef(...)``, built faster."""
        r: BlockRef = new(BlockRef)
        s0(r, block_id)
        s1(r, length)
        s2(r, pack)
        s3(r, pack_offset)
        return r

    return new_block_ref


new_write = _write_builder()
new_block_ref = _ref_builder()


@dataclass(frozen=True, slots=True)
class ZeroRecord:
    """A range that reads as zeros from this seq on; ``trim`` says the guest discarded it."""

    seq: Seq
    ts: int
    volume: str
    offset: int
    length: int
    trim: bool = False
    wall: int | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    seq: Seq
    ts: int
    name: str
    kind: CheckpointKind
    wall: int | None = None


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """Declares a volume (or a new size) in this journal's consistency group."""

    seq: Seq
    ts: int
    volume: str
    size: int
    wall: int | None = None


Record = WriteRecord | ZeroRecord | CheckpointRecord | VolumeRecord


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: Seq
    ts: int
    name: str
    kind: CheckpointKind


@dataclass(frozen=True, slots=True)
class Hold:
    """Something that needs history from ``seq`` on: folding never crosses it.

    kind is "snapshot", "replica" or "export"; when the size cap is reached and only holds
    block folding, the oldest replica hold is released (that replica resyncs changed blocks).
    """

    kind: str
    name: str
    seq: Seq
    created_ts: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A retained point that outlives the journal window.

    While ``seq`` is inside the window it reads through the journal; when retention folds
    past it, its content is first written down as a manifest (chunk -> block, sharing blocks
    with everything else), so it stays exact. ``locked_until`` (ns, 0: not locked): before
    then no path can delete it.
    """

    name: str
    seq: Seq
    ts: int
    created_ts: int
    locked_until: int = 0
    kind: str = "manual"
    materialized: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """The retained history: any seq in [first_seq, last_seq] can be read exactly."""

    first_seq: Seq
    last_seq: Seq
    first_ts: int
    last_ts: int


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What open() found and did; shown in status so a truncation is never silent."""

    segments: int
    records: int
    truncated_segment: str | None = None
    truncated_at: int | None = None
    truncated_bytes: int = 0
    removed_unsealed_duplicates: int = 0
    index_rebuilt: bool = False
    pack_bytes_truncated: int = 0
    last_seq: int = 0  # the last record found at open: what survived the stop or crash
    # (pack, offset) of a bad entry inside fsynced pack data: kept whole, never collected
    damaged_packs: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class FoldReport:
    """Result of one retention pass."""

    folded_segments: int
    base_seq: Seq
    chunks_rewritten: int
    blocks_collected: int
    packs_removed: int
    released_holds: tuple[Hold, ...] = ()
    history_short: bool = False
