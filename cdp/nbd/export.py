"""One volume served over NBD: the image file is the disk, the journal gets every write.

The splitter's rule (R1): a write is in the image *and* appended to the journal (handed to
the OS) before it is acknowledged; FUA and FLUSH make both durable first. Both happen on the
event loop thread, in the order requests arrive, so overlapping writes land in the image
and the journal in the order the client sent them, and seq order is write order.

Production first: when the journal cannot take a write (ENOSPC, EIO), the write still goes to
the image and is acknowledged; the export remembers the changed chunks, status says the
volume's protection is broken, and ``repair()`` captures those chunks once the journal works
again, leaving a visible gap in history. An error of the image itself goes to the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cdp.nbd import proto
from journal import CheckpointKind, Journal, JournalError
from journal.journal import WriteOp

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name, use_errno=True) if _libc_name else None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (reads as zeros); False when the filesystem cannot."""
    if _libc is None:
        return False
    r = _libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    )
    return bool(r == 0)


def _errno_for(e: OSError) -> int:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return proto.ENOSPC
    return proto.EIO


@dataclass(slots=True)
class Gap:
    """A stretch of time in which the journal missed writes (captured later by repair)."""

    started_ns: int
    reason: str
    ended_ns: int | None = None
    resumed_seq: int | None = None


@dataclass(slots=True)
class ExportStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    connections: int = 0


