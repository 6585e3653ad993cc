"""The thin file layer every durable byte of the journal goes through.

Why a layer: power loss does not behave like kill -9. Tests swap ``OsStorage`` for
``tests.journal.faulty_storage.FaultyStorage``, which keeps what was written but not yet
fsynced in a volatile cache and, at a simulated crash, drops, tears or reorders it. The
journal's recovery rule is tested against every such crash image.

Semantics the journal relies on (and nothing more):
- ``File.append`` hands bytes to the OS (survives kill -9, not power loss).
- ``File.sync`` makes the file's data durable (fdatasync).
- ``Storage.sync_dir`` makes creations, renames and removals in a folder durable.
- ``Storage.replace`` is an atomic rename.
- ``File.forget`` is a hint about caching only; it never changes what any read returns.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Sequence
from typing import Protocol


class File(Protocol):
    path: str

    def append(self, parts: Sequence[bytes | memoryview]) -> int:
        """Write parts at the end of the file; return the offset they start at."""

    def pread(self, size: int, offset: int) -> bytes: ...

    def size(self) -> int: ...

    def sync(self) -> None: ...

    def forget(self, upto: int) -> None:
        """The bytes before ``upto`` are durable and will not be read soon: drop them from cache."""

    def truncate(self, size: int) -> None: ...

    def close(self) -> None: ...


class Storage(Protocol):
    def open(self, path: str, *, create: bool = False) -> File:
        """Open for reading and appending; ``create`` makes a new empty file (must not exist)."""

    def read_all(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def makedirs(self, path: str) -> None: ...

    def replace(self, src: str, dst: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def sync_dir(self, path: str) -> None: ...


_IOV_MAX = 1024
_PAGE = mmap.PAGESIZE
_MAX_FOLIO = 2 * 1024 * 1024


class OsFile:
    """A file opened O_RDWR|O_APPEND; appends go out with one writev (no user-space buffer)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._mm: mmap.mmap | None = None
        self._mm_lock = threading.Lock()
        self._forgotten = 0  # cached pages before this offset were already dropped

    def append(self, parts: Sequence[bytes | memoryview]) -> int:
        start = self._size
        for i in range(0, len(parts), _IOV_MAX):
            group = parts[i : i + _IOV_MAX]
            total = sum(map(len, group))
            written = os.writev(self._fd, group)
            if written < total:  # short writes are legal; finish the rest
                flat = b"".join(bytes(p) for p in group)[written:]
                while flat:
                    flat = flat[os.write(self._fd, flat) :]
            self._size += total
        return start

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def mapped_read(self, size: int, offset: int) -> bytes:
        """Like pread, from a read-only mapping: no syscall per call for small scattered reads.

        The file only grows while open (append-only), so a mapping stays valid; it is
        remapped when a read goes past it. Old mappings are left to the garbage collector, so
        a reader in another thread never sees one closed under it.
        """
        mm = self._mm
        if mm is None or offset + size > len(mm):
            with self._mm_lock:
                mm = self._mm
                if mm is None or offset + size > len(mm):
                    if self._size == 0 or offset + size > self._size:
                        return self.pread(size, offset)
                    mm = mmap.mmap(self._fd, self._size, prot=mmap.PROT_READ)
                    self._mm = mm
        return mm[offset : offset + size]

    def view(self, need: int) -> memoryview | None:
        """The file as a read-only mapping at least ``need`` bytes long (None if shorter).

        For readers that check and copy many entries of one file per call: slicing a view
        costs no syscall and no intermediate bytes object. Same lifetime rules as
        ``mapped_read``; a caller keeps a view only for the duration of one call.
        """
        mm = self._mm
        if mm is None or need > len(mm):
            with self._mm_lock:
                mm = self._mm
                if mm is None or need > len(mm):
                    if self._size == 0 or need > self._size:
                        return None
                    mm = mmap.mmap(self._fd, self._size, prot=mmap.PROT_READ)
                    self._mm = mm
        return memoryview(mm)

    def size(self) -> int:
        return self._size

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def forget(self, upto: int) -> None:
        """Drop the clean cached pages of ``[0, upto)`` (POSIX_FADV_DONTNEED).

        Why: packs are written once and read rarely, yet every byte
        written takes a page of the page cache, and a page cache that only grows keeps
        claiming pages the machine has not touched yet. In a VM those cost a fault into
        the hypervisor each (measured here: about 2 CPU-s per GB written into new pages
        against 0.6 when the same pages are reused). Dropped pages return to the free
        list warm and the next append reuses them; the journal also stops crowding the
        guests' images out of the host's cache. Pages still mapped by a reader, or dirty,
        are left alone by the kernel, so this never changes what a read returns.
        """
        end = min(upto, self._size) & ~(_PAGE - 1)
        if end <= self._forgotten or not hasattr(os, "posix_fadvise"):
            return
        # The kernel drops only folios wholly inside the range, and a folio can be larger
        # than a page (up to a PMD, 2 MiB): start a folio's worth before the last mark, so
        # the one that straddled it is dropped now.
        start = max(0, self._forgotten - _MAX_FOLIO)
        try:
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            return  # a hint; a filesystem that refuses it only keeps its cache
        self._forgotten = end

    def truncate(self, size: int) -> None:
        self._mm = None  # never read through a mapping past the new end
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self._size = size
        self._forgotten = min(self._forgotten, size & ~(_PAGE - 1))

    def close(self) -> None:
        self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OsStorage:
    """The real thing."""

    def open(self, path: str, *, create: bool = False) -> OsFile:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        return OsFile(path, os.open(path, flags, 0o640))

    def read_all(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o750, exist_ok=True)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        os.remove(path)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(storage: Storage, path: str, data: bytes) -> None:
    """tmp, write, fsync, rename, fsync(dir): the file is either old or new after any crash."""
    tmp = path + ".tmp"
    if storage.exists(tmp):
        storage.remove(tmp)
    f = storage.open(tmp, create=True)
    try:
        f.append([data])
        f.sync()
    finally:
        f.close()
    storage.replace(tmp, path)
    storage.sync_dir(os.path.dirname(path) or ".")
