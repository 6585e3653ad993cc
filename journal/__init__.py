"""cdp's journal engine: segments (the truth), block store, index, point-in-time reader.

This package imports nothing else of the project; replicator/ and cdp/ build on it.
"""

from .clock import Clock, ManualClock, wall_clock
from .errors import (
    BlockCorrupt,
    BlockMissing,
    BlocksNeeded,
    JournalClosed,
    JournalError,
    NoSuchSnapshot,
    NoSuchVolume,
    OutOfOrder,
    PointNotRetained,
    SegmentCorrupt,
    SnapshotLocked,
    StorageError,
)
from .journal import Journal, JournalOptions, JournalStatus, TailCursor
from .storage import OsStorage, Storage
from .types import (
    BlockRef,
    Checkpoint,
    CheckpointKind,
    CheckpointRecord,
    FoldReport,
    Hold,
    Record,
    RecoveryReport,
    Seq,
    Snapshot,
    VolumeRecord,
    Window,
    WriteRecord,
    ZeroRecord,
)

__all__ = [
    "BlockCorrupt",
    "BlockMissing",
    "BlockRef",
    "BlocksNeeded",
    "Checkpoint",
    "CheckpointKind",
    "CheckpointRecord",
    "Clock",
    "FoldReport",
    "Hold",
    "Journal",
    "JournalClosed",
    "JournalError",
    "JournalOptions",
    "JournalStatus",
    "ManualClock",
    "NoSuchSnapshot",
    "NoSuchVolume",
    "OsStorage",
    "OutOfOrder",
    "PointNotRetained",
    "Record",
    "RecoveryReport",
    "SegmentCorrupt",
    "Seq",
    "Snapshot",
    "SnapshotLocked",
    "Storage",
    "StorageError",
    "TailCursor",
    "VolumeRecord",
    "Window",
    "WriteRecord",
    "ZeroRecord",
    "wall_clock",
]
