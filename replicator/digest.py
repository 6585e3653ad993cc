"""Per-chunk digests of a volume at a point: how `verify` compares two sites.

Both sites hash the same chunks (the journal's chunk size) of the same seq with BLAKE3, so
only 32 bytes per chunk cross the WAN, and a mismatch names the chunk that differs.
"""

from __future__ import annotations

import blake3

from journal import Journal

SPAN = 4 << 20


def chunk_digests(j: Journal, volume: str, seq: int, first: int, count: int) -> list[bytes]:
    """BLAKE3 of chunks [first, first+count) of ``volume`` as of ``seq`` (fewer at the end)."""
    cs = j.opts.chunk_size
    size = j.volume_size(volume)
    if first < 0 or count < 0:
        raise ValueError("first and count must not be negative")
    start = first * cs
    end = min(size, (first + count) * cs)
    out: list[bytes] = []
    cache = j.new_cache()
    per = max(1, SPAN // cs)
    pos = start
    while pos < end:
        n = min(per * cs, end - pos)
        buf = bytearray(n)
        j.read_into(volume, pos, memoryview(buf), seq, cache)
        view = memoryview(buf)
        for k in range(0, n, cs):
            out.append(blake3.blake3(view[k : k + cs]).digest())
        pos += n
    return out