class Export:
    def __init__(
        self,
        name: str,
        size: int,
        image: str,
        journal: Callable[[], Journal],
        *,
        chunk_size: int = 64 * 1024,
        read_only: bool = False,
    ) -> None:
        self.name = name
        self.size = size
        self.image = image
        self._journal = journal
        self.chunk_size = chunk_size
        self.read_only = read_only
        self.fd = -1
        self.dirty: set[int] = set()
        self.gaps: list[Gap] = []
        self.stats = ExportStats()
        self.connections: set[object] = set()
        self._write_gen = 0
        self._flushed_gen = 0
        self._flush_lock = asyncio.Lock()
        self._queue: list[WriteOp] = []
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Open (creating a sparse image if needed); an image larger than the volume is refused."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.image, flags, 0o600)
        st = os.fstat(fd)
        if st.st_size > self.size:
            os.close(fd)
            raise ValueError(
                f"{self.image} is {st.st_size} bytes, larger than volume "
                f"{self.name!r} ({self.size} bytes): fix the volume size"
            )
        if st.st_size < self.size:
            os.ftruncate(fd, self.size)
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1

    @property
    def protected(self) -> bool:
        return not self.gaps or self.gaps[-1].ended_ns is not None

    # ------------------------------------------------------------------ journal side
    def commit(self) -> None:
        """Append the queued writes and zeroes to the journal, in order, with one writev.

        The server calls this at the end of each batch of requests, before any reply of the
        batch is sent, so every acknowledged write is in the journal (handed to the OS).
        """
        ops = self._queue
        if not ops:
            return
        self._queue = []
        if self.protected:
            try:
                self._journal().write_many(self.name, ops)
                return
            except (JournalError, OSError) as e:
                self._broken(str(e))
        cs = self.chunk_size
        for offset, data, length, _ in ops:
            n = len(data) if data is not None else length
            self.dirty.update(range(offset // cs, (offset + n + cs - 1) // cs))

    def _broken(self, reason: str) -> None:
        self.gaps.append(Gap(time.time_ns(), reason))
        self.last_error = reason
        log.error(
            "journal failed; guest writes continue, protection is broken",
            extra={"volume": self.name, "err": reason},
        )

    def repair_step(self, journal: Journal, max_chunks: int = 64) -> int | None:
        """Capture up to ``max_chunks`` chunks written while the journal failed.

        Runs on the loop thread, so no guest write falls between reading a chunk and
        journaling it; the caller yields between steps, so a large backlog never stalls
        guest I/O. Guest writes meanwhile keep marking chunks dirty. When none are left,
        the gap is closed and the seq protection resumes at is returned (else None).
        """
        cs = self.chunk_size
        for c in list(itertools.islice(self.dirty, max_chunks)):
            off = c * cs
            n = min(cs, self.size - off)
            data = os.pread(self.fd, n, off)
            if data.count(0) == len(data):
                journal.zero(self.name, off, n)
            else:
                journal.write(self.name, off, data)
            self.dirty.discard(c)  # only once it is in the journal
        if self.dirty:
            return None
        seq = int(journal.checkpoint(f"protection-resumed:{self.name}", CheckpointKind.CRASH))
        gap = self.gaps[-1]
        gap.ended_ns, gap.resumed_seq = time.time_ns(), seq
        log.warning(
            "protection resumed; the gap stays visible in history",
            extra={"volume": self.name, "seq": seq},
        )
        return seq

    # ------------------------------------------------------------------ operations
    def write(self, offset: int, data: bytes | memoryview) -> int:
        """pwrite to the image and queue the journal append; returns an NBD errno (0 = ok).

        ``data`` must stay valid until ``commit()`` (the server commits before reusing it).
        """
        n = len(data)
        done = 0
        try:
            while done < n:
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:
            self.last_error = f"image write failed: {e.strerror}"
            log.error("image write failed", extra={"volume": self.name, "err": str(e)})
            if done:  # what reached the image is journaled too: image and journal agree
                self._queue.append((offset, data[:done], done, False))
                self._write_gen += 1
            return _errno_for(e)
        self._queue.append((offset, data, n, False))
        self._write_gen += 1
        self.stats.writes += 1
        self.stats.bytes_written += n
        return 0

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool) -> int:
        """WRITE_ZEROES or TRIM: journaled as a zero record (never as zero data)."""
        pos = offset
        try:
            if no_hole or not _punch_hole(self.fd, offset, length):
                zeros = bytes(min(length, 1 << 20))
                while pos < offset + length:
                    k = min(len(zeros), offset + length - pos)
                    pos += os.pwrite(self.fd, zeros[:k], pos)
        except OSError as e:
            self.last_error = f"image zero failed: {e.strerror}"
            if pos > offset:  # the zeroed prefix is journaled: image and journal agree
                self._queue.append((offset, None, pos - offset, trim))
                self._write_gen += 1
            return _errno_for(e)
        self._queue.append((offset, None, length, trim))
        self._write_gen += 1
        return 0

    def read(self, offset: int, length: int) -> bytes:
        self.stats.reads += 1
        self.stats.bytes_read += length
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    async def flush(self) -> None:
        """Everything written before this call is durable in the image and the journal.

        Group commit: flushes that arrive while one runs share the next fdatasync.
        """
        self.commit()
        my_gen = self._write_gen
        async with self._flush_lock:
            if self._flushed_gen >= my_gen:
                return
            target = self._write_gen
            # Image and journal are flushed at the same time, each in its own thread.
            image = asyncio.to_thread(os.fdatasync, self.fd)
            if self.protected:
                journal = asyncio.to_thread(self._journal().sync)
                res = await asyncio.gather(image, journal, return_exceptions=True)
                if isinstance(res[1], JournalError | OSError):
                    self._broken(f"journal sync failed: {res[1]}")
                    cs = self.chunk_size  # what the failed sync covered must be recaptured
                    self.dirty.update(range((self.size + cs - 1) // cs))
                elif isinstance(res[1], BaseException):
                    raise res[1]
                if isinstance(res[0], BaseException):
                    raise res[0]  # an image fsync error goes to the guest (EIO)
            else:
                await image
            self._flushed_gen = target
            self.stats.flushes += 1

    def next_data(self, offset: int) -> int:
        """Where the image's data resumes at or after ``offset`` (``size``: only a hole left).

        A hole reads as zeros, so a scan can skip it without reading (and without filling
        the page cache). Where the filesystem cannot tell, every offset counts as data.
        """
        try:
            return min(os.lseek(self.fd, offset, os.SEEK_DATA), self.size)
        except OSError as e:
            return self.size if e.errno == errno.ENXIO else offset

    def drop_cache(self, offset: int, length: int) -> None:
        """Drop the clean page cache of a range this process read in bulk (onboarding).

        Readahead caches a bulk read in large folios. Left there, each later 4 KiB guest
        write into one walks and dirties the whole folio (ext4_block_write_begin was a third
        of the loop thread's CPU in the 4 KiB QD16 benchmark); dropped, guest writes get
        small folios of their own, as they do on an image nobody read. Dirty pages are only
        started towards the disk, never lost.
        """
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents from the image's holes (SEEK_DATA / SEEK_HOLE)."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole up to the end of the file
                    data = end
                else:
                    return [(length, 0)]
            if data > pos:
                n = min(data, end) - pos
                out.append((n, proto.STATE_HOLE | proto.STATE_ZERO))
                pos += n
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            out.append((n, 0))
            pos += n
        return out or [(length, 0)]


@dataclass(slots=True)
class ExportSet:
    """The exports one listener serves, by export name (= volume name)."""

    exports: dict[str, Export] = field(default_factory=dict)
    shutting_down: bool = False
