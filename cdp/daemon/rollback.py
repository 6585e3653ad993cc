"""Rollback: put a live volume back to a point, as journaled writes.

Only the chunks written since the point are rewritten (the journal's version maps name
them), so the cost follows the change, not the volume size. The rollback goes through the
volume's NBD export like guest writes do (image and journal together), between two
checkpoints: ``pre-rollback-<t>`` (the state it undoes: roll forward again by rolling back
to it) and ``rolled-back-<t>``. It never runs under a connected client unless forced: a disk
changed under a running guest corrupts its file systems, so forcing disconnects the clients
and the VM must be restarted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cdp.nbd.export import Export
from journal import CheckpointKind, Journal

log = logging.getLogger(__name__)

STEP_CHUNKS = 64  # chunks per journal batch: bounded memory, one writev each


@dataclass(slots=True)
class VolumePlan:
    volume: str
    chunks: list[int]
    changed_bytes: int = 0


@dataclass(slots=True)
class RollbackPlan:
    group: str
    seq: int
    snapshot: str | None
    volumes: list[VolumePlan] = field(default_factory=list)

    @property
    def changed_bytes(self) -> int:
        return sum(v.changed_bytes for v in self.volumes)

    def doc(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "seq": self.seq,
            "snapshot": self.snapshot,
            "volumes": [
                {"volume": v.volume, "chunks": len(v.chunks), "bytes": v.changed_bytes}
                for v in self.volumes
            ],
            "chunks": sum(len(v.chunks) for v in self.volumes),
            "bytes": self.changed_bytes,
        }


def plan(
    j: Journal, group: str, volumes: list[str], seq: int, snapshot: str | None
) -> RollbackPlan:
    """What a rollback to ``seq`` (or ``snapshot``) rewrites; changes nothing."""
    cs = j.opts.chunk_size
    p = RollbackPlan(group, seq, snapshot)
    for vol in volumes:
        if snapshot is not None:
            chunks = j.changed_since_snapshot(snapshot, vol)
        else:
            chunks = j.changed_since(vol, seq)
        size = j.volume_size(vol)
        p.volumes.append(
            VolumePlan(vol, chunks, sum(min(cs, size - c * cs) for c in chunks if c * cs < size))
        )
    return p


def _read(j: Journal, p: RollbackPlan, vol: str, off: int, n: int) -> bytes:
    buf = bytearray(n)
    if p.snapshot is not None:
        j.read_snapshot_into(p.snapshot, vol, off, memoryview(buf))
    else:
        j.read_into(vol, off, memoryview(buf), p.seq)
    return bytes(buf)


def apply_volume(j: Journal, p: RollbackPlan, vp: VolumePlan, ex: Export) -> None:
    """Rewrite the planned chunks through the export (blocking: a worker thread).

    The caller guarantees no client is attached, so nothing else writes this export
    meanwhile; each step is committed to the journal before the next is read.
    """
    cs = j.opts.chunk_size
    size = ex.size
    for k in range(0, len(vp.chunks), STEP_CHUNKS):
        for c in vp.chunks[k : k + STEP_CHUNKS]:
            off = c * cs
            n = min(cs, size - off)
            if n <= 0:
                continue
            data = _read(j, p, vp.volume, off, n)
            if data.count(0) == n:
                err = ex.zero(off, n, trim=False, no_hole=False)
            else:
                err = ex.write(off, data)
            if err:
                raise OSError(f"rollback write to {vp.volume} at {off} failed ({ex.last_error})")
        ex.commit()


def mark(j: Journal, name: str) -> int:
    seq = int(j.checkpoint(name, CheckpointKind.USER))
    j.sync()
    return seq
