"""Turning journal records into what goes on the wire: refs instead of data.

A hot write carries its data inline; here it is cut at the journal's chunk bounds and each
piece named by the same BLAKE3 id the block store would give it, so the receiver can say
which pieces it already holds before any data is sent (dedup by hash, as borg and restic do
against their repositories). A sealed write already names its blocks; their data is read
from the block store only for the blocks the receiver lacks.

``coalesce`` (off by default): within one batch, a piece that a later write of the same
batch replaces exactly (same offset and length) is shipped as the later piece's block, so
only the last version of a rewritten block crosses the WAN. Seqs stay gap-free; the DR
points inside such a batch read the batch's last version of those pieces (coarser history),
and a batch never spans a checkpoint, so every checkpoint stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from journal import BlockRef, CheckpointRecord, Record, WriteRecord
from journal.blockstore import block_id
from journal.types import BlockId


@dataclass(slots=True)
class Prepared:
    """One batch's records in wire form and where each referenced block's data comes from."""

    records: list[Record]
    inline: dict[bytes, memoryview | bytes] = field(default_factory=dict)
    stored: dict[bytes, BlockRef] = field(default_factory=dict)
    logical_bytes: int = 0  # bytes of guest data the records describe
    coalesced_bytes: int = 0  # bytes not shipped because a later write replaced them


def prepare(records: Sequence[Record], chunk_size: int, *, coalesce: bool = False) -> Prepared:
    out = Prepared([])
    wire: list[Record] = []
    for r in records:
        if isinstance(r, WriteRecord):
            out.logical_bytes += r.length
            if r.data is not None:
                data = memoryview(r.data)
                refs: list[BlockRef] = []
                pos, end = r.offset, r.offset + r.length
                while pos < end:
                    nxt = min((pos // chunk_size + 1) * chunk_size, end)
                    piece = data[pos - r.offset : nxt - r.offset]
                    bid = block_id(piece)
                    out.inline.setdefault(bid, piece)
                    refs.append(BlockRef(BlockId(bid), len(piece), 0, 0))
                    pos = nxt
                r = WriteRecord(
                    r.seq, r.ts, r.volume, r.offset, r.length, None, tuple(refs), r.wall
                )
            else:
                for x in r.refs:
                    out.stored.setdefault(x.block_id, x)
        wire.append(r)
    if coalesce:
        wire = _coalesce(wire, out)
    out.records = wire
    return out


def _coalesce(recs: list[Record], p: Prepared) -> list[Record]:
    """Replace each piece by the last piece written at the same (volume, offset, length)."""
    last: dict[tuple[str, int, int], BlockRef] = {}
    for r in recs:
        if isinstance(r, WriteRecord):
            pos = r.offset
            for x in r.refs:
                last[(r.volume, pos, x.length)] = x
                pos += x.length
    out: list[Record] = []
    for r in recs:
        if isinstance(r, WriteRecord):
            pos = r.offset
            refs = []
            for x in r.refs:
                y = last[(r.volume, pos, x.length)]
                if y.block_id != x.block_id:
                    p.coalesced_bytes += x.length
                refs.append(y)
                pos += x.length
            r = WriteRecord(r.seq, r.ts, r.volume, r.offset, r.length, None, tuple(refs), r.wall)
        out.append(r)
    return out


def split_at_checkpoints(records: Sequence[Record]) -> int:
    """How many leading records to ship so that a batch ends at its first checkpoint."""
    for k, r in enumerate(records):
        if isinstance(r, CheckpointRecord):
            return k + 1
    return len(records)
