"""Content-addressed block store: BLAKE3 names, zstd compression, pack files, GC.

Why BLAKE3 (cryptographic like SHA-256, 2-3x faster here): guests control block contents, so
a non-cryptographic name would let a guest forge a dedup collision and corrupt another
volume's block. xxh3 is used only as the pack
entry checksum (fast corruption detection on every read).

Pack layout (docs/design/journal-format.md)::

    header 32 B  magic "CDPPACK1" | pack_no u64 | journal uuid 16 B
    entry  56 B  block id 32 B | raw_len u32 | stored_len u32 | codec u8 | pad 3 | xxh3_64 u64
           + stored bytes (codec 0 raw, 1 zstd)

Entries are variable-size (raw_len up to 16 MiB), so content-defined chunks fit later.
Durability: ``put_many`` appends; ``flush`` fsyncs the packs and only then records the new
blocks in the index, so the index never names a block a crash could lose.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import blake3
import xxhash
import zstandard

from .errors import BlockCorrupt, BlockMissing
from .index import BlockLocation, Index
from .storage import File, Storage
from .types import BlockId, BlockRef, new_block_ref

T = TypeVar("T")

PACK_MAGIC = b"CDPPACK1"
PACK_HEADER = struct.Struct("<8sQ16s")
ENTRY = struct.Struct("<32sIIB3xQ")
CODEC_RAW = 0
CODEC_ZSTD = 1
MAX_BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Prepared:
    """``BlockStore.prepare``: each chunk's id, and (codec, stored bytes) of the new ones."""

    ids: list[BlockId]
    stored: dict[bytes, tuple[int, bytes | memoryview]]  # raw ones are views of the chunks
    known: dict[bytes, BlockLocation]  # what the index held at prepare time
    epoch: tuple[int, int]  # (collections, flushes) of the store at prepare time


@dataclass(frozen=True, slots=True)
class StoreStats:
    blocks: int
    packs: int
    pack_bytes: int


