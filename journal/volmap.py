"""In-memory version history of each volume, and the point-in-time reader.

Why not SQL rows: one row per block per write made Benji's no-change pass over 6 TB take
80-100 minutes. Here a volume's history is a dict from chunk number (``chunk_size`` bytes of
volume address space) to the list of extents that touched that chunk, in seq order, plus a
*base*: the volume as of ``base_seq`` (the oldest retained point), one block per chunk.

Reading [lo, hi) as of seq S walks each chunk's list backwards from S and stops as soon as
the range is covered, so the cost follows the data read and the versions touched, never
the volume size or the journal length. The maps are rebuilt from segments on open.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter

from .storage import File
from .types import BlockRef


@dataclass(frozen=True, slots=True)
class Inline:
    """Data still in a hot segment file, at ``offset`` in that file."""

    file: File
    offset: int


Source = Inline | tuple[BlockRef, ...] | None  # None: the range reads as zeros


class Extent:
    """One version of a byte range. ``src`` is swapped in one assignment when sealed."""

    __slots__ = ("length", "offset", "seq", "src")

    def __init__(self, seq: int, offset: int, length: int, src: Source) -> None:
        self.seq = seq
        self.offset = offset
        self.length = length
        self.src = src


_seq_key = attrgetter("seq")


class BlockCache:
    """A few recently read blocks: sequential small reads hit the same 64 KiB block."""

    def __init__(
        self,
        fetch: Callable[[BlockRef], bytes],
        entries: int = 256,
        fetch_many: Callable[[list[BlockRef]], dict[bytes, bytes]] | None = None,
        fetch_into: Callable[[memoryview, list[tuple[int, BlockRef]]], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._fetch_many = fetch_many
        self._fetch_into = fetch_into
        self._entries = entries
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()

    def get_many(self, refs: list[BlockRef]) -> dict[bytes, bytes]:
        """Every block of ``refs`` by id: cached ones from memory, the rest in one batch."""
        out: dict[bytes, bytes] = {}
        missing: list[BlockRef] = []
        for r in refs:
            if r.block_id in out:
                continue
            data = self._lru.get(r.block_id)
            if data is not None:
                out[r.block_id] = data
            else:
                missing.append(r)
                out[r.block_id] = b""
        if missing:
            got: dict[bytes, bytes] = (
                self._fetch_many(missing)
                if self._fetch_many is not None
                else {bytes(r.block_id): self._fetch(r) for r in missing}
            )
            out.update(got)
            for bid in got.keys() - self._lru.keys():
                self._lru[bid] = got[bid]
            while len(self._lru) > self._entries:
                self._lru.popitem(last=False)
        return out

    def copy_whole(self, out: memoryview, pieces: list[tuple[int, BlockRef]]) -> None:
        """Copy whole blocks to ``out[dst:]``, past the LRU.

        Why past it: a block read whole is not read again by the next request of a scan, so
        caching it only costs bookkeeping and evicts the large blocks partial reads reuse.
        """
        if self._fetch_into is not None:
            self._fetch_into(out, pieces)
            return
        blocks = self.get_many([r for _, r in pieces])
        for dst, r in pieces:
            out[dst : dst + r.length] = blocks[r.block_id]

    def get(self, ref: BlockRef) -> bytes:
        data = self._lru.get(ref.block_id)
        if data is not None:
            self._lru.move_to_end(ref.block_id)
            return data
        data = self._fetch(ref)
        self._lru[ref.block_id] = data
        if len(self._lru) > self._entries:
            self._lru.popitem(last=False)
        return data


class VolumeMap:
    def __init__(self, name: str, size: int, chunk_size: int) -> None:
        self.name = name
        self.size = size
        self.chunk_size = chunk_size
        self.chunks: dict[int, list[Extent]] = {}
        self.base: dict[int, BlockRef] = {}

    def chunk_range(self, offset: int, length: int) -> range:
        cs = self.chunk_size
        return range(offset // cs, (offset + length + cs - 1) // cs)

    def add(self, ext: Extent) -> None:
        for c in self.chunk_range(ext.offset, ext.length):
            lst = self.chunks.get(c)
            if lst is None:
                self.chunks[c] = [ext]
            else:
                lst.append(ext)

    def extents(self) -> Iterator[Extent]:
        """Every extent once (a write spanning chunks is listed under each chunk)."""
        seen: set[int] = set()
        for lst in self.chunks.values():
            for e in lst:
                if id(e) not in seen:
                    seen.add(id(e))
                    yield e

    def drop_upto(self, seq: int) -> None:
        """Forget versions at or below seq (they were folded into the base)."""
        for c in list(self.chunks):
            lst = self.chunks[c]
            k = bisect_right(lst, seq, key=_seq_key)
            if k == len(lst):
                del self.chunks[c]
            elif k:
                del lst[:k]

    def holds_data(self, offset: int, length: int, at_seq: int) -> bool:
        """Whether a base block or a write (not a zero) as of ``at_seq`` touches the range."""
        end = offset + length
        for c in self.chunk_range(offset, length):
            if c in self.base:
                return True
            lst = self.chunks.get(c)
            if not lst:
                continue
            for k in range(bisect_right(lst, at_seq, key=_seq_key)):
                e = lst[k]
                if e.src is not None and e.offset < end and offset < e.offset + e.length:
                    return True
        return False

    def written_blocks(self, offset: int, length: int, at_seq: int, block: int) -> bytearray:
        """One byte per ``block`` bytes of [offset, offset+length): 1 where ``holds_data``
        of that block would say True, else 0, in one pass over the range's chunks.

        ``offset`` and ``length`` are multiples of ``block``. Lets a reader learn a whole
        region at once (the detector, a MiB per question) instead of a block at a time.
        """
        out = bytearray(length // block)
        end = offset + length
        cs = self.chunk_size
        for c in self.chunk_range(offset, length):
            c0, c1 = max(offset, c * cs), min(end, (c + 1) * cs)
            spans: list[tuple[int, int]] = []
            if c in self.base:
                spans.append((c0, c1))
            else:
                lst = self.chunks.get(c)
                for k in range(bisect_right(lst, at_seq, key=_seq_key) if lst else 0):
                    e = lst[k]  # type: ignore[index]
                    if e.src is not None:
                        a, z = max(e.offset, c0), min(e.offset + e.length, c1)
                        if a < z:
                            spans.append((a, z))
            for a, z in spans:
                b0, b1 = (a - offset) // block, (z - 1 - offset) // block + 1
                out[b0:b1] = b"\x01" * (b1 - b0)
        return out

    def read_into(self, out: memoryview, offset: int, at_seq: int, cache: BlockCache) -> None:
        """Fill ``out`` (zeroed by the caller) with bytes [offset, offset+len(out)) as of seq.

        Two passes: plan which version supplies each byte range, then fetch. Pieces that are
        a whole stored block (every piece of a read of 4 KiB writes, or of 64 KiB-aligned
        data, a base block read whole) are copied by the block store straight from the pack
        into ``out``; partial pieces go through the cache, where sequential small reads of
        one large block hit.
        """
        end = offset + len(out)
        cs = self.chunk_size
        plan = _Plan(offset)
        for c in self.chunk_range(offset, len(out)):
            a = max(offset, c * cs)
            b = min(end, (c + 1) * cs)
            lst = self.chunks.get(c)
            left: list[tuple[int, int]] = [(a, b)]
            if lst:
                j = bisect_right(lst, at_seq, key=_seq_key)
                if j:
                    left = _resolve(lst, j, a, b, plan)
            if left:
                ref = self.base.get(c)
                if ref is not None:
                    for s, t in left:
                        if s == c * cs and t - s == ref.length:
                            plan.whole.append((s - offset, ref))
                        else:
                            plan.part.append((s - offset, t - s, ref, s - c * cs))
        if plan.whole:
            cache.copy_whole(out, plan.whole)
        if plan.part:
            blocks = cache.get_many([p[2] for p in plan.part])
            for dst, n, ref, soff in plan.part:
                out[dst : dst + n] = blocks[ref.block_id][soff : soff + n]
        for dst, n, f, soff in plan.inline:
            data = f.pread(n, soff)
            out[dst : dst + len(data)] = data


class _Plan:
    """Where each byte range of one read comes from, collected before anything is fetched."""

    __slots__ = ("inline", "offset", "part", "whole")

    def __init__(self, offset: int) -> None:
        self.offset = offset  # volume offset of out[0]
        self.whole: list[tuple[int, BlockRef]] = []  # dst, ref: the piece is the whole block
        self.part: list[tuple[int, int, BlockRef, int]] = []  # dst, length, ref, offset in it
        self.inline: list[tuple[int, int, File, int]] = []  # dst, length, file, file offset

    def add(self, e: Extent, s: int, t: int) -> None:
        """Bytes [s, t) of the volume come from extent ``e``."""
        src = e.src
        if src is None:
            return
        dst = s - self.offset
        if isinstance(src, Inline):
            self.inline.append((dst, t - s, src.file, src.offset + (s - e.offset)))
            return
        pos = e.offset
        for ref in src:
            rs, re_ = pos, pos + ref.length
            pos = re_
            if re_ <= s:
                continue
            if rs >= t:
                break
            if rs >= s and re_ <= t:
                self.whole.append((dst + (rs - s), ref))
            else:
                a, b = max(rs, s), min(re_, t)
                self.part.append((dst + (a - s), b - a, ref, a - rs))


_SECTOR = 512


def _resolve(lst: list[Extent], j: int, a: int, b: int, plan: _Plan) -> list[tuple[int, int]]:
    """Plan [a, b) of one chunk from ``lst[:j]``, newest first; return what no version covers.

    Why sectors: block devices write whole 512-byte sectors, so the unresolved part of the
    chunk is one int with a bit per sector, and each older version costs a few int operations
    instead of interval-list surgery. An unaligned range or extent switches to the general
    byte-range walk for the rest of the chunk.
    """
    if (a | b) & (_SECTOR - 1):
        return _resolve_bytes(lst, j, [a], [b], plan)
    need = (1 << ((b - a) // _SECTOR)) - 1  # bit i: sector at a + i * 512 still unresolved
    whole = plan.whole
    base = plan.offset
    while j > 0 and need:
        j -= 1
        e = lst[j]
        es = e.offset
        ee = es + e.length
        if (es | ee) & (_SECTOR - 1):
            starts, ends = _runs(need, a)
            return _resolve_bytes(lst, j + 1, starts, ends, plan)
        s = es if es > a else a
        t = ee if ee < b else b
        if s >= t:
            continue
        m = ((1 << ((t - s) // _SECTOR)) - 1) << ((s - a) // _SECTOR)
        hit = need & m
        if not hit:
            continue
        need ^= hit
        if hit == m:
            src = e.src
            if type(src) is tuple and len(src) == 1 and s == es and t == ee:
                whole.append((s - base, src[0]))  # the common case, inlined: one whole block
            else:
                plan.add(e, s, t)
        else:
            for rs, rt in zip(*_runs(hit, a), strict=True):
                plan.add(e, rs, rt)
    starts, ends = _runs(need, a)
    return list(zip(starts, ends, strict=True))


def _runs(bits: int, a: int) -> tuple[list[int], list[int]]:
    """The byte ranges of the runs of set bits in a sector mask based at ``a``, sorted."""
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    while bits:
        low = (bits & -bits).bit_length() - 1  # trailing zeros
        bits >>= low
        pos += low
        ones = (bits ^ (bits + 1)).bit_length() - 1  # trailing ones
        starts.append(a + pos * _SECTOR)
        ends.append(a + (pos + ones) * _SECTOR)
        bits >>= ones
        pos += ones
    return starts, ends


def _resolve_bytes(
    lst: list[Extent], j: int, starts: list[int], ends: list[int], plan: _Plan
) -> list[tuple[int, int]]:
    """The general walk: unresolved ranges as two parallel sorted lists of any byte bounds.

    Each older version finds the ranges it overlaps by bisection.
    """
    while j > 0 and starts:
        j -= 1
        e = lst[j]
        es, ee = e.offset, e.offset + e.length
        k = bisect_right(ends, es)
        if k == len(starts) or starts[k] >= ee:
            continue
        m = k
        keep_s: list[int] = []
        keep_e: list[int] = []
        while m < len(starts) and starts[m] < ee:
            a, b = starts[m], ends[m]
            s = a if a > es else es
            t = b if b < ee else ee
            plan.add(e, s, t)
            if a < s:
                keep_s.append(a)
                keep_e.append(s)
            if t < b:
                keep_s.append(t)
                keep_e.append(b)
            m += 1
        starts[k:m] = keep_s
        ends[k:m] = keep_e
    return list(zip(starts, ends, strict=True))
