"""A past point served over NBD at once, without materializing it (instant export).

Reads come from the journal (or a snapshot's manifest) at the point; nothing is copied up
front, so a 1 TiB volume is exported as fast as a 1 GiB one. With ``writable`` the writes go
to a throwaway overlay (a sparse file deleted at the end, copy-on-write per chunk): the
journal and the live volume are never touched, so a VM can be booted from a past state, a
file picked out, or a point checked before a rollback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cdp.nbd import proto
from cdp.nbd.export import Export
from journal import Journal


class PointExport(Export):
    def __init__(
        self,
        name: str,
        size: int,
        journal: Callable[[], Journal],
        *,
        seq: int,
        snapshot: str | None,
        overlay: str,
        writable: bool,
        chunk_size: int,
    ) -> None:
        super().__init__(
            name, size, overlay, journal, chunk_size=chunk_size, read_only=not writable
        )
        self.seq = seq
        self.snapshot = snapshot
        self.written: set[int] = set()  # overlay chunks, copied from the point on first write

    def open(self) -> None:
        if not self.read_only:
            self.fd = os.open(self.image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            os.unlink(self.image)

    def _point(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        j = self._journal()
        if self.snapshot is not None:
            j.read_snapshot_into(self.snapshot, self.name, offset, memoryview(buf))
        else:
            j.read_into(self.name, offset, memoryview(buf), self.seq)
        return bytes(buf)

    def read(self, offset: int, length: int) -> bytes:
        self.stats.reads += 1
        self.stats.bytes_read += length
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        if not self.written or not any(c in self.written for c in range(first, last + 1)):
            return self._point(offset, length)
        out = bytearray()
        pos = offset
        while pos < offset + length:
            c = pos // cs
            n = min((c + 1) * cs, offset + length) - pos
            out += os.pread(self.fd, n, pos) if c in self.written else self._point(pos, n)
            pos += n
        return bytes(out)

    def _cow(self, offset: int, length: int) -> None:
        cs = self.chunk_size
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            if c not in self.written:
                start = c * cs
                n = min(cs, self.size - start)
                os.pwrite(self.fd, self._point(start, n), start)
                self.written.add(c)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        if self.read_only:
            return proto.EPERM
        try:
            self._cow(offset, len(data))
            os.pwrite(self.fd, data, offset)
        except OSError:
            return proto.EIO
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        return 0

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool) -> int:
        step = 1 << 20  # a 4 GiB WRITE_ZEROES must not allocate 4 GiB
        for pos in range(offset, offset + length, step):
            err = self.write(pos, bytes(min(step, offset + length - pos)))
            if err:
                return err
        return 0

    def commit(self) -> None:
        return None  # nothing is journaled: the overlay is throwaway

    async def flush(self) -> None:
        return None  # durability of a throwaway overlay buys nothing

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]  # all data: the point's allocation is not tracked here
