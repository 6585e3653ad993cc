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
    ) -> None:
        self._fetch = fetch
        self._fetch_many = fetch_many
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

    def read_into(self, out: memoryview, offset: int, at_seq: int, cache: BlockCache) -> None:
        """Fill ``out`` (zeroed by the caller) with bytes [offset, offset+len(out)) as of seq.

        Two passes: plan which version supplies each byte range, then fetch every block the
        plan needs in one ``get_many`` (sorted, coalesced pack reads) and copy.
        """
        end = offset + len(out)
        cs = self.chunk_size
        fills: list[tuple[int, int, BlockRef | File, int]] = []  # dst, length, source, src off
        for c in self.chunk_range(offset, len(out)):
            # Still-unresolved ranges of this chunk, disjoint and sorted (two parallel lists
            # so each older version finds the ranges it overlaps by bisection).
            starts = [max(offset, c * cs)]
            ends = [min(end, (c + 1) * cs)]
            lst = self.chunks.get(c)
            if lst:
                j = bisect_right(lst, at_seq, key=_seq_key)
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
                        if e.src is not None:
                            _plan(fills, s - offset, e, s, t)
                        if a < s:
                            keep_s.append(a)
                            keep_e.append(s)
                        if t < b:
                            keep_s.append(t)
                            keep_e.append(b)
                        m += 1
                    starts[k:m] = keep_s
                    ends[k:m] = keep_e
            if starts:
                ref = self.base.get(c)
                if ref is not None:
                    for a, b in zip(starts, ends, strict=True):
                        fills.append((a - offset, b - a, ref, a - c * cs))
        blocks = cache.get_many([f[2] for f in fills if isinstance(f[2], BlockRef)])
        for dst, n, src, soff in fills:
            if isinstance(src, BlockRef):
                out[dst : dst + n] = blocks[src.block_id][soff : soff + n]
            else:
                data = src.pread(n, soff)
                out[dst : dst + len(data)] = data


def _plan(
    fills: list[tuple[int, int, BlockRef | File, int]], dst: int, e: Extent, s: int, t: int
) -> None:
    src = e.src
    if isinstance(src, Inline):
        fills.append((dst, t - s, src.file, src.offset + (s - e.offset)))
        return
    assert src is not None
    pos = e.offset
    for ref in src:
        rs, re_ = pos, pos + ref.length
        pos = re_
        if re_ <= s:
            continue
        if rs >= t:
            break
        a, b = max(rs, s), min(re_, t)
        fills.append((dst + (a - s), b - a, ref, a - rs))
