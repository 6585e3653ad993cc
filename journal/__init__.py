"""cdp's journal engine: segments (the truth), block store, index, point-in-time reader.

This package imports nothing else of the project; replicator/ and cdp/ build on it.
"""

from .clock import Clock, ManualClock, wall_clock
from .errors import (
    BlockCorrupt,
    BlockMissing,
    JournalClosed,
    JournalError,
    NoSuchVolume,
    PointNotRetained,
    SegmentCorrupt,
    StorageError,
)
from .journal import Journal, JournalOptions, JournalStatus
from .storage import OsStorage, Storage
from .types import (
    Checkpoint,
    CheckpointKind,
    FoldReport,
    Hold,
    Record,
    RecoveryReport,
    Seq,
    Window,
)

__all__ = [
    "BlockCorrupt",
    "BlockMissing",
    "Checkpoint",
    "CheckpointKind",
    "Clock",
    "FoldReport",
    "Hold",
    "Journal",
    "JournalClosed",
    "JournalError",
    "JournalOptions",
    "JournalStatus",
    "ManualClock",
    "NoSuchVolume",
    "OsStorage",
    "PointNotRetained",
    "Record",
    "RecoveryReport",
    "SegmentCorrupt",
    "Seq",
    "Storage",
    "StorageError",
    "Window",
    "wall_clock",
]
