"""Errors raised by the journal engine.

Tree::

    JournalError
     ├── SegmentCorrupt      a checksum or structure failure inside a segment (not a torn tail)
     │    └── SegmentHeaderTorn   header short or unreadable (a segment born just before a crash)
     ├── BlockCorrupt        a stored block does not match its checksum or its name
     ├── BlockMissing        a referenced block is not in the block store
     ├── PointNotRetained    a seq or time outside the retained journal window
     ├── NoSuchVolume        a volume the journal has never seen
     ├── JournalClosed       use after close()
     ├── OutOfOrder          replicated records that do not start at the next seq
     ├── BlocksNeeded        replicated records naming blocks neither sent nor stored
     ├── NoSuchSnapshot      a snapshot name the journal does not know
     ├── SnapshotLocked      deleting a snapshot before its lock expires
     └── StorageError        the OS refused a write/fsync (EIO, ENOSPC): fail-stop, never retried

Integrity errors (SegmentCorrupt, BlockCorrupt) are deliberately not subclasses of the
"not found" errors so that a generic handler cannot hide them.
"""

from __future__ import annotations

from typing import ClassVar


class JournalError(Exception):
    """Root of every error the journal raises; carries an optional hint for the operator."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class SegmentCorrupt(JournalError):
    """A frame in the middle of a segment failed its checksum: data was damaged at rest."""

    def __init__(self, segment: str, offset: int, reason: str) -> None:
        super().__init__(
            f"segment {segment} is corrupt at byte offset {offset}: {reason}",
            hint="run `cdp verify` and restore the segment from the replica",
        )
        self.segment = segment
        self.offset = offset
        self.reason = reason


class SegmentHeaderTorn(SegmentCorrupt):
    """A segment header is short or unreadable: a file created just before a crash.

    Recovery may drop such a segment when nothing after it was ever synced; a readable
    header that is wrong (another journal, another number, a newer version) is never dropped.
    """


class BlockCorrupt(JournalError):
    """A block read back from a pack does not match its checksum or its content address."""

    def __init__(self, block_id: bytes, where: str, reason: str) -> None:
        super().__init__(f"block {block_id.hex()[:16]} in {where} is corrupt: {reason}")
        self.block_id = block_id
        self.where = where


class BlockMissing(JournalError):
    """A record or base entry names a block that no pack holds."""

    def __init__(self, block_id: bytes) -> None:
        super().__init__(f"block {block_id.hex()[:16]} is not in the block store")
        self.block_id = block_id


class PointNotRetained(JournalError):
    """The requested point lies outside the retained journal window."""

    def __init__(self, what: str, first_seq: int, last_seq: int, first_ts: int, last_ts: int):
        super().__init__(
            f"{what} is not retained: the journal window is seq {first_seq}..{last_seq}",
            hint="pick a point inside the window (see `cdp status`), or a snapshot",
        )
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.first_ts = first_ts
        self.last_ts = last_ts


class NoSuchVolume(JournalError):
    """The volume name is unknown to this journal."""

    def __init__(self, volume: str) -> None:
        super().__init__(f"no volume named {volume!r} in this journal")
        self.volume = volume


class JournalClosed(JournalError):
    """The journal was closed, or stopped after a storage failure."""


class StorageError(JournalError):
    """The storage refused an operation; the journal stops accepting writes (fail-stop)."""

    def __init__(self, op: str, path: str, err: OSError) -> None:
        super().__init__(f"{op} {path} failed: {err.strerror or err}")
        self.op = op
        self.path = path
        self.errno = err.errno


class OutOfOrder(JournalError):
    """Replicated records do not start at the journal's next seq (a gap or an overlap)."""

    def __init__(self, first_seq: int, expected: int) -> None:
        super().__init__(f"records start at seq {first_seq}, expected {expected}")
        self.first_seq = first_seq
        self.expected = expected


class BlocksNeeded(JournalError):
    """Replicated records reference blocks this store does not hold and the batch lacks."""

    def __init__(self, block_ids: list[bytes]) -> None:
        super().__init__(
            f"{len(block_ids)} referenced blocks are neither in the batch nor in the store"
        )
        self.block_ids = block_ids


class NoSuchSnapshot(JournalError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no snapshot named {name!r}", hint="list them with `cdp snapshot list`")
        self.name = name


class SnapshotLocked(JournalError):
    """A locked snapshot cannot be deleted or pruned before its lock expires, by any path."""

    def __init__(self, name: str, until_ns: int) -> None:
        super().__init__(
            f"snapshot {name!r} is locked until {until_ns} (ns since the epoch)",
            hint="a lock can be extended, never shortened; wait until it expires",
        )
        self.name = name
        self.until_ns = until_ns
