"""Per-chunk digests of a volume at a point: how `verify` compares two sites.

Both sites hash the same chunks (the journal's chunk size) of the same seq with BLAKE3, so
only 32 bytes per chunk cross the WAN, and a mismatch names the chunk that differs.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The replica's latest compared with the primary at the same seq, chunk by chunk."""

    volume: str
    seq: int
    chunks: int
    chunk_size: int
    mismatched: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatched


def compare_digests(local: list[bytes], remote: bytes, first: int) -> list[int]:
    """Chunk numbers whose digests differ (a short remote answer counts as differing)."""
    out = []
    for k, d in enumerate(local):
        if remote[32 * k : 32 * k + 32] != d:
            out.append(first + k)
    return out