class BlockStore:
    def __init__(
        self,
        folder: str,
        storage: Storage,
        index: Index,
        journal_uuid: bytes,
        *,
        pack_target: int = 256 * 1024 * 1024,
        workers: int = 2,
        zstd_level: int = 1,
        index_batch: int = 1 << 17,
    ) -> None:
        self.folder = folder
        self.storage = storage
        self.index = index
        self.uuid = journal_uuid
        self.pack_target = pack_target
        self._zstd_level = zstd_level
        self._local = threading.local()
        self._workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="blockstore")
        self._lock = threading.RLock()
        self._files: dict[int, File] = {}
        # Blocks written but not yet in the index: (pack, offset, stored, raw). Lookups check
        # here first. ``flush`` fsyncs their packs, but indexes them only once
        # ``index_batch`` have gathered: random 32-byte keys land on random B-tree pages, so a
        # small commit rewrites nearly as many pages as a big one (measured: 14 µs a row at
        # 16k rows a commit, 8 µs at 64k). A crash loses nothing: ``recover`` indexes every
        # entry past a pack's indexed size, and the packs were fsynced.
        self._pending: dict[bytes, tuple[int, int, int, int]] = {}
        self._pending_sizes: dict[int, int] = {}  # packs written since the last fsync
        self._synced_sizes: dict[int, int] = {}  # packs fsynced since the last index commit
        # Packs with a bad entry inside what was fsynced (found by recover): kept whole, since
        # sealed segments name entries after it by place, and never collected.
        self.damaged: dict[int, int] = {}  # pack -> offset of the bad entry
        self.index_batch = index_batch
        # What changed the index since a ``prepare``: a collection (blocks dropped or moved)
        # invalidates its lookups; a flush only adds, and its ids are kept for a few flushes
        # so that ``put_many`` re-checks just those instead of querying SQLite again.
        self._collections = 0
        self._flushes = 0
        self._flushed: deque[tuple[int, frozenset[bytes]]] = deque(maxlen=_FLUSHES_KEPT)
        self._writer: File | None = None
        self._writer_no = 0
        self._failed: OSError | None = None
        storage.makedirs(folder)

    # -- naming and opening -------------------------------------------------------------
    def _pack_path(self, n: int) -> str:
        return os.path.join(self.folder, f"{n:016x}.pack")

    def pack_numbers(self) -> list[int]:
        return sorted(
            int(n[:16], 16)
            for n in self.storage.listdir(self.folder)
            if n.endswith(".pack") and len(n) == 21 and _is_hex(n[:16])
        )

    def _file(self, n: int) -> File:
        f = self._files.get(n)
        if f is None:
            f = self.storage.open(self._pack_path(n))
            self._files[n] = f
        return f

    def recover(self) -> int:
        """Bring the index up to date with the packs; truncate a torn pack tail.

        Returns the number of torn bytes dropped. Entries past the indexed size are scanned
        and indexed (fsynced, and waiting for their batch or lost with the index commit). A
        bad entry before the pack's fsynced size is damage, not a torn tail (``_end_at``).
        """
        torn = 0
        sizes = self.index.pack_sizes()
        synced = self.index.synced_sizes()
        on_disk = self.pack_numbers()
        gone = [n for n in sizes if n not in on_disk]
        if gone:  # the index outlived packs (its commit survived, the removal did not)
            self.index.remove_packs(gone)
        for n in on_disk:
            f = self._file(n)
            indexed = sizes.get(n)
            if indexed is not None and indexed > f.size():
                self.index.remove_packs([n])  # the index is ahead of the file: re-derive it
                indexed = None
            start = max(indexed or PACK_HEADER.size, PACK_HEADER.size)
            if f.size() < PACK_HEADER.size:
                torn += f.size()
                f.truncate(0)
                f.append([PACK_HEADER.pack(PACK_MAGIC, n, self.uuid)])
                f.sync()
                continue
            rows, end = self._scan(f, start)
            torn += self._end_at(n, f, end, synced.get(n, 0))
            if rows or indexed is None:
                self.index.add_blocks(rows, {n: end})
        return torn

    def rebuild_index(self) -> None:
        """Re-derive every block row from the packs (the index's blocks table was dropped)."""
        self.flush()  # what is not indexed yet is on disk, and the scan below indexes it
        with self._lock:
            self._pending.clear()
            self._synced_sizes.clear()
            self._collections += 1  # a prepare's lookups of _pending are stale from here on
        synced = self.index.synced_sizes()  # kept by the rebuild: a fact about the files
        for n in self.pack_numbers():
            f = self._file(n)
            rows, end = self._scan(f, PACK_HEADER.size)
            self._end_at(n, f, end, synced.get(n, 0))
            self.index.add_blocks(rows, {n: end})

    def _end_at(self, n: int, f: File, end: int, synced: int) -> int:
        """Where a pack's valid entries end: cut a torn tail there; returns the bytes cut.

        A bad entry before ``synced`` (the fsynced size recorded at the last flush) is not a
        torn tail but damage: truncating would drop every good entry after it, which stay
        readable where sealed segments name them. Such a pack is kept whole and never
        collected.
        """
        if end < min(synced, f.size()):
            self.damaged[n] = end
            return 0
        if end < f.size():
            cut = f.size() - end
            f.truncate(end)
            return cut
        return 0

    def _scan(self, f: File, start: int) -> tuple[list[tuple[bytes, int, int, int, int]], int]:
        rows = []
        size = f.size()
        data = f.pread(size - start, start)
        pos = 0
        while start + pos + ENTRY.size <= size:
            bid, raw_len, stored_len, codec, csum = ENTRY.unpack_from(data, pos)
            body_end = pos + ENTRY.size + stored_len
            if (
                start + body_end > size
                or raw_len > MAX_BLOCK
                or codec not in (0, 1)
                or xxhash.xxh3_64_intdigest(data[pos + ENTRY.size : body_end]) != csum
            ):
                break
            rows.append((bid, self._no(f), start + pos, stored_len, raw_len))
            pos = body_end
        return rows, start + pos

    def _no(self, f: File) -> int:
        return int(os.path.basename(f.path)[:16], 16)

    # -- writing ------------------------------------------------------------------------
    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self._zstd_level)
            self._local.c = c
        return c

    def _compress_run(
        self, items: list[bytes | memoryview]
    ) -> list[tuple[int, bytes | memoryview]]:
        """zstd each item unless it does not pay; (codec, stored bytes) per item.

        Two 4 KiB probes skip incompressible large items cheaply, but on compressible data
        they are pure cost (11 % of pool time on ext4 data), so they run only after an item
        that did not compress: a run of compressible chunks pays no probes, a run of random
        ones pays only the probes, and a switch between the two costs one wasted attempt.
        Small items, too small to probe, are tried one in a stride after a run of misses.
        Data stored raw is returned as is, not copied: it is written before the chunks can
        go (put_many), or prepared from an immutable rolled segment (prepare).
        """
        z = self._compressor()
        out: list[tuple[int, bytes | memoryview]] = []
        probe = True
        misses = 0  # small items in a row that did not compress
        for data in items:
            n = len(data)
            if n < 16384:
                # Too small to probe: zstd costs about 7 µs on a random 4 KiB block and
                # 4 µs even on 512 bytes (its per-call setup). After a run of misses, only
                # every _SMALL_STRIDE-th is tried until one pays (early abort, as OpenZFS
                # does for zstd): encrypted or compressed guest data costs a hash, not a
                # wasted compression, and a compressible stretch is caught within a stride.
                if misses >= _SMALL_MISSES and misses % _SMALL_STRIDE:
                    out.append((CODEC_RAW, data))
                    misses += 1
                    continue
                comp = z.compress(data)
                if len(comp) < n - n // 32:
                    out.append((CODEC_ZSTD, comp))
                    misses = 0
                else:
                    out.append((CODEC_RAW, data))
                    misses += 1
                continue
            if probe:
                head, tail = data[:4096], data[n - 4096 :]
                if len(z.compress(head)) > 3968 and len(z.compress(tail)) > 3968:
                    out.append((CODEC_RAW, data))
                    continue
            comp = z.compress(data)
            if len(comp) < n - n // 32:
                out.append((CODEC_ZSTD, comp))
                probe = False
            else:
                out.append((CODEC_RAW, data))
                probe = True
        return out

    def _parallel(
        self, fn: Callable[[list[bytes | memoryview]], list[T]], items: list[bytes | memoryview]
    ) -> list[T]:
        """fn over items on the worker threads, one contiguous slice per worker.

        Hashing and compression release the GIL; slicing keeps the hand-off cost per call,
        not per item, so 4 KiB blocks gain as much as 64 KiB ones.
        """
        total = sum(len(x) for x in items)
        if len(items) < 2 or total < 256 * 1024:
            return fn(items)
        n = self._workers
        step = (len(items) + n - 1) // n
        parts = [items[i : i + step] for i in range(0, len(items), step)]
        out: list[T] = []
        for res in self._pool.map(fn, parts):
            out += res
        return out

    def prepare(self, chunks: Sequence[bytes | memoryview]) -> Prepared:
        """The CPU work of ``put_many(chunks)`` done ahead, without writing anything.

        The sealer prepares the next segment while it writes and fsyncs the current one, so
        hashing and compression keep both cores busy through the serial parts. What the
        store holds is looked up again at ``put_many``: a block the store had here may
        have been collected since. The chunks must not change until that ``put_many``.
        """
        self._check()
        ids = [BlockId(d) for d in self._parallel(_block_ids, list(chunks))]
        with self._lock:
            epoch = (self._collections, self._flushes)
            known, new_idx = self._triage(ids)
        stored = self._parallel(self._compress_run, [chunks[k] for k in new_idx])
        return Prepared(
            ids, {ids[k]: s for k, s in zip(new_idx, stored, strict=True)}, known, epoch
        )

    def _triage(self, ids: list[BlockId]) -> tuple[dict[bytes, BlockLocation], list[int]]:
        """The ids the index holds, and the first position of each id the store lacks."""
        with self._lock:
            known = self.index.lookup_blocks([b for b in ids if b not in self._pending])
            new: dict[bytes, int] = {}
            for k, b in enumerate(ids):
                if b not in known and b not in self._pending and b not in new:
                    new[b] = k
        return known, list(new.values())

    def _retriage(self, p: Prepared) -> tuple[dict[bytes, BlockLocation], list[int]]:
        """``_triage`` of prepared ids, from the lookups ``prepare`` made where still valid.

        Blocks leave the index only by ``collect``; after one, everything is looked up again.
        Otherwise only ids that a flush since then indexed can have become known, and only
        those are queried (a few, where a later segment repeats data of an earlier one).
        """
        with self._lock:
            collections, flushes = p.epoch
            since = [ids for n, ids in self._flushed if n > flushes]
            if collections != self._collections or len(since) != self._flushes - flushes:
                return self._triage(p.ids)  # a collection ran, or too many flushes to tell
            known = dict(p.known)
            ask: list[bytes] = (
                [b for b in p.ids if b not in known and any(b in f for f in since)]
                if since  # usually none: blocks are indexed every index_batch rows
                else []
            )
            if ask:
                known.update(self.index.lookup_blocks(ask))
            new: dict[bytes, int] = {}
            for k, b in enumerate(p.ids):
                if b not in known and b not in self._pending and b not in new:
                    new[b] = k
        return known, list(new.values())

    def put_many(
        self, chunks: Sequence[bytes | memoryview], prepared: Prepared | None = None
    ) -> list[BlockRef]:
        """Store chunks (deduplicated); returns refs in order. Durable only after flush().

        Hash first, then look up, then compress only what is new: a rewrite of data the
        store already has (zeros, clones, a guest rewriting a file) costs one hash.
        ``prepared``: ``prepare(chunks)`` of these same chunks, so only the lookup is redone.
        """
        self._check()
        if prepared is None:
            ids = [BlockId(d) for d in self._parallel(_block_ids, list(chunks))]
            known, new_idx = self._triage(ids)
            stored = self._parallel(self._compress_run, [chunks[k] for k in new_idx])
        else:
            ids = prepared.ids
            if len(ids) != len(chunks):
                raise ValueError("prepared for other chunks")
            known, new_idx = self._retriage(prepared)
            done = prepared.stored
            todo = [k for k in new_idx if ids[k] not in done]  # it was in the store then
            extra = dict(
                zip(
                    [ids[k] for k in todo],
                    self._parallel(self._compress_run, [chunks[k] for k in todo]),
                    strict=True,
                )
            )
            stored = [done.get(ids[k]) or extra[ids[k]] for k in new_idx]
        with self._lock:
            # One writev per batch (and per pack), not one per entry.
            parts: list[bytes | memoryview] = []
            entries: list[tuple[bytes, int, int, int]] = []  # id, offset in batch, stored, raw
            size = 0
            for k, (codec, body) in zip(new_idx, stored, strict=True):
                b = ids[k]
                if b in self._pending:
                    continue
                head = ENTRY.pack(
                    b, len(chunks[k]), len(body), codec, xxhash.xxh3_64_intdigest(body)
                )
                parts += (head, body)
                entries.append((b, size, len(body), len(chunks[k])))
                size += ENTRY.size + len(body)
                if size >= 8 << 20:
                    self._append_entries(parts, entries)
                    parts, entries, size = [], [], 0
            if entries:
                self._append_entries(parts, entries)
            refs: list[BlockRef] = []
            for k, b in enumerate(ids):
                loc = self._pending.get(b)
                if loc is not None:
                    refs.append(new_block_ref(b, len(chunks[k]), loc[0], loc[1]))
                else:
                    old = known[b]
                    refs.append(new_block_ref(b, len(chunks[k]), old.pack, old.offset))
        return refs

    def _append_entries(
        self, parts: list[bytes | memoryview], entries: list[tuple[bytes, int, int, int]]
    ) -> None:
        """Write a run of pack entries with one writev and record them as pending."""
        try:
            f = self._writable()
            base = f.append(parts)
        except OSError as e:
            self._failed = e
            raise
        for b, rel, stored_len, raw_len in entries:
            self._pending[b] = (self._writer_no, base + rel, stored_len, raw_len)
        self._pending_sizes[self._writer_no] = f.size()

    def _writable(self) -> File:
        if self._writer is not None and self._writer.size() < self.pack_target:
            return self._writer
        # Random ids: a pack number is never reused, so a stale index row or location hint
        # can never point into a different pack that happens to have the same name.
        n = secrets.randbits(62) | 1
        f = self.storage.open(self._pack_path(n), create=True)
        f.append([PACK_HEADER.pack(PACK_MAGIC, n, self.uuid)])
        self.storage.sync_dir(self.folder)
        self._files[n] = f
        self._writer, self._writer_no = f, n
        self._pending_sizes[n] = f.size()
        return f

    def _check(self) -> None:
        if self._failed is not None:
            raise OSError(self._failed.errno, f"block store stopped after: {self._failed}")

    def flush(self, *, replace: bool = False, index: bool = False) -> None:
        """fsync every pack written since the last flush; index the new blocks in batches.

        After it returns, every block put so far is durable. Its index row is written once
        ``index_batch`` rows have gathered, or now with ``index`` (close, collection).
        ``replace``: the blocks were moved by a repack, so their new rows replace the old
        ones, now.

        Fail-stop: after a failed fsync the kernel may have dropped the pages, so a retry
        could "succeed" with nothing on disk; every later call raises instead.
        """
        with self._lock:
            self._check()
            try:
                for n in self._pending_sizes:
                    self._files[n].sync()
            except OSError as e:
                self._failed = e
                raise
            just = dict(self._pending_sizes)
            for n, size in just.items():
                self._files[n].forget(size)  # durable now; see OsFile.forget
            self._synced_sizes.update(just)
            self._pending_sizes.clear()
            if not self._synced_sizes:
                return
            if replace or index or len(self._pending) >= self.index_batch:
                self._index_pending(replace=replace)
            elif just:
                self.index.set_synced(just)  # one small row per pack: what recover may keep

    def _index_pending(self, *, replace: bool) -> None:
        rows = [(bid, *loc) for bid, loc in self._pending.items()]
        self.index.add_blocks(rows, dict(self._synced_sizes), replace=replace)
        self._flushes += 1
        self._flushed.append((self._flushes, frozenset(self._pending)))
        self._pending.clear()
        self._synced_sizes.clear()

    def locate_many(self, ids: Sequence[bytes]) -> dict[bytes, tuple[int, int, int]]:
        """(pack, offset, raw length) of each id the store holds, flushed or not yet.

        The replication receiver asks this before accepting a batch that references blocks
        it did not carry: what is missing must be sent, never assumed.
        """
        with self._lock:
            out = {b: (p[0], p[1], p[3]) for b in ids if (p := self._pending.get(b)) is not None}
            rest = [b for b in ids if b not in out]
        for b, loc in self.index.lookup_blocks(rest).items():
            out[b] = (loc.pack, loc.offset, loc.raw_len)
        return out

    # -- reading ------------------------------------------------------------------------
    def get(self, ref: BlockRef) -> bytes:
        """The block's bytes, checked against the entry checksum; hint first, index second."""
        data = self._read_at(ref.block_id, ref.pack, ref.pack_offset, ref.length)
        if data is None:
            loc = self.index.lookup_blocks([ref.block_id]).get(ref.block_id)
            if loc is None:
                with self._lock:
                    p = self._pending.get(ref.block_id)
                if p is None:
                    raise BlockMissing(ref.block_id)
                loc = BlockLocation(p[0], p[1], p[2], p[3])
            data = self._read_at(ref.block_id, loc.pack, loc.offset, loc.stored_len)
            if data is None:
                raise BlockCorrupt(ref.block_id, f"pack {loc.pack}", "entry header does not match")
        return data

    def get_many(self, refs: list[BlockRef]) -> dict[bytes, bytes]:
        """Many blocks at once: hints sorted per pack and read in coalesced spans.

        A point-in-time read of scattered small writes touches thousands of 4 KiB blocks;
        blocks sealed together sit together in a pack, so a few large preads replace
        thousands of small ones. Anything whose hint is stale goes through ``get()``.
        """
        out: dict[bytes, bytes] = {}
        by_pack: dict[int, list[BlockRef]] = {}
        for r in refs:
            by_pack.setdefault(r.pack, []).append(r)
        for pack, group in by_pack.items():
            group.sort(key=lambda r: r.pack_offset)
            try:
                with self._lock:
                    f = self._file(pack)
            except FileNotFoundError:
                for r in group:
                    out[r.block_id] = self.get(r)
                continue
            mapped = getattr(f, "mapped_read", None)
            if mapped is not None:
                for r in group:
                    data = self._decode_entry(
                        r.block_id,
                        memoryview(mapped(ENTRY.size + r.length, r.pack_offset)),
                        f"pack {pack} offset {r.pack_offset}",
                    )
                    out[r.block_id] = data if data is not None else self.get(r)
                continue
            k = 0
            while k < len(group):
                start = group[k].pack_offset
                end = start + ENTRY.size + group[k].length
                m = k + 1
                while (
                    m < len(group)
                    and group[m].pack_offset - end < 65536
                    and (group[m].pack_offset + ENTRY.size + group[m].length - start < 4 << 20)
                ):
                    end = max(end, group[m].pack_offset + ENTRY.size + group[m].length)
                    m += 1
                span = memoryview(f.pread(end - start, start))
                for r in group[k:m]:
                    data = self._decode_entry(
                        r.block_id,
                        span[r.pack_offset - start :],
                        f"pack {pack} offset {r.pack_offset}",
                    )
                    out[r.block_id] = data if data is not None else self.get(r)
                k = m
        return out

    def copy_whole(self, out: memoryview, pieces: Sequence[tuple[int, BlockRef]]) -> None:
        """Copy each whole block ``ref`` to ``out[dst : dst + ref.length]``, checked.

        The point-in-time read of scattered 4 KiB writes spends its time here, so each block
        costs one header unpack, one checksum and one copy from a mapping of the pack: no
        syscall, no bytes object in between (a zstd block decompresses once). A stale hint,
        or storage without mappings, takes ``get()``.
        """
        views: dict[int, memoryview] = {}
        unpack = ENTRY.unpack_from
        h = ENTRY.size
        checksum = xxhash.xxh3_64_intdigest
        slow: list[tuple[int, BlockRef]] = []
        for dst, r in pieces:
            o = r.pack_offset
            mv = views.get(r.pack)
            if mv is None or o + h > len(mv):
                got = self._view(r.pack, o + h)
                if got is None:
                    slow.append((dst, r))
                    continue
                mv = views[r.pack] = got
            bid, raw_len, stored_len, codec, csum = unpack(mv, o)
            body = mv[o + h : o + h + stored_len]
            if bid != r.block_id or raw_len != r.length or len(body) != stored_len:
                slow.append((dst, r))  # stale hint (the block moved), or past the mapping
                continue
            if checksum(body) != csum:
                raise BlockCorrupt(
                    BlockId(bid), f"pack {r.pack} offset {o}", "entry checksum mismatch"
                )
            if codec == CODEC_RAW:
                out[dst : dst + raw_len] = body
            else:
                out[dst : dst + raw_len] = _decompress(
                    bid, body, raw_len, f"pack {r.pack} offset {o}"
                )
        for dst, r in slow:
            data = self.get(r)
            if len(data) != r.length:
                raise BlockCorrupt(r.block_id, "block store", "length differs from the reference")
            out[dst : dst + r.length] = data

    def _view(self, pack: int, need: int) -> memoryview | None:
        f = self._files.get(pack)  # a dict read is atomic: no lock unless the pack is new
        if f is None:
            try:
                with self._lock:
                    f = self._file(pack)
            except FileNotFoundError:
                return None
        view = getattr(f, "view", None)
        return view(need) if view is not None else None

    def _read_at(self, bid: bytes, pack: int, offset: int, size_hint: int = 0) -> bytes | None:
        try:
            with self._lock:
                f = self._file(pack)
        except FileNotFoundError:
            return None
        buf = f.pread(ENTRY.size + max(size_hint, 4096), offset)
        if len(buf) >= ENTRY.size:
            stored_len = ENTRY.unpack_from(buf)[2]
            if ENTRY.size + stored_len > len(buf):
                buf = f.pread(ENTRY.size + stored_len, offset)
        return self._decode_entry(bid, memoryview(buf), f"pack {pack} offset {offset}")

    def _decode_entry(self, bid: bytes, buf: memoryview, where: str) -> bytes | None:
        """The block at the start of ``buf``; None if another block is there (stale hint)."""
        if len(buf) < ENTRY.size:
            return None
        got_id, raw_len, stored_len, codec, csum = ENTRY.unpack_from(buf)
        if got_id != bid:
            return None  # stale hint: the block moved or the pack was rewritten
        stored = buf[ENTRY.size : ENTRY.size + stored_len]
        if len(stored) != stored_len or xxhash.xxh3_64_intdigest(stored) != csum:
            raise BlockCorrupt(BlockId(bid), where, "entry checksum mismatch")
        if codec == CODEC_RAW:
            return bytes(stored)
        return _decompress(bid, stored, raw_len, where)

    # -- garbage collection ---------------------------------------------------------------
    def collect(self, live: set[bytes], *, repack_below: float = 0.5) -> tuple[int, int]:
        """Reclaim the space of blocks nobody references.

        A pack with no live block is deleted; a pack whose live bytes fall below
        ``repack_below`` of its size has its live entries copied (still compressed, checksums
        unchanged) to the current pack, then is deleted. The index always lists exactly the
        entries of the packs on disk, so a rebuild from packs gives the same table.
        Returns (blocks dropped, packs removed).
        """
        with self._lock:
            self.flush(index=True)
            self._collections += 1  # prepared lookups are stale from here on
            by_pack: dict[int, list[tuple[bytes, int, int, int, int]]] = {}
            for r in self.index.all_blocks():
                by_pack.setdefault(r[1], []).append(r)
            cur = self._writer_no if self._writer is not None else None
            victims: list[int] = []
            dropped = 0
            for n in self.pack_numbers():
                if n == cur or n in self.damaged:
                    continue
                rows = by_pack.get(n, [])
                keep = [r for r in rows if r[0] in live]
                size = self._file(n).size()
                live_bytes = sum(r[3] + ENTRY.size for r in keep)
                if keep and live_bytes >= repack_below * size:
                    continue
                for r in keep:  # copy the entry verbatim into the current pack
                    raw = self._file(n).pread(ENTRY.size + r[3], r[2])
                    f = self._writable()
                    off = f.append([raw])
                    self._pending[r[0]] = (self._writer_no, off, r[3], r[4])
                    self._pending_sizes[self._writer_no] = f.size()
                dropped += len(rows) - len(keep)
                victims.append(n)
            if not victims:
                return 0, 0
            self.flush(replace=True)
            self.index.remove_packs(victims)
            for n in victims:
                f0 = self._files.pop(n, None)
                if f0 is not None:
                    f0.close()
                self.storage.remove(self._pack_path(n))
            self.storage.sync_dir(self.folder)
            return dropped, len(victims)

    def stats(self) -> StoreStats:
        nums = self.pack_numbers()
        with self._lock:
            size = sum(self._file(n).size() for n in nums)
            pending = len(self._pending)
        return StoreStats(self.index.block_count() + pending, len(nums), size)

    def close(self) -> None:
        self.flush(index=True)
        self._pool.shutdown(wait=True)
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._writer = None


_SMALL_MISSES = 8  # small blocks in a row that did not compress before trying fewer
_SMALL_STRIDE = 8  # then one in this many is tried
_FLUSHES_KEPT = 6  # the sealer prepares up to two segments ahead: a few flushes in between


def _decompress(bid: bytes, stored: memoryview, raw_len: int, where: str) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
    except zstandard.ZstdError as e:
        raise BlockCorrupt(BlockId(bid), where, f"zstd: {e}") from e
    if len(out) != raw_len:
        raise BlockCorrupt(BlockId(bid), where, "decompressed length mismatch")
    return bytes(out)


def block_id(data: bytes | memoryview) -> bytes:
    """The content address: BLAKE3-256, a cryptographic hash (guests choose the data)."""
    return bytes(blake3.blake3(data).digest())


def _block_ids(items: list[bytes | memoryview]) -> list[bytes]:
    return [block_id(x) for x in items]


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)
