"""The journal of one consistency group: segments + block store + index + version maps.

Write path (the capture source's acknowledgement path): ``write()`` frames the record with its
data inline and hands it to the OS with one writev; ``sync()`` makes everything appended before
it durable, many callers sharing one fdatasync (group commit). Hashing, compression and packing
happen later in ``seal_pending()``, which the daemon runs in a worker thread: it rewrites a
rolled hot segment as a sealed one whose writes reference blocks, without changing what any
seq reads. ``apply_retention()`` folds old segments into the base and collects blocks.

The journal starts no threads of its own (the block store's small hashing pool aside); the
owner decides where background steps run.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import uuid as uuidlib
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from . import codec
from .blockstore import MAX_BLOCK, BlockStore, Prepared, block_id
from .clock import Clock, wall_clock
from .errors import (
    BlocksNeeded,
    JournalClosed,
    JournalError,
    NoSuchSnapshot,
    NoSuchVolume,
    OutOfOrder,
    PointNotRetained,
    SegmentCorrupt,
    SegmentHeaderTorn,
    SnapshotLocked,
    StorageError,
)
from .index import Index, SegmentEntry
from .segment import (
    FLAG_META,
    FRAME_SIZE,
    HEADER_SIZE,
    MAX_SEGMENT,
    ScanResult,
    SegmentHeader,
    SegmentWriter,
    decode_header,
    durable_note,
    read_frames,
    scan,
    segment_seed,
    write_frames,
)
from .storage import File, OsStorage, Storage, write_atomic
from .types import (
    BlockId,
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
    new_write,
)
from .volmap import BlockCache, Extent, Inline, VolumeMap

FORMAT_VERSION = 1
_SNAP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class JournalOptions:
    segment_size: int = 64 * 1024 * 1024
    chunk_size: int = 64 * 1024  # block and version-map granularity, aligned to volume offsets
    pack_target: int = 256 * 1024 * 1024
    hash_workers: int = 2
    zstd_level: int = 1


@dataclass(slots=True)
class _Seg:
    """What the journal knows of one segment (catalog entry in memory)."""

    no: int
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int
    records: int
    size: int
    sealed: bool
    file: File | None = None
    inline: list[Extent] = field(default_factory=list)
    checkpoints: list[tuple[int, int, str, str]] = field(default_factory=list)
    # Every record appended to a segment this process created, in order (a write's data is
    # its ``inline`` extent): sealing takes them from here instead of scanning and decoding
    # the file again. None for a segment found at open, which sealing reads back.
    recs: list[Record] | None = None


_SEAL_BATCH = 4096  # pieces per block-store call when sealing
_PREP_AHEAD = 2  # rolled segments prepared (hashed, compressed) ahead of the sealer
_Writes = list[tuple[WriteRecord, memoryview]]  # inline writes of a segment, with their data


@dataclass(frozen=True, slots=True)
class _SealPrep:
    """What sealing a segment computes before it writes anything (``_prepare_seal``)."""

    no: int
    first_seq: int
    recs: list[Record]
    spans: list[tuple[int, int]]  # per inline write: its slice of the pieces
    batches: list[list[memoryview]]  # the pieces, one list per block-store call
    prepared: list[Prepared] | None  # per batch, when hashed and compressed ahead


@dataclass(frozen=True, slots=True)
class TailCursor:
    """Where ``Journal.read_durable`` stopped: the frame of ``next_seq`` in a segment."""

    next_seq: int
    segment_no: int
    sealed: bool
    offset: int
    prev_checksum: int


@dataclass(frozen=True, slots=True)
class JournalStatus:
    window: Window
    volumes: dict[str, int]
    segments: int
    unsealed_segments: int
    segment_bytes: int
    pack_bytes: int
    index_bytes: int
    last_checkpoint: Checkpoint | None
    holds: tuple[Hold, ...]
    recovery: RecoveryReport
    history_short: bool
    alerts: tuple[str, ...]


class Journal:
    """Open with ``Journal.open(path)``; close with ``close()`` (which syncs)."""

    def __init__(self, path: str, storage: Storage, clock: Clock, opts: JournalOptions) -> None:
        self.path = path
        self.storage = storage
        self.clock = clock
        self.opts = opts
        self._append_lock = threading.RLock()
        self._map_lock = threading.RLock()
        self._maint_lock = threading.Lock()
        self._sync_cv = threading.Condition()
        self._syncing = False
        self._durable: tuple[int, int] = (0, 0)
        self._closed = False
        self._failed: StorageError | None = None
        self._tap: Tap | None = None
        self.uuid = b""
        self.volumes: dict[str, VolumeMap] = {}
        self.segs: list[_Seg] = []
        self._writer: SegmentWriter | None = None
        self._unsealed: deque[int] = deque()
        self._rolls: list[Future[None]] = []
        self._rolls_lock = threading.Lock()
        self._tail: tuple[int, int, SegmentWriter | None] = (0, 0, None)
        self._note_durable = -1  # a segment whose roll fsync is done, not yet noted
        self._roller = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-roll")
        self._prepper = ThreadPoolExecutor(
            max_workers=_PREP_AHEAD, thread_name_prefix="journal-prep"
        )
        self._preps: dict[int, Future[_SealPrep]] = {}  # next segments, read ahead
        self._ts = array("q")  # journal time of seq base_seq+1+i
        self.base_seq = 0
        self.base_ts = 0
        self.next_seq = 1
        self.last_ts = 0
        self.holds: dict[tuple[str, str], Hold] = {}
        self.history_short = False
        self.released_holds: list[Hold] = []
        self.recovery = RecoveryReport(0, 0)
        self._snaps: dict[str, Snapshot] = {}
        self._snap_maps: dict[str, dict[str, tuple[int, dict[int, BlockRef]]]] = {}
        self.index: Index
        self.store: BlockStore

    # ------------------------------------------------------------------ paths
    @property
    def seg_dir(self) -> str:
        return os.path.join(self.path, "segments")

    def _seg_path(self, no: int, sealed: bool) -> str:
        return os.path.join(self.seg_dir, f"{no:012d}.{'seg' if sealed else 'hot'}")

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str,
        *,
        storage: Storage | None = None,
        clock: Clock = wall_clock,
        options: JournalOptions | None = None,
    ) -> Journal:
        """Open (creating if needed) and recover: torn tail truncated, index reconciled."""
        j = cls(path, storage or OsStorage(), clock, options or JournalOptions())
        j._open()
        return j

    def _open(self) -> None:
        st = self.storage
        fresh = not st.exists(self.path)
        st.makedirs(self.path)
        st.makedirs(self.seg_dir)
        st.makedirs(os.path.join(self.path, "packs"))
        st.sync_dir(self.path)  # segments/ and packs/ must survive a power loss
        if fresh:
            st.sync_dir(os.path.dirname(os.path.abspath(self.path)))
        meta_path = os.path.join(self.path, "journal.meta")
        if not st.exists(meta_path) and (
            st.listdir(self.seg_dir) or st.listdir(os.path.join(self.path, "packs"))
        ):
            raise JournalError(
                f"{meta_path} is missing but {self.path} holds segments or packs",
                hint="restore journal.meta from a backup; a new identity would orphan them",
            )
        if st.exists(meta_path):
            meta = codec.unpack_obj(st.read_all(meta_path))
            if meta.get("format") != FORMAT_VERSION:
                raise JournalError(f"{meta_path}: unsupported journal format {meta.get('format')}")
            self.uuid = bytes(meta["uuid"])
            if meta.get("chunk_size", self.opts.chunk_size) != self.opts.chunk_size:
                self.opts = JournalOptions(
                    **{**_opts_dict(self.opts), "chunk_size": meta["chunk_size"]}
                )
        else:
            self.uuid = uuidlib.uuid4().bytes
            write_atomic(
                st,
                meta_path,
                codec.pack_obj(
                    {
                        "format": FORMAT_VERSION,
                        "uuid": self.uuid,
                        "chunk_size": self.opts.chunk_size,
                    }
                ),
            )
        index_path = os.path.join(self.path, "index.sqlite")
        rebuilt = False
        try:
            self.index = Index(index_path)
            ok = self.index.get_meta("uuid") in (None, self.uuid.hex())
            ok = ok and self.index.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except Exception:  # a damaged index is only a cache: drop it and rebuild
            ok = False
        if not ok:
            self._drop_index_files(index_path)
            self.index = Index(index_path)
            rebuilt = True
        if self.index.get_meta("uuid") is None:
            rebuilt = rebuilt or bool(self.index.segments()) or False
            self.index.set_meta("uuid", self.uuid.hex())
        self.store = BlockStore(
            os.path.join(self.path, "packs"),
            st,
            self.index,
            self.uuid,
            pack_target=self.opts.pack_target,
            workers=self.opts.hash_workers,
            zstd_level=self.opts.zstd_level,
        )
        pack_torn = self.store.recover()
        self._load_base()
        self._load_holds()
        self._load_snapshots()
        report = self._recover_segments()
        self.recovery = RecoveryReport(
            report.segments,
            report.records,
            report.truncated_segment,
            report.truncated_at,
            report.truncated_bytes,
            report.removed_unsealed_duplicates,
            rebuilt,
            pack_torn,
            self.next_seq - 1,
            tuple(sorted(self.store.damaged.items())),
        )

    def _drop_index_files(self, index_path: str) -> None:
        with contextlib.suppress(Exception):
            self.index.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(index_path + suffix):
                os.remove(index_path + suffix)

    def _load_base(self) -> None:
        p = os.path.join(self.path, "base.manifest")
        if not self.storage.exists(p):
            return
        m = codec.unpack_obj(self.storage.read_all(p))
        self.base_seq, self.base_ts = int(m["seq"]), int(m["ts"])
        self.last_ts = self.base_ts
        for name, v in m["volumes"].items():
            vm = VolumeMap(name, int(v["size"]), self.opts.chunk_size)
            vm.base = {
                int(c): BlockRef(BlockId(r[0]), r[1], r[2], r[3]) for c, r in v["chunks"].items()
            }
            self.volumes[name] = vm

    def _load_holds(self) -> None:
        p = os.path.join(self.path, "holds.msgpack")
        if self.storage.exists(p):
            for h in codec.unpack_obj(self.storage.read_all(p)):
                hold = Hold(h[0], h[1], Seq(h[2]), h[3])
                self.holds[(hold.kind, hold.name)] = hold

    def _recover_segments(self) -> RecoveryReport:
        """Apply the recovery rule (docs/design/journal-format.md) and load every segment.

        The journal ends at the first break: a torn frame, an unreadable hot segment header,
        or a seq gap after a hot segment. What lies beyond a break is dropped, but only if
        none of it was ever fsynced (``sync()`` waits for every earlier segment, so a synced
        frame after a break proves the break is damage to durable data: SegmentCorrupt).
        """
        st = self.storage
        found: dict[int, set[str]] = {}
        for n in st.listdir(self.seg_dir):
            stem, _, ext = n.partition(".")
            if ext in ("seg", "hot") and stem.isdigit():
                found.setdefault(int(stem), set()).add(ext)
            elif ext.endswith("tmp"):
                st.remove(os.path.join(self.seg_dir, n))  # an unfinished seal or write
        dup = 0
        for no, exts in found.items():
            if exts == {"seg", "hot"}:  # sealed copy is complete (renamed after fsync)
                st.remove(self._seg_path(no, False))
                found[no] = {"seg"}
                dup += 1
        if dup:
            st.sync_dir(self.seg_dir)
        numbers = sorted(found)
        indexed = {e.segment_no: e for e in self.index.segments()}
        truncated: tuple[str | None, int | None, int] = (None, None, 0)
        records = 0
        expected = self.base_seq + 1
        kept: list[int] = []
        dropped = 0
        for i, no in enumerate(numbers):
            sealed = "seg" in found[no]
            path = self._seg_path(no, sealed)
            name = os.path.relpath(path, self.path)
            f = st.open(path)
            try:
                res = scan(
                    f.pread(f.size(), 0),
                    name,
                    journal_uuid=self.uuid,
                    tail_allowed=not sealed,
                    segment_no=no,
                )
            except SegmentCorrupt as e:
                f.close()
                torn = isinstance(e, SegmentHeaderTorn)
                if sealed or not torn or not self._droppable(no, numbers[i + 1 :], found):
                    raise
                # a new segment whose header never reached the disk
                dropped += self._drop_segments(numbers[i:], found)
                truncated = (name, 0, 0)
                break
            rframes = [fr for fr in res.frames if not fr.meta]
            recs = [codec_decode(fr.payload, name, fr.offset, copy=False) for fr in rframes]
            if recs and recs[-1].seq <= self.base_seq:
                f.close()  # folded already; the crash came before its removal
                st.remove(path)
                continue
            if res.header.first_seq != expected:
                f.close()
                prev_hot = bool(kept) and "hot" in found[kept[-1]]
                # A whole segment gone: its name never reached the disk. The folder fsync for
                # a new segment runs on the roll thread, after appends to it have begun, and
                # a crash can keep a later name but not that one when none was fsynced.
                lost = no - 1 not in found and no - 1 > (kept[-1] if kept else 0)
                # the first missing one: a note vouching for any of them proves damage
                broken = (kept[-1] + 1 if kept else 0) if lost else kept[-1]
                if (
                    sealed
                    or not (prev_hot or lost)
                    or not self._droppable(broken, numbers[i:], found)
                ):
                    raise SegmentCorrupt(
                        name,
                        0,
                        f"first seq {res.header.first_seq}, expected {expected}: "
                        "a segment is missing",
                    )
                # the previous segment lost its unsynced tail at a frame boundary, or the
                # segment after it was lost whole
                dropped += self._drop_segments(numbers[i:], found)
                if not lost:
                    truncated = (
                        os.path.relpath(self._seg_path(kept[-1], False), self.path),
                        self.segs[-1].size,
                        0,
                    )
                else:  # the first missing segment
                    truncated = (
                        os.path.relpath(self._seg_path(broken or no - 1, False), self.path),
                        0,
                        0,
                    )
                break
            if res.torn_at is not None:
                later = numbers[i + 1 :]
                if not self._droppable(no, later, found):
                    f.close()
                    raise SegmentCorrupt(
                        name, res.torn_at, f"{res.torn_reason}; a later segment was synced after it"
                    )
                dropped += self._drop_segments(later, found)
                truncated = (name, res.torn_at, f.size() - res.torn_at)
                f.truncate(res.torn_at)
            seg = _Seg(
                no,
                res.header.first_seq,
                res.header.first_seq - 1,
                0,
                0,
                0,
                f.size(),
                sealed,
                None if sealed else f,
            )
            for fr, rec in zip(rframes, recs, strict=True):
                if rec.seq != expected:
                    raise SegmentCorrupt(name, fr.offset, f"seq {rec.seq}, expected {expected}")
                self._apply(rec, seg, fr.offset + 24 + len(fr.payload))
                expected += 1
            records += len(recs)
            if sealed:
                f.close()
            self.segs.append(seg)
            kept.append(no)
            if res.torn_at is not None:
                break
        # The names too: a process killed before its queued folder fsync leaves segments
        # whose names may not be on disk, and this process is about to vouch for them.
        if kept:
            st.sync_dir(self.seg_dir)
        for k, no in enumerate(kept):
            seg = self.segs[k]
            if k == len(kept) - 1 and not seg.sealed:
                assert seg.file is not None
                seg.file.sync()  # everything that survived is durable from here on
                res_last = scan(
                    seg.file.pread(seg.file.size(), 0),
                    self._seg_path(no, False),
                    journal_uuid=self.uuid,
                    tail_allowed=False,
                )
                self._writer = SegmentWriter(
                    seg.file,
                    res_last.header,
                    prev_checksum=res_last.last_checksum,
                    synced_upto=min(seg.file.size(), MAX_SEGMENT),
                )
                self._durable = (no, seg.file.size())
                self._publish(self._writer)
                continue
            if not seg.sealed:
                assert seg.file is not None
                seg.file.sync()
                self._unsealed.append(no)
            ent = _entry(seg)
            if indexed.get(no) != ent:
                self.index.put_segment(ent, seg.checkpoints)
        stale = [no for no in indexed if no not in kept]
        if stale:
            self.index.drop_segments(stale)
        self.next_seq = expected
        return RecoveryReport(
            len(self.segs), records, truncated[0], truncated[1], truncated[2] + dropped, dup
        )

    def _droppable(self, broken: int, later: list[int], found: dict[int, set[str]]) -> bool:
        """True when nothing after a break in segment ``broken`` ever reached an fsync.

        Evidence against: a later sealed segment, a later frame claiming ``synced_upto``,
        or a durability note ("segments up to N are durable", written once a roll fsync
        completes) with N >= ``broken``.
        """
        for n in later:
            if "seg" in found[n]:
                return False  # sealed only after its roll fsync, which followed ours
            try:
                buf = self.storage.read_all(self._seg_path(n, False))
                res = scan(buf, f"segments/{n:012d}.hot", journal_uuid=self.uuid, tail_allowed=True)
            except JournalError:
                continue
            if res.last_synced_claim > 0 or res.durable_segment_claim >= broken:
                return False
        return True

    def _drop_segments(self, numbers: list[int], found: dict[int, set[str]]) -> int:
        """Delete segments past a break; returns the bytes dropped (reported in status)."""
        total = 0
        for n in numbers:
            for ext in found[n]:
                p = self._seg_path(n, ext == "seg")
                f = self.storage.open(p)
                total += f.size()
                f.close()
                self.storage.remove(p)
        if numbers:
            self.storage.sync_dir(self.seg_dir)
        return total

    def _apply(self, rec: Record, seg: _Seg, payload_end: int) -> None:
        """Fold one record into the in-memory state (used by open and by append)."""
        if seg.records == 0:
            seg.first_ts = rec.ts
        seg.last_seq, seg.last_ts = rec.seq, rec.ts
        seg.records += 1
        if seg.recs is not None:
            seg.recs.append(rec)
        self._ts.append(rec.ts)
        self.last_ts = rec.ts
        if isinstance(rec, WriteRecord):
            vm = self._vol(rec.volume)
            if rec.data is not None:
                assert seg.file is not None
                # data starts after the msgpack header and bin prefix, at the payload's end
                ext = Extent(
                    rec.seq,
                    rec.offset,
                    rec.length,
                    Inline(seg.file, payload_end - rec.length),  # data ends the payload
                )
                seg.inline.append(ext)
            else:
                ext = Extent(rec.seq, rec.offset, rec.length, rec.refs)
            vm.add(ext)
        elif isinstance(rec, ZeroRecord):
            self._vol(rec.volume).add(Extent(rec.seq, rec.offset, rec.length, None))
        elif isinstance(rec, VolumeRecord):
            vm0 = self.volumes.get(rec.volume)
            if vm0 is None:
                self.volumes[rec.volume] = VolumeMap(rec.volume, rec.size, self.opts.chunk_size)
            else:
                vm0.size = rec.size
        else:
            seg.checkpoints.append((rec.seq, rec.ts, rec.name, str(rec.kind)))

    def _vol(self, name: str) -> VolumeMap:
        vm = self.volumes.get(name)
        if vm is None:
            raise NoSuchVolume(name)
        return vm

    # ------------------------------------------------------------------ append path
    def _stamp(self) -> tuple[int, int | None]:
        wall = self.clock()
        if wall >= self.last_ts:
            return wall, None
        return self.last_ts, wall  # the clock stepped back: keep order, record the wall time

    @property
    def unsealed_segments(self) -> int:
        """Rolled segments whose data is still inline (the background stage's backlog)."""
        return len(self._unsealed)

    @property
    def healthy(self) -> bool:
        """False once closed or stopped by a storage error (then reopen it)."""
        return not self._closed and self._failed is None

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosed("the journal is closed")
        if self._failed is not None:
            raise JournalClosed(f"the journal stopped after a storage error: {self._failed}")

    def _writer_for(self, nbytes: int) -> SegmentWriter:
        w = self._writer
        if w is not None and (w.size() + nbytes <= self.opts.segment_size or w.size() <= 56):
            return w
        if w is not None:
            self._roll(w)
        no = (self.segs[-1].no + 1) if self.segs else 1
        f = self.storage.open(self._seg_path(no, False), create=True)
        w = SegmentWriter.create(f, SegmentHeader(no, self.next_seq, self.uuid, False))
        # The new name must be durable before any sync() vouches for a record in it. A
        # folder fsync is an ext4 journal commit that can wait 100 ms behind writeback, so
        # it runs on the roll thread, queued like a roll (sync() waits for both), never
        # under the append lock on a capture source's thread.
        with self._rolls_lock:
            self._rolls.append(self._roller.submit(self._sync_seg_dir))
        self.segs.append(_Seg(no, self.next_seq, self.next_seq - 1, 0, 0, 0, 0, False, f, recs=[]))
        self._writer = w
        self._write_note(w)  # a roll that finished before this segment existed
        self._publish(w)
        return w

    def _roll(self, w: SegmentWriter) -> None:
        """Close the hot segment; its fsync runs on the roll thread, off the append path.

        A later ``sync()`` waits for it, so a completed sync still covers every segment, and
        the recovery rule (docs/design/journal-format.md) accepts a torn tail in a rolled
        segment only when nothing after it was ever synced.
        """
        seg = self.segs[-1]
        seg.size = w.size()
        with self._rolls_lock:
            self._rolls.append(self._roller.submit(self._finish_roll, w, seg))
        self._writer = None
        self._publish(None)

    def _sync_seg_dir(self) -> None:
        try:
            self.storage.sync_dir(self.seg_dir)
        except OSError as e:
            self._failed = StorageError("fsync", self.seg_dir, e)
            raise self._failed from e

    def _finish_roll(self, w: SegmentWriter, seg: _Seg) -> None:
        try:
            end = w.sync()
        except OSError as e:
            self._failed = StorageError("fdatasync", w.file.path, e)
            raise self._failed from e
        with self._sync_cv:
            self._durable = max(self._durable, (seg.no, end))
        self.index.put_segment(_entry(seg), seg.checkpoints)
        with self._append_lock:
            # Vouch for this segment in the newer one: after a crash, a break in it is then
            # known to be damage to durable data, never a torn tail to drop.
            self._note_durable = max(self._note_durable, seg.no)
            cur = self._writer
            if cur is not None and cur.header.segment_no > seg.no:
                self._write_note(cur)
            self._unsealed.append(seg.no)

    def _write_note(self, w: SegmentWriter) -> None:
        """Append the pending durability note to ``w`` (caller holds the append lock)."""
        if self._note_durable < 0 or self._failed is not None:
            return
        try:
            w.append_note(durable_note(self._note_durable))
        except OSError as e:
            self._failed = StorageError("append to", w.file.path, e)
            raise self._failed from e
        self._note_durable = -1
        self.segs[-1].size = w.size()
        if w is self._writer:
            self._publish(w)

    def _wait_rolls(self, rolls: list[Future[None]]) -> None:
        for f in rolls:
            f.result()  # re-raises the StorageError of a failed roll fsync
        with self._rolls_lock:
            self._rolls = [f for f in self._rolls if not f.done() or f.exception()]

    def _publish(self, w: SegmentWriter | None) -> None:
        """Make the append tail visible to sync() (one atomic tuple assignment)."""
        self._tail = (self.segs[-1].no, w.size(), w) if w is not None else (0, 0, None)

    def _do_append(self, build: _Builder) -> Seq:
        with self._append_lock:
            self._check_open()
            seq = self.next_seq
            ts, wall = self._stamp()
            rec, parts = build(Seq(seq), ts, wall)
            self._append_one(rec, parts)
            return Seq(seq)

    def add_volume(self, volume: str, size: int) -> Seq:
        """Declare a volume (or its new size); writes to unknown volumes are refused."""
        if not volume or len(volume.encode()) > 255:
            raise ValueError("volume names are 1..255 bytes")
        if size <= 0:
            raise ValueError("volume size must be positive")
        return self._do_append(lambda s, ts, w: _single(VolumeRecord(s, ts, volume, size, w)))

    def write(self, volume: str, offset: int, data: bytes | memoryview) -> Seq:
        """Append a write with its data inline; returns once handed to the OS (not durable)."""
        return self.write_many(volume, [(offset, data, len(data), False)])

    def zero(self, volume: str, offset: int, length: int, *, trim: bool = False) -> Seq:
        """Append a zero (or trim) record: the range reads as zeros from this seq on."""
        return self.write_many(volume, [(offset, None, length, trim)])

    def write_many(self, volume: str, ops: Sequence[WriteOp]) -> Seq:
        """Append a batch of writes and zeroes of one volume, in order, with one writev.

        ``ops`` are ``(offset, data, length, trim)``: ``data`` None means zero ``length``
        bytes (trim says the guest discarded them). All are checked before any is appended,
        so a bad op appends nothing. Returns the last seq; not durable until ``sync()``.
        """
        vm = self._vol(volume)
        for off, data, length, _ in ops:
            n = len(data) if data is not None else length
            if n <= 0 or off < 0 or off + n > vm.size:
                raise ValueError(f"op [{off}, {off + n}) outside volume {volume!r}")
        if not ops:
            return Seq(self.next_seq - 1)
        with self._append_lock:
            self._check_open()
            seq0 = self.next_seq
            ts, wall = self._stamp()
            recs: list[Record] = []
            payloads: list[list[bytes | memoryview]] = []
            ends: list[int] = []  # payload lengths
            total = 0
            header = codec.encode_write_header
            for k, (off, data, length, trim) in enumerate(ops):
                s = seq0 + k  # a Seq (NewType is only for the type checker)
                if data is None:
                    rec: Record = ZeroRecord(Seq(s), ts, volume, off, length, trim, wall)
                    body = codec.encode(rec)
                    payloads.append([body])
                    end = len(body)
                else:
                    n = len(data)
                    head = header(s, ts, wall, volume, off, n)
                    payloads.append([head, data])
                    rec = new_write(Seq(s), ts, volume, off, n, b"", (), wall)
                    end = len(head) + n
                recs.append(rec)
                ends.append(end)
                total += end + 24
            w = self._writer
            if w is None or w.size() + total > self.opts.segment_size:
                for rec, parts in zip(recs, payloads, strict=True):
                    self._append_one(rec, parts)
                self._tap_out(recs, ops)
                return Seq(self.next_seq - 1)
            try:
                offsets = w.append_many(payloads, ends)
            except OSError as e:
                self._failed = StorageError("append to", self.seg_dir, e)
                raise self._failed from e
            self.next_seq = seq0 + len(ops)
            seg = self.segs[-1]
            seg.size = w.size()
            self._publish(w)
            with self._map_lock:
                for rec, poff, plen in zip(recs, offsets, ends, strict=True):
                    self._apply(rec, seg, poff + plen)
            self._tap_out(recs, ops)
            return Seq(self.next_seq - 1)

    def set_tap(self, tap: Tap | None) -> None:
        """Hand every write and zero that ``write_many`` appends to ``tap``, in seq order
        (under the append lock), appended but not yet durable.

        For a reader that follows writes as they happen (the corruption detector): reading
        them back with ``read_durable`` decodes every frame again, which costs as much CPU
        as the capture itself for small writes. ``tap(records, ops)`` gets the records
        (a write's ``data`` is empty: its bytes are the matching op's, the caller's buffer,
        valid only during the call) so that it copies each write once, into its own buffer,
        with no object per record. ``tap`` must be quick and must not call back into the
        journal.
        """
        self._tap = tap

    def _tap_out(self, recs: list[Record], ops: Sequence[WriteOp]) -> None:
        tap = self._tap
        if tap is not None:
            tap(recs, ops)

    def _append_one(self, rec: Record, parts: list[bytes | memoryview]) -> None:
        """One already-built record (the caller holds the append lock and set its seq)."""
        nbytes = sum(len(p) for p in parts)
        try:
            w = self._writer_for(nbytes + 24)
            _, payload_off = w.append(parts)
        except OSError as e:
            self._failed = StorageError("append to", self.seg_dir, e)
            raise self._failed from e
        self.next_seq = rec.seq + 1
        seg = self.segs[-1]
        seg.size = w.size()
        self._publish(w)
        with self._map_lock:
            self._apply(rec, seg, payload_off + nbytes)

    def checkpoint(self, name: str, kind: CheckpointKind = CheckpointKind.CRASH) -> Seq:
        if not name or len(name) > 200:
            raise ValueError("checkpoint names are 1..200 characters")
        return self._do_append(
            lambda s, ts, w: _single(CheckpointRecord(s, ts, name, CheckpointKind(kind), w))
        )

    def sync(self) -> None:
        """Return once every record appended before this call is on stable storage.

        Group commit: callers that arrive while an fdatasync runs wait for the next one and
        share it, so N concurrent syncs cost about two fsyncs, not N.
        """
        # No append lock here: the appender holds it across writev, and Python locks are not
        # fair, so a busy appender would starve the syncer. The tail is published atomically
        # after every append; it is read before the roll list, and a roll queues its fsync
        # before it publishes the new tail, so no segment is missed.
        self._check_open()
        no, size, w = self._tail
        rolls = list(self._rolls)
        self._wait_rolls(rolls)
        if w is None:
            return
        target = (no, size)
        with self._sync_cv:
            while self._durable < target:
                self._check_open()  # after a failed fsync, never retry it (fsyncgate)
                if not self._syncing:
                    self._syncing = True
                    break
                self._sync_cv.wait()
            else:
                return
        done = self._durable
        ok = False
        try:
            no, size, w = self._tail
            rolls = list(self._rolls)
            done = target if w is None else (no, size)
            self._wait_rolls(rolls)  # the target segment may have rolled meanwhile
            if w is not None:
                try:
                    w.file.sync()
                except OSError as e:
                    self._failed = StorageError("fdatasync", w.file.path, e)
                    raise self._failed from e
                w.synced_upto = min(done[1], MAX_SEGMENT)
            ok = True
        finally:
            with self._sync_cv:
                if ok:  # only a successful fsync moves the durable mark
                    self._durable = max(self._durable, done)
                self._syncing = False
                self._sync_cv.notify_all()

    # ------------------------------------------------------------------ reading
    def window(self) -> Window:
        with self._append_lock:
            last = self.next_seq - 1
            return Window(Seq(self.base_seq), Seq(last), self.base_ts, self.last_ts)

    def _check_point(self, seq: int) -> None:
        w = self.window()
        if not w.first_seq <= seq <= w.last_seq:
            raise PointNotRetained(f"seq {seq}", w.first_seq, w.last_seq, w.first_ts, w.last_ts)

    def read(self, volume: str, offset: int, length: int, at: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of a volume as of seq ``at`` (default: latest)."""
        out = bytearray(length)
        self.read_into(volume, offset, memoryview(out), at)
        return bytes(out)

    def read_into(
        self,
        volume: str,
        offset: int,
        out: memoryview,
        at: int | None = None,
        cache: BlockCache | None = None,
    ) -> None:
        """Like read() into a zeroed buffer; pass one ``cache`` across sequential reads."""
        at = self.next_seq - 1 if at is None else at
        self._check_point(at)
        with self._map_lock:
            if at < self.base_seq:  # folded between the check and the lock
                self._check_point(at)
            vm = self._vol(volume)
            if offset < 0 or offset + len(out) > vm.size:
                raise ValueError(
                    f"read [{offset}, {offset + len(out)}) outside volume "
                    f"{volume!r} of {vm.size} bytes"
                )
            vm.read_into(out, offset, at, cache or self.new_cache())

    def holds_data(self, volume: str, offset: int, length: int, at: int) -> bool:
        """False when [offset, offset+length) surely reads as zeros as of seq ``at``: no
        write and no base block touches it. For readers that only need to know what a
        range held (the detector's first look at a block), without reading it.
        """
        self._check_point(at)
        with self._map_lock:
            if at < self.base_seq:  # folded between the check and the lock
                self._check_point(at)
            return self._vol(volume).holds_data(offset, length, at)

    def written_blocks(self, volume: str, offset: int, length: int, at: int, block: int) -> bytes:
        """``holds_data`` of each ``block`` bytes of [offset, offset+length) as of seq
        ``at``, one byte each (1: may hold data; 0: surely reads as zeros); ``offset`` and
        ``length`` are multiples of ``block``.
        """
        if block <= 0 or offset % block or length % block or offset < 0 or length < 0:
            raise ValueError(f"range [{offset}, +{length}) is not in whole {block}-byte blocks")
        self._check_point(at)
        with self._map_lock:
            if at < self.base_seq:  # folded between the check and the lock
                self._check_point(at)
            return bytes(self._vol(volume).written_blocks(offset, length, at, block))

    def volume_size(self, volume: str) -> int:
        """The volume's current size (a resize is a volume record; history keeps old reads)."""
        return self._vol(volume).size

    def new_cache(self) -> BlockCache:
        return BlockCache(
            self.store.get, fetch_many=self.store.get_many, fetch_into=self.store.copy_whole
        )

    def seq_at_time(self, t_ns: int) -> Seq:
        """The last seq whose journal time is <= t (journal time never runs backwards)."""
        with self._append_lock:
            i = bisect_right(self._ts, t_ns)
            if t_ns < self.base_ts or (i == 0 and self.base_seq == 0):
                w = self.window()
                raise PointNotRetained(
                    f"time {t_ns}", w.first_seq, w.last_seq, w.first_ts, w.last_ts
                )
            return Seq(self.base_seq + i)

    def checkpoints(self) -> list[Checkpoint]:
        with self._append_lock:
            out = []
            for s in self.segs:
                out += [
                    Checkpoint(Seq(c[0]), c[1], c[2], CheckpointKind(c[3])) for c in s.checkpoints
                ]
            return out

    def find_checkpoint(self, name: str) -> Checkpoint | None:
        found = [c for c in self.checkpoints() if c.name == name]
        return found[-1] if found else None

    def records(self, start: int = 1) -> Iterator[Record]:
        """Every retained record with seq >= start, in seq order, read back from segments."""
        with self._append_lock:
            segs = [(s.no, s.sealed, s.last_seq) for s in self.segs if s.last_seq >= start]
            wr = self._writer
            limit = self.next_seq
        for no, sealed, _ in segs:
            path = self._seg_path(no, sealed)
            try:
                buf = self.storage.read_all(path)
            except FileNotFoundError:  # sealed meanwhile
                buf = self.storage.read_all(self._seg_path(no, True))
            name = os.path.relpath(path, self.path)
            res = scan(buf, name, journal_uuid=self.uuid, tail_allowed=wr is not None)
            for fr in res.frames:
                if fr.meta:
                    continue
                rec = codec_decode(fr.payload, name, fr.offset)
                if start <= rec.seq < limit:
                    yield rec

    # ------------------------------------------------------------------ replication
    def read_durable(
        self,
        start: int,
        *,
        max_bytes: int = 8 << 20,
        max_records: int = 20_000,
        cursor: TailCursor | None = None,
        sync: bool = True,
    ) -> tuple[list[Record], TailCursor | None]:
        """Records from seq ``start`` on that are on stable storage, for a replica sender.

        Only durable records are shipped: a replica holding a record the primary could still
        lose to a power cut would diverge from it. The call syncs (sharing the fsync with
        capture's group commit) and reads up to what was appended before it. Pass back the
        returned cursor to continue where the last call ended without rescanning a segment.
        Write records carry their data inline (hot) or as block refs (sealed).
        Raises PointNotRetained when ``start`` was folded away (the replica must resync).
        ``sync=False`` reads what was handed to the OS without waiting for it to be durable
        (for local consumers such as the corruption detector, never for a replica).
        """
        self._check_open()
        no_t, size_t, w_t = self._tail
        if sync:
            self.sync()
            # what fsyncs have covered: whole segments before ``end_no``, ``end_size`` of it
            end_no, end_size = self._durable
        elif w_t is not None:
            end_no, end_size = no_t, size_t  # handed to the OS: complete frames up to here
        else:
            end_no, end_size = 1 << 62, 0
        out: list[Record] = []
        nbytes = 0
        while len(out) < max_records and nbytes < max_bytes:
            with self._append_lock:
                if start <= self.base_seq:
                    w = self.window()
                    raise PointNotRetained(
                        f"seq {start}", w.first_seq, w.last_seq, w.first_ts, w.last_ts
                    )
                seg = next((s for s in self.segs if s.first_seq <= start <= s.last_seq), None)
                if seg is None:
                    break
                no, sealed, last_seq = seg.no, seg.sealed, seg.last_seq
            if no > end_no:
                break  # not covered by any fsync yet: a power cut could still take it
            limit = end_size if no == end_no and not sealed else None
            recs, cursor = self._read_segment(
                no, sealed, start, limit, max_bytes - nbytes, max_records - len(out), cursor
            )
            if not recs:
                break
            for r in recs:
                nbytes += (r.length if isinstance(r, WriteRecord) else 0) + 64
            out += recs
            start = recs[-1].seq + 1
            if start <= last_seq and limit is not None:
                continue  # more of the tail segment, still within what was durable
        return out, cursor

    def _read_segment(
        self,
        no: int,
        sealed: bool,
        start: int,
        limit: int | None,
        max_bytes: int,
        max_records: int,
        cursor: TailCursor | None,
    ) -> tuple[list[Record], TailCursor | None]:
        """Records >= start of one segment; from the cursor's offset when it is still valid."""
        path = self._seg_path(no, sealed)
        try:
            f = self.storage.open(path)
        except FileNotFoundError:
            if sealed:
                raise
            path = self._seg_path(no, True)  # sealed meanwhile: offsets changed, full scan
            f = self.storage.open(path)
            sealed, limit = True, None
        name = os.path.relpath(path, self.path)
        recs: list[Record] = []
        try:
            end = f.size() if limit is None else min(limit, f.size())
            seed = segment_seed(self.uuid, no)
            if (
                cursor is not None
                and cursor.segment_no == no
                and cursor.sealed == sealed
                and cursor.next_seq == start
            ):
                pos, prev = cursor.offset, cursor.prev_checksum
            else:
                hdr = decode_header(f.pread(HEADER_SIZE, 0), name)
                pos, prev = HEADER_SIZE, hdr.checksum
            step = max(max_bytes, 1 << 20) + (1 << 20)
            while not recs and pos < end:
                want = min(end - pos, step)
                buf = f.pread(want, pos)
                frames = read_frames(buf, pos, seed, prev, name)
                if not frames:  # one frame larger than the window: read it whole
                    if len(buf) < FRAME_SIZE:
                        break
                    length = int.from_bytes(buf[0:4], "little") & ~FLAG_META
                    buf = f.pread(min(end - pos, FRAME_SIZE + length), pos)
                    frames = read_frames(buf, pos, seed, prev, name)
                    if not frames:
                        break
                for off, payload, meta, csum in frames:
                    if len(recs) >= max_records:
                        break
                    if not meta:
                        rec = codec_decode(payload, name, off)
                        if rec.seq >= start:
                            recs.append(rec)
                    pos, prev = off + FRAME_SIZE + len(payload), csum
        finally:
            f.close()
        nxt = recs[-1].seq + 1 if recs else start
        return recs, TailCursor(nxt, no, sealed, pos, prev)

    def ts_of(self, seq: int) -> int:
        """The journal time of a retained seq (of the base, for the window's first seq)."""
        with self._append_lock:
            if seq == self.base_seq:
                return self.base_ts
            i = seq - self.base_seq - 1
            if 0 <= i < len(self._ts):
                return int(self._ts[i])
        w = self.window()
        raise PointNotRetained(f"seq {seq}", w.first_seq, w.last_seq, w.first_ts, w.last_ts)

    def bytes_after(self, seq: int) -> int:
        """About how many segment bytes hold records after ``seq`` (a replica's backlog)."""
        total = 0
        with self._append_lock:
            for s in self.segs:
                if s.first_seq > seq:
                    total += s.size
                elif s.last_seq > seq and s.records:
                    total += s.size * (s.last_seq - seq) // max(1, s.records)
        return total

    def base_state(self) -> tuple[Seq, int, dict[str, tuple[int, dict[int, BlockRef]]]]:
        """The folded base: its seq, time and each volume's size and chunk -> block map."""
        with self._map_lock:
            return (
                Seq(self.base_seq),
                self.base_ts,
                {n: (vm.size, dict(vm.base)) for n, vm in self.volumes.items()},
            )

    def locate_blocks(self, ids: Sequence[bytes]) -> set[bytes]:
        """Which of ``ids`` this journal's block store holds (for dedup negotiation)."""
        return set(self.store.locate_many(list(ids)))

    def get_blocks(self, refs: Sequence[BlockRef]) -> dict[bytes, bytes]:
        return self.store.get_many(list(refs))

    def append_replicated(
        self, recs: Sequence[Record], blocks: Mapping[bytes, bytes | memoryview]
    ) -> Seq:
        """Append records made by another journal (the primary), keeping their seq and ts.

        Writes carry block refs (id, length) only, split at this journal's chunk bounds; the
        data of each is in ``blocks`` or already in this store (BlocksNeeded otherwise).
        Every record is checked before anything is written, so a refused batch changes
        nothing: OutOfOrder for a seq that is not next, ValueError for anything malformed
        (unknown volume, range outside it, journal time running backwards, a block whose
        bytes do not hash to its id). Returns the last seq; durable after ``sync()``.
        """
        if not recs:
            return Seq(self.next_seq - 1)
        cs = self.opts.chunk_size
        with self._maint_lock:  # retention cannot collect a block between check and append
            with self._append_lock:
                self._check_open()
                expected, last_ts = self.next_seq, self.last_ts
                sizes = {n: v.size for n, v in self.volumes.items()}
            needed: dict[bytes, int] = {}
            for k, rec in enumerate(recs):
                if rec.seq != expected + k:
                    if k == 0:
                        raise OutOfOrder(rec.seq, expected)
                    raise ValueError(f"record {k} has seq {rec.seq}, expected {expected + k}")
                if rec.ts < last_ts:
                    raise ValueError(f"seq {rec.seq}: journal time runs backwards")
                last_ts = rec.ts
                if isinstance(rec, VolumeRecord):
                    if not rec.volume or len(rec.volume.encode()) > 255 or rec.size <= 0:
                        raise ValueError(f"seq {rec.seq}: bad volume record")
                    sizes[rec.volume] = rec.size
                elif isinstance(rec, CheckpointRecord):
                    if not rec.name or len(rec.name) > 200:
                        raise ValueError(f"seq {rec.seq}: bad checkpoint name")
                else:
                    size = sizes.get(rec.volume)
                    if size is None:
                        raise ValueError(f"seq {rec.seq}: unknown volume {rec.volume!r}")
                    if rec.length <= 0 or rec.offset < 0 or rec.offset + rec.length > size:
                        raise ValueError(f"seq {rec.seq}: range outside volume {rec.volume!r}")
                    if isinstance(rec, WriteRecord):
                        if rec.data is not None:
                            raise ValueError(f"seq {rec.seq}: replicated writes carry refs")
                        pos, end = rec.offset, rec.offset + rec.length
                        for r in rec.refs:
                            piece = min((pos // cs + 1) * cs, end) - pos
                            if r.length != piece or len(r.block_id) != 32:
                                raise ValueError(
                                    f"seq {rec.seq}: block refs not split at {cs}-byte chunks"
                                )
                            if needed.setdefault(r.block_id, r.length) != r.length:
                                raise ValueError(
                                    f"seq {rec.seq}: block {r.block_id.hex()[:16]} is named "
                                    "with two lengths"
                                )
                            pos += piece
                        if pos != end:
                            raise ValueError(f"seq {rec.seq}: block refs do not cover the write")
            for b, data in blocks.items():
                if len(data) > MAX_BLOCK:
                    raise ValueError("a block exceeds the size limit")
                if block_id(data) != b:
                    raise ValueError(f"block {b.hex()[:16]}: data does not match its id")
            held = self.store.locate_many(list(needed))
            missing = [b for b in needed if b not in held and b not in blocks]
            if missing:
                raise BlocksNeeded(missing)
            for b, n in needed.items():
                got = held[b][2] if b in held else len(blocks[b])
                if got != n:
                    raise ValueError(f"block {b.hex()[:16]}: length {n} in refs, {got} stored")
            have = {b: (p, o) for b, (p, o, _) in held.items()}
            new = [b for b in needed if b not in have]
            try:
                if new:
                    for ref in self.store.put_many([blocks[b] for b in new]):
                        have[ref.block_id] = (ref.pack, ref.pack_offset)
                self.store.flush()  # blocks durable before any record names them
            except OSError as e:
                self._failed = StorageError("replicate into", self.store.folder, e)
                raise self._failed from e
            with self._append_lock:
                self._check_open()
                if self.next_seq != expected:
                    raise OutOfOrder(recs[0].seq, self.next_seq)
                for rec in recs:
                    if isinstance(rec, WriteRecord):
                        rec = WriteRecord(
                            rec.seq,
                            rec.ts,
                            rec.volume,
                            rec.offset,
                            rec.length,
                            None,
                            tuple(
                                BlockRef(r.block_id, r.length, *have[r.block_id]) for r in rec.refs
                            ),
                            rec.wall,
                        )
                    self._append_one(rec, [codec.encode(rec)])
                return Seq(self.next_seq - 1)

    def install_base(
        self, seq: int, ts: int, volumes: Mapping[str, tuple[int, Mapping[int, bytes]]]
    ) -> None:
        """Start an empty journal at ``seq``: each volume's content there, chunk -> block id.

        For a replica whose primary already folded its oldest history: the DR site starts
        from the primary's base instead of seq 1. Every block must already be in the store.
        """
        cs = self.opts.chunk_size
        with self._maint_lock, self._append_lock:
            self._check_open()
            if self.next_seq != 1 or self.segs or self.volumes or self.base_seq:
                raise ValueError("install_base needs an empty journal")
            if seq < 1:
                raise ValueError("base seq must be positive")
            ids = [b for _, chunks in volumes.values() for b in chunks.values()]
            have = self.store.locate_many(ids)
            missing = [b for b in ids if b not in have]
            if missing:
                raise BlocksNeeded(missing)
            maps: dict[str, VolumeMap] = {}
            for name, (size, chunks) in volumes.items():
                if not name or len(name.encode()) > 255 or size <= 0:
                    raise ValueError(f"bad base volume {name!r}")
                vm = VolumeMap(name, size, cs)
                for c, b in chunks.items():
                    n = min(cs, size - c * cs)
                    if c < 0 or n <= 0:
                        raise ValueError(f"base chunk {c} outside volume {name!r}")
                    pack, off, raw = have[b]
                    if raw != n:
                        raise ValueError(f"base chunk {c} of {name!r}: block of {raw} bytes")
                    vm.base[c] = BlockRef(BlockId(b), n, pack, off)
                maps[name] = vm
            write_atomic(
                self.storage,
                os.path.join(self.path, "base.manifest"),
                codec.pack_obj(
                    {
                        "seq": seq,
                        "ts": ts,
                        "volumes": {
                            name: {
                                "size": vm.size,
                                "chunks": {
                                    c: [r.block_id, r.length, r.pack, r.pack_offset]
                                    for c, r in vm.base.items()
                                },
                            }
                            for name, vm in maps.items()
                        },
                    }
                ),
            )
            self.volumes = maps
            self.base_seq, self.base_ts, self.last_ts = seq, ts, ts
            self.next_seq = seq + 1

    def write_rate(
        self, since_ns: int, bucket_ns: int, volume: str | None = None
    ) -> list[tuple[int, int, int]]:
        """(bucket start, writes, bytes) per ``bucket_ns`` of journal time since ``since_ns``.

        From the version maps: the cost follows the history kept, not the volume size.
        Zeroes and trims count as writes of their length.
        """
        with self._append_lock:
            base, ts = self.base_seq, self._ts[:]
        out: dict[int, list[int]] = {}
        with self._map_lock:
            maps = [self._vol(volume)] if volume else list(self.volumes.values())
            exts = [(e.seq, e.length) for vm in maps for e in vm.extents()]
        for seq, length in exts:
            i = seq - base - 1
            if not 0 <= i < len(ts) or ts[i] < since_ns:
                continue
            b = ts[i] - (ts[i] - since_ns) % bucket_ns
            cell = out.setdefault(b, [0, 0])
            cell[0] += 1
            cell[1] += length
        return [(b, c[0], c[1]) for b, c in sorted(out.items())]

    def changed_since(self, volume: str, seq: int) -> list[int]:
        """Chunks of ``volume`` written after ``seq`` (what a rollback to it must rewrite).

        From the version maps: the cost follows the history kept, never the volume size.
        """
        self._check_point(seq)
        with self._map_lock:
            vm = self._vol(volume)
            return sorted(c for c, lst in vm.chunks.items() if lst and lst[-1].seq > seq)

    def changed_since_snapshot(self, name: str, volume: str) -> list[int]:
        """Chunks of ``volume`` that may differ between snapshot ``name`` and latest."""
        s = self.find_snapshot(name)
        if not s.materialized:
            return self.changed_since(volume, s.seq)
        _, chunks = self._snap_maps[name].get(volume, (0, {}))
        with self._map_lock:
            vm = self._vol(volume)
            out = {c for c, lst in vm.chunks.items() if lst}
            for c in set(vm.base) | set(chunks):
                a, b = vm.base.get(c), chunks.get(c)
                if (a.block_id if a else None) != (b.block_id if b else None):
                    out.add(c)
        return sorted(out)

    # ------------------------------------------------------------------ snapshots
    @property
    def _snap_dir(self) -> str:
        return os.path.join(self.path, "snapshots")

    def _load_snapshots(self) -> None:
        p = os.path.join(self.path, "snapshots.msgpack")
        if not self.storage.exists(p):
            return
        for d in codec.unpack_obj(self.storage.read_all(p)):
            s = Snapshot(
                d["name"], Seq(d["seq"]), d["ts"], d["created"], d["locked_until"], d["kind"],
                d["materialized"],
            )  # fmt: skip
            self._snaps[s.name] = s
            if s.materialized:
                m = codec.unpack_obj(self.storage.read_all(self._snap_path(s.name)))
                self._snap_maps[s.name] = {
                    name: (
                        int(v["size"]),
                        {
                            int(c): BlockRef(BlockId(r[0]), r[1], r[2], r[3])
                            for c, r in v["chunks"].items()
                        },
                    )
                    for name, v in m["volumes"].items()
                }

    def _snap_path(self, name: str) -> str:
        return os.path.join(self._snap_dir, f"{name}.manifest")

    def _save_snapshots(self) -> None:
        write_atomic(
            self.storage,
            os.path.join(self.path, "snapshots.msgpack"),
            codec.pack_obj(
                [
                    {
                        "name": s.name,
                        "seq": s.seq,
                        "ts": s.ts,
                        "created": s.created_ts,
                        "locked_until": s.locked_until,
                        "kind": s.kind,
                        "materialized": s.materialized,
                    }
                    for s in self._snaps.values()
                ]
            ),
        )

    def create_snapshot(
        self, name: str, seq: int | None = None, *, kind: str = "manual", locked_until: int = 0
    ) -> Snapshot:
        """Keep the point ``seq`` (default: latest) beyond the journal window."""
        if not _SNAP_NAME.fullmatch(name):
            raise ValueError("snapshot names are 1-64 letters, digits, '.', '_' or '-'")
        if not 0 <= locked_until < 1 << 63:
            raise ValueError("a lock ends at a time in ns below 2**63")
        with self._maint_lock:
            self._check_open()
            if name in self._snaps:
                raise ValueError(f"a snapshot named {name!r} exists")
            at = self.window().last_seq if seq is None else seq
            self._check_point(at)
            s = Snapshot(name, Seq(at), self.ts_of(at), self.clock(), locked_until, kind)
            self._snaps[name] = s
            try:
                self._save_snapshots()
            except BaseException:
                del self._snaps[name]
                raise
            return s

    def snapshots(self) -> list[Snapshot]:
        return sorted(list(self._snaps.values()), key=lambda s: (s.seq, s.created_ts))

    def find_snapshot(self, name: str) -> Snapshot:
        s = self._snaps.get(name)
        if s is None:
            raise NoSuchSnapshot(name)
        return s

    def lock_snapshot(self, name: str, until_ns: int) -> Snapshot:
        """Lock until ``until_ns``; a lock is only ever extended, never shortened."""
        if not 0 <= until_ns < 1 << 63:
            raise ValueError("a lock ends at a time in ns below 2**63")
        with self._maint_lock:
            s = self.find_snapshot(name)
            if until_ns > s.locked_until:
                old, s = s, replace(s, locked_until=until_ns)
                self._snaps[name] = s
                try:
                    self._save_snapshots()
                except BaseException:
                    self._snaps[name] = old  # memory never claims what the disk does not
                    raise
            return s

    def delete_snapshot(self, name: str, *, now_ns: int | None = None) -> None:
        """Forget a snapshot (its blocks go at the next collection). Refused while locked."""
        # a caller may bring its own time (a plan's), but never one past the journal's clock:
        # no path can bring a lock's end closer
        now = self.clock() if now_ns is None else min(now_ns, self.clock())
        with self._maint_lock:
            s = self.find_snapshot(name)
            if s.locked_until > now:
                raise SnapshotLocked(name, s.locked_until)
            del self._snaps[name]
            self._snap_maps.pop(name, None)
            self._save_snapshots()
            if s.materialized:
                self.storage.remove(self._snap_path(name))
                self.storage.sync_dir(self._snap_dir)

    def snapshot_point(self, name: str) -> tuple[int, bool]:
        """(seq, in_window): a snapshot inside the window reads through the journal."""
        s = self.find_snapshot(name)
        return int(s.seq), not s.materialized

    def read_snapshot_into(
        self, name: str, volume: str, offset: int, out: memoryview, cache: BlockCache | None = None
    ) -> None:
        """Bytes of ``volume`` as of snapshot ``name`` (zeroed buffer, like read_into)."""
        s = self.find_snapshot(name)
        if not s.materialized:
            self.read_into(volume, offset, out, s.seq, cache)
            return
        vols = self._snap_maps[name]
        if volume not in vols:
            raise NoSuchVolume(volume)
        size, chunks = vols[volume]
        if offset < 0 or offset + len(out) > size:
            raise ValueError(f"read [{offset}, {offset + len(out)}) outside volume {volume!r}")
        vm = VolumeMap(volume, size, self.opts.chunk_size)
        vm.base = chunks
        vm.read_into(out, offset, 0, cache or self.new_cache())

    def snapshot_volume_size(self, name: str, volume: str) -> int:
        s = self.find_snapshot(name)
        if s.materialized:
            if volume not in self._snap_maps[name]:
                raise NoSuchVolume(volume)
            return self._snap_maps[name][volume][0]
        return self.volume_size(volume)

    def _materialize(self, s: Snapshot) -> None:
        """Write down the content at ``s.seq`` as a manifest before folding passes it.

        Chunks no version touched since the base keep the base's block; the others are
        read at the snapshot's seq and stored (deduplicated: usually no new data).
        """
        cs = self.opts.chunk_size
        vols: dict[str, tuple[int, dict[int, BlockRef]]] = {}
        with self._map_lock:
            maps = list(self.volumes.values())
        for vm in maps:
            with self._map_lock:
                touched = sorted(c for c, lst in vm.chunks.items() if lst and lst[0].seq <= s.seq)
                chunks = dict(vm.base)
            cache = self.new_cache()
            for c in touched:
                n = min(cs, vm.size - c * cs)
                if n <= 0:
                    chunks.pop(c, None)
                    continue
                buf = bytearray(n)
                with self._map_lock:
                    vm.read_into(memoryview(buf), c * cs, s.seq, cache)
                if any(buf):
                    chunks[c] = self.store.put_many([bytes(buf)])[0]
                else:
                    chunks.pop(c, None)
            vols[vm.name] = (vm.size, chunks)
        self.store.flush()
        self.storage.makedirs(self._snap_dir)
        write_atomic(
            self.storage,
            self._snap_path(s.name),
            codec.pack_obj(
                {
                    "seq": s.seq,
                    "volumes": {
                        name: {
                            "size": size,
                            "chunks": {
                                c: [r.block_id, r.length, r.pack, r.pack_offset]
                                for c, r in chunks.items()
                            },
                        }
                        for name, (size, chunks) in vols.items()
                    },
                }
            ),
        )
        self.storage.sync_dir(self._snap_dir)
        self._snap_maps[s.name] = vols
        self._snaps[s.name] = replace(s, materialized=True)
        self._save_snapshots()

    # ------------------------------------------------------------------ sealing
    def seal_pending(self, max_segments: int = 1) -> int:
        """Move the data of rolled hot segments into the block store; returns segments sealed.

        Safe to call from a worker thread while appends continue. A segment becomes
        sealable once its roll fsync is done (in the roll thread): the rolls queued before
        this call are waited for first, so a caller that just filled a segment finds it here
        however busy the disk is.
        """
        self._wait_rolls(list(self._rolls))
        done = 0
        with self._maint_lock:
            while done < max_segments:
                with self._append_lock:
                    if not self._unsealed:
                        break
                    no = self._unsealed[0]
                    seg = next(s for s in self.segs if s.no == no)
                self._check_open()
                try:
                    self._seal(seg)
                except OSError as e:  # fail-stop: a failed pack fsync is never retried
                    self._failed = StorageError("seal", self._seg_path(seg.no, False), e)
                    raise self._failed from e
                with self._append_lock:
                    self._unsealed.popleft()
                done += 1
        return done

    def _prepare_seal(self, seg: _Seg, compute: bool) -> _SealPrep:
        """Read and decode a rolled hot segment; with ``compute``, also hash and compress it.

        Writes nothing, so it can run ahead in the prep thread while the previous segment
        is written out and fsynced.
        """
        f = seg.file
        assert f is not None
        size = f.size()
        # A mapping of the (page-cached) segment, where the storage has one: a 64 MiB pread
        # copies every byte again and faults in a fresh buffer for each segment.
        view = getattr(f, "view", None)
        image: memoryview | bytes = view(size)[:size] if view is not None else f.pread(size, 0)
        if seg.recs is not None:
            recs, writes = self._appended(seg, image)
        else:
            recs, writes = self._read_back(seg, image)
        cs = self.opts.chunk_size
        pieces: list[memoryview] = []
        spans: list[tuple[int, int]] = []  # per inline write: its slice of ``pieces``
        for rec, data in writes:
            first = len(pieces)
            if rec.offset // cs == (rec.offset + rec.length - 1) // cs:
                pieces.append(data)  # the common small write: one piece
            else:
                pos = rec.offset
                while pos < rec.offset + rec.length:
                    nxt = min((pos // cs + 1) * cs, rec.offset + rec.length)
                    pieces.append(data[pos - rec.offset : nxt - rec.offset])
                    pos = nxt
            spans.append((first, len(pieces)))
        # One block-store call per few thousand pieces, not one per record: small writes
        # would otherwise pay a thread hand-off and an index query each.
        batches = [pieces[k : k + _SEAL_BATCH] for k in range(0, len(pieces), _SEAL_BATCH)]
        prepared = [self.store.prepare(b) for b in batches] if compute else None
        return _SealPrep(seg.no, seg.first_seq, recs, spans, batches, prepared)

    def _appended(self, seg: _Seg, image: memoryview | bytes) -> tuple[list[Record], _Writes]:
        """The records this process appended to ``seg``, and each inline write with its data
        (a view of ``image``).

        No scan, checksum or decode: these are the records as they were appended, and the
        data's place in the file is the one the volume map reads from.
        """
        assert seg.recs is not None
        recs = seg.recs
        mv = memoryview(image)
        it = iter(seg.inline)
        writes: _Writes = []
        for rec in recs:
            if isinstance(rec, WriteRecord) and rec.data is not None:
                src = next(it).src
                assert isinstance(src, Inline)
                writes.append((rec, mv[src.offset : src.offset + rec.length]))
        return recs, writes

    def _read_back(self, seg: _Seg, image: memoryview | bytes) -> tuple[list[Record], _Writes]:
        """The records of a segment found at open: scanned, checked and decoded from the file."""
        name = os.path.relpath(self._seg_path(seg.no, False), self.path)
        res: ScanResult = scan(image, name, journal_uuid=self.uuid, tail_allowed=False)
        recs: list[Record] = []
        writes: _Writes = []
        for fr in res.frames:
            if fr.meta:  # notes vouch for older segments; a sealed segment needs none
                continue
            rec = codec_decode(fr.payload, name, fr.offset, copy=False)
            recs.append(rec)
            if isinstance(rec, WriteRecord) and rec.data is not None:
                writes.append((rec, memoryview(rec.data)))
        return recs, writes

    def _take_prep(self, seg: _Seg) -> _SealPrep:
        """The prep threads' work for ``seg`` if it ran ahead, else the same done here."""
        ahead = self._preps.pop(seg.no, None)
        for no in [n for n in self._preps if n < seg.no]:  # sealed by another way: stale
            self._preps.pop(no)
        if ahead is not None:
            try:
                return ahead.result()
            except Exception:
                pass  # whatever the prep hit is hit again below, where fail-stop handles it
        return self._prepare_seal(seg, compute=False)

    def _prep_next(self, seg: _Seg) -> None:
        """Start preparing ``seg``, if nothing has yet, and the rolled segments after it.

        Two at a time, on two prep threads: each hashes and compresses in slices with a
        barrier at its end, and the second keeps the pool fed through the first one's
        barriers and through the sealer's writes and fsyncs. ``seg`` itself is among them
        when its roll finished too late to be prepared ahead: the sealer then waits for
        it while the next one is already being prepared, instead of doing it alone.
        """
        with self._append_lock:
            if not self._unsealed or self._unsealed[0] != seg.no:
                return
            window = list(self._unsealed)[: 1 + _PREP_AHEAD]
            wanted = [n for n in window if n not in self._preps]
            nxt = [s for s in self.segs if s.no in wanted]
        for s in sorted(nxt, key=lambda s: s.no):
            self._preps[s.no] = self._prepper.submit(self._prepare_seal, s, True)

    def _seal(self, seg: _Seg) -> None:
        assert seg.file is not None
        hot_path = self._seg_path(seg.no, False)
        self._prep_next(seg)
        prep = self._take_prep(seg)
        recs, spans = prep.recs, prep.spans
        refs_all: list[BlockRef] = []
        for k, batch in enumerate(prep.batches):
            refs_all += self.store.put_many(batch, prep.prepared[k] if prep.prepared else None)
        payloads: list[bytes] = []
        new_src: list[tuple[BlockRef, ...]] = []
        it = iter(spans)
        encode, sealed = codec.encode, codec.encode_sealed_write
        for rec in recs:
            if isinstance(rec, WriteRecord) and rec.data is not None:
                a0, a1 = next(it)
                refs = tuple(refs_all[a0:a1])
                new_src.append(refs)
                payloads.append(sealed(rec, refs))
            else:
                payloads.append(encode(rec))
        self.store.flush()  # blocks durable before anything references them
        header = SegmentHeader(seg.no, prep.first_seq, self.uuid, True)
        sealed_path = self._seg_path(seg.no, True)
        write_atomic(self.storage, sealed_path, write_frames(header, iter(payloads)))
        with self._map_lock:
            for ext, refs in zip(seg.inline, new_src, strict=True):
                ext.src = refs
            seg.inline = []
            seg.recs = None
            seg.sealed = True
            f, seg.file = seg.file, None
            seg.size = len(payloads) and self._file_size(sealed_path)
            f.close()
        # No folder fsync for the removal: if a crash brings the hot file back, its sealed
        # copy is there too (renamed durably above), and recovery removes the hot one.
        self.storage.remove(hot_path)
        self.index.put_segment(_entry(seg), seg.checkpoints)

    def _file_size(self, path: str) -> int:
        f = self.storage.open(path)
        try:
            return f.size()
        finally:
            f.close()

    # ------------------------------------------------------------------ holds and retention
    def set_hold(self, kind: str, name: str, seq: int) -> Hold:
        """Protect history from ``seq`` on; replaces an existing hold of the same kind+name."""
        if kind not in ("snapshot", "replica", "export"):
            raise ValueError(f"unknown hold kind {kind!r}")
        self._check_point(seq)
        with self._maint_lock:
            h = Hold(kind, name, Seq(seq), self.clock())
            self.holds[(kind, name)] = h
            self._save_holds()
            return h

    def release_hold(self, kind: str, name: str) -> None:
        with self._maint_lock:
            if self.holds.pop((kind, name), None) is not None:
                self._save_holds()

    def _save_holds(self) -> None:
        write_atomic(
            self.storage,
            os.path.join(self.path, "holds.msgpack"),
            codec.pack_obj([[h.kind, h.name, h.seq, h.created_ts] for h in self.holds.values()]),
        )

    def size_bytes(self) -> int:
        with self._append_lock:
            seg_bytes = sum(s.size for s in self.segs)
        return seg_bytes + self.store.stats().pack_bytes

    def apply_retention(
        self, *, keep_ns: int, max_bytes: int | None = None, now_ns: int | None = None
    ) -> FoldReport:
        """Fold sealed segments older than the window (or beyond the size cap) into the base.

        Never folds past a hold; when the cap is exceeded and only replica holds block, the
        oldest replica hold is released and reported. Retained points read the same before
        and after.
        """
        now = self.clock() if now_ns is None else now_ns
        with self._maint_lock:
            released: list[Hold] = []
            with self._append_lock:
                sealed = [s for s in self.segs if s.sealed]
                # Only a leading run of sealed segments can fold.
                run = []
                for s in self.segs:
                    if not s.sealed:
                        break
                    run.append(s)
            total = self.size_bytes()
            over = max_bytes is not None and total > max_bytes
            fold_n = 0
            freed = 0
            for i, s in enumerate(run):
                old = s.last_ts < now - keep_ns
                if not (old or (over and total - freed > max_bytes)):  # type: ignore[operator]
                    break
                if i == len(run) - 1 and len(run) == len(self.segs):
                    break  # keep the newest segment: it carries the latest state cheaply
                limit = self._hold_limit()
                if limit is not None and s.last_seq > limit:
                    if over and total - freed > max_bytes:  # type: ignore[operator]
                        h = self._oldest_replica_hold()
                        if h is not None:
                            del self.holds[(h.kind, h.name)]
                            released.append(h)
                            self._save_holds()
                            limit = self._hold_limit()
                    if limit is not None and s.last_seq > limit:
                        break
                fold_n = i + 1
                freed += s.size
            del sealed
            if fold_n == 0:
                short = bool(over)
                self.history_short = self.history_short or short
                self.released_holds += released
                return FoldReport(0, Seq(self.base_seq), 0, 0, 0, tuple(released), short)
            folded = run[:fold_n]
            self._check_open()
            try:
                rewritten = self._fold(folded)
                live = self._live_blocks()
                blocks, packs = self.store.collect(live)
            except OSError as e:
                self._failed = StorageError("fold", self.path, e)
                raise self._failed from e
            if over or released:
                self.history_short = True
            self.released_holds += released
            return FoldReport(
                len(folded),
                Seq(self.base_seq),
                rewritten,
                blocks,
                packs,
                tuple(released),
                self.history_short,
            )

    def _hold_limit(self) -> int | None:
        return min((h.seq for h in self.holds.values()), default=None)

    def _oldest_replica_hold(self) -> Hold | None:
        reps = [h for h in self.holds.values() if h.kind == "replica"]
        return min(reps, key=lambda h: h.seq) if reps else None

    def _fold(self, folded: list[_Seg]) -> int:
        fold_seq = folded[-1].last_seq
        for snap in sorted(self._snaps.values(), key=lambda x: x.seq):
            if not snap.materialized and snap.seq <= fold_seq:
                self._materialize(snap)  # before the versions it reads are folded away
        fold_ts = folded[-1].last_ts if folded[-1].records else self.base_ts
        cs = self.opts.chunk_size
        new_bases: dict[str, dict[int, BlockRef | None]] = {}
        rewritten = 0
        with self._map_lock:
            vols = list(self.volumes.values())
            touched = {
                vm.name: sorted(
                    {c for c, lst in vm.chunks.items() if lst and lst[0].seq <= fold_seq}
                )
                for vm in vols
            }
        for vm in vols:
            nb: dict[int, BlockRef | None] = {}
            cache = self.new_cache()
            for c in touched[vm.name]:
                start = c * cs
                n = min(cs, vm.size - start)
                if n <= 0:
                    nb[c] = None
                    continue
                buf = bytearray(n)
                with self._map_lock:
                    vm.read_into(memoryview(buf), start, fold_seq, cache)
                if not any(buf):
                    nb[c] = None
                else:
                    nb[c] = self.store.put_many([bytes(buf)])[0]
                rewritten += 1
            new_bases[vm.name] = nb
        self.store.flush()
        manifest_vols = {}
        with self._map_lock:
            for vm in vols:
                base = dict(vm.base)
                for c, ref in new_bases[vm.name].items():
                    if ref is None:
                        base.pop(c, None)
                    else:
                        base[c] = ref
                manifest_vols[vm.name] = (vm.size, base)
        write_atomic(
            self.storage,
            os.path.join(self.path, "base.manifest"),
            codec.pack_obj(
                {
                    "seq": fold_seq,
                    "ts": fold_ts,
                    "volumes": {
                        name: {
                            "size": size,
                            "chunks": {
                                c: [r.block_id, r.length, r.pack, r.pack_offset]
                                for c, r in base.items()
                            },
                        }
                        for name, (size, base) in manifest_vols.items()
                    },
                }
            ),
        )
        with self._append_lock, self._map_lock:
            for vm in vols:
                vm.base = manifest_vols[vm.name][1]
                vm.drop_upto(fold_seq)
            drop = fold_seq - self.base_seq
            del self._ts[:drop]
            self.base_seq, self.base_ts = fold_seq, fold_ts
            self.segs = [s for s in self.segs if s.no > folded[-1].no]
        for s in folded:
            self.storage.remove(self._seg_path(s.no, True))
        self.storage.sync_dir(self.seg_dir)
        self.index.drop_segments_upto(folded[-1].no, fold_seq)
        return rewritten

    def _live_blocks(self) -> set[bytes]:
        live: set[bytes] = set()
        for vols in self._snap_maps.values():  # snapshots share blocks with everything else
            for _, chunks in vols.values():
                live.update(r.block_id for r in chunks.values())
        with self._map_lock:
            for vm in self.volumes.values():
                live.update(r.block_id for r in vm.base.values())
                for e in vm.extents():
                    if isinstance(e.src, tuple):
                        live.update(r.block_id for r in e.src)
        return live

    # ------------------------------------------------------------------ index
    def rebuild_index(self) -> None:
        """Drop every derived table and re-derive it from segments and packs."""
        with self._append_lock:
            rolls = list(self._rolls)
        self._wait_rolls(rolls)
        with self._maint_lock, self._append_lock:
            self.index.clear()
            self.store.rebuild_index()
            for s in self.segs:
                if s.sealed or s.file is not self._current_file():
                    self.index.put_segment(_entry(s), s.checkpoints)
            self.index.set_meta("uuid", self.uuid.hex())

    def _current_file(self) -> File | None:
        return self._writer.file if self._writer is not None else None

    # ------------------------------------------------------------------ status and close
    def status(self) -> JournalStatus:
        w = self.window()
        cps = self.checkpoints()
        with self._append_lock:
            seg_bytes = sum(s.size for s in self.segs)
            nseg, unsealed = len(self.segs), len(self._unsealed)
            vols = {n: v.size for n, v in self.volumes.items()}
        alerts = []
        if self.history_short:
            alerts.append("history not meeting SLA: the journal size cap shortened history")
        for h in self.released_holds:
            alerts.append(f"replica {h.name} hold released at seq {h.seq}: it will resync")
        if self.recovery.truncated_segment:
            alerts.append(
                f"torn tail truncated in {self.recovery.truncated_segment} at "
                f"{self.recovery.truncated_at} ({self.recovery.truncated_bytes} bytes)"
            )
        return JournalStatus(
            w,
            vols,
            nseg,
            unsealed,
            seg_bytes,
            self.store.stats().pack_bytes,
            self.index.size_bytes(),
            cps[-1] if cps else None,
            tuple(self.holds.values()),
            self.recovery,
            self.history_short,
            tuple(alerts),
        )

    def close(self) -> None:
        """Sync and release everything; unsealed segments stay hot and are sealed next time."""
        if self._closed:
            return
        if self._failed is None:
            self.sync()
        self._roller.shutdown(wait=True)
        # Preps read hot segment files closed below; queued ones are not worth finishing.
        self._prepper.shutdown(wait=True, cancel_futures=True)
        self._preps.clear()
        with self._append_lock:
            self._closed = True
            for s in self.segs:
                if s.file is not None:
                    s.file.close()
                    s.file = None
        self.store.close()
        self.index.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers
# (offset, data, length, trim), one op of Journal.write_many: data is bytes or a flat byte
# memoryview (its len() is its size in bytes: write_many frames by it), or None for
# zeroes of ``length`` bytes
WriteOp = tuple[int, "bytes | memoryview | None", int, bool]
Tap = Callable[[list[Record], Sequence[WriteOp]], None]
# build(seq, ts, wall) -> (record, payload parts): the record is made under the append lock
_Builder = Callable[[Seq, int, "int | None"], tuple[Record, list[bytes | memoryview]]]


def _single(rec: Record) -> tuple[Record, list[bytes | memoryview]]:
    return rec, [codec.encode(rec)]


def codec_decode(payload: memoryview, name: str, offset: int, *, copy: bool = True) -> Record:
    try:
        return codec.decode(payload, copy=copy)
    except codec.DecodeError as e:
        raise SegmentCorrupt(name, offset, str(e)) from e


def _entry(s: _Seg) -> SegmentEntry:
    return SegmentEntry(
        s.no, s.first_seq, s.last_seq, s.first_ts, s.last_ts, s.records, s.size, s.sealed
    )


def _opts_dict(o: JournalOptions) -> dict[str, int]:
    return {
        "segment_size": o.segment_size,
        "chunk_size": o.chunk_size,
        "pack_target": o.pack_target,
        "hash_workers": o.hash_workers,
        "zstd_level": o.zstd_level,
    }
