"""``cdp restore VOLUME --at WHEN --output FILE [--force]``: write a point as a raw image.

The output is a sparse raw image of the volume at WHEN. It never replaces an existing file,
and never follows a symlink, unless ``--force`` is given: a mistyped ``--output`` must not
overwrite a live disk image.

Steps: WHEN becomes the API's ``when`` object (relative times against this process's clock),
``POST /v1/resolve`` pins it to a seq, and ``GET /v1/volumes/{name}/image?seq=N`` streams that
point into FILE. All-zero 64 KiB runs are skipped with a seek instead of written, the file is
truncated to the volume size, synced, and its size checked against the volume's; a transfer
that fails or comes up short deletes the partial file and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from cdp.cli.common import (
    Subparsers,
    add_verb,
    api_client,
    approx_size,
    load,
    point_time,
    retained_window_error,
    volumes_for,
    when_to_api,
)
from cdp.errors import OperationFailed, OutputExists, PointNotRetained, UsageError
from cdp.when import parse_when

if TYPE_CHECKING:
    from cdp.cli.api_client import ApiClient

__all__ = ["SPARSE_BLOCK", "SparseWriter", "check_output_path", "open_output", "run"]

SPARSE_BLOCK: Final = 64 * 1024


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "restore",
        help="write a volume as it was at WHEN to a sparse raw image",
        description="Write VOLUME as it was at WHEN to FILE (a sparse raw image).\n\n"
        "WHEN: 2026-11-22T03:15:00Z, -15m, checkpoint:NAME, snapshot:ID, seq:N or latest.",
    )
    parser.add_argument("volume", metavar="VOLUME", help="volume name")
    parser.add_argument("--at", metavar="WHEN", required=True, help="point to restore")
    parser.add_argument("--output", metavar="FILE", required=True, help="image to write")
    parser.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (even a symlink)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Usage problems (exit 2) first, then the checks that depend on the filesystem (exit 1).
    when = parse_when(args.at, now_ns=time.time_ns())
    config = load(args)
    volumes_for(config, args.volume, None)
    output = Path(os.path.abspath(args.output))
    check_output_path(output, force=args.force)
    client = api_client(config)
    try:
        point = asyncio.run(
            client.post("/v1/resolve", {"volume": args.volume, "when": when_to_api(when)})
        )
    except PointNotRetained as e:
        raise retained_window_error(e, args.at, args.volume) from e
    seq, size = point.get("seq"), point.get("size")
    if not isinstance(seq, int) or not isinstance(size, int) or size < 0:
        raise OperationFailed(f"the daemon's reply to resolve is incomplete: {point}")

    fd = open_output(output, force=args.force)
    try:
        allocated = _fill(fd, client, args.volume, seq, size)
    except BaseException as e:
        _discard(fd, output)
        if isinstance(e, PointNotRetained):  # folded away between resolve and download
            raise retained_window_error(e, args.at, args.volume) from e
        raise
    os.close(fd)
    _sync_folder(output.parent)
    print(
        f"restored {args.volume} at seq {seq} ({point_time(point.get('ts_ns'))}) "
        f"to {args.output}: {size} bytes, {approx_size(allocated)} allocated"
    )
    return 0


def check_output_path(path: Path, *, force: bool) -> None:
    """Refuse an existing file or a symlink at *path* unless *force*; require its folder.

    This is an early, friendly check; whoever writes the file must still open it with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (unless forced), since the path can change in between.

    Raises:
        OutputExists: *path* exists or is a symlink (dangling or not) and not *force*.
        UsageError: the folder of *path* does not exist.
    """
    if not force:
        if path.is_symlink():
            raise OutputExists(os.fspath(path), "is a symlink; refusing to follow it")
        if path.exists():
            raise OutputExists(os.fspath(path), "already exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory for --output")


def open_output(path: Path, *, force: bool) -> int:
    """Open *path* for writing: create it, or with *force* truncate it (following symlinks).

    Without *force* the open itself refuses an existing file or a symlink
    (``O_EXCL | O_NOFOLLOW``), so a file that appeared after :func:`check_output_path` is
    still safe. The file is created mode 0600: a disk image holds everything on the disk.

    Raises:
        OutputExists: *path* exists or is a symlink and not *force*.
        OperationFailed: any other reason the file cannot be opened.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError as e:
        if path.is_symlink():
            raise OutputExists(os.fspath(path), "is a symlink; refusing to follow it") from e
        raise OutputExists(os.fspath(path), "already exists; refusing to overwrite it") from e
    except OSError as e:
        if not force and path.is_symlink():  # ELOOP from O_NOFOLLOW
            raise OutputExists(os.fspath(path), "is a symlink; refusing to follow it") from e
        raise OperationFailed(f"{path}: cannot write the image: {e.strerror or e}") from e


class SparseWriter:
    """Writes a stream of bytes to *fd* from offset 0, seeking over all-zero blocks.

    The stream is cut into :data:`SPARSE_BLOCK` blocks at fixed offsets; a block of zeros is
    not written (the file system leaves a hole). Consecutive data blocks go out in one
    ``pwrite``. With ``sparse=False`` (a block device) zeros are written like any data.
    :meth:`finish` writes the last partial block and, when sparse, truncates the file to the
    stream's length, so trailing holes are part of the file.
    """

    def __init__(self, fd: int, *, sparse: bool = True) -> None:
        self.fd = fd
        self.sparse = sparse
        self.position = 0  # bytes of the stream consumed (written or skipped)
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % SPARSE_BLOCK
        if whole:
            self._emit(memoryview(self._pending)[:whole])
            del self._pending[:whole]

    def finish(self) -> int:
        """Write what is left; returns the stream length."""
        if self._pending:
            self._emit(memoryview(self._pending))
            self._pending.clear()
        if self.sparse:
            os.ftruncate(self.fd, self.position)
        return self.position

    def _emit(self, data: memoryview) -> None:
        zero = bytes(SPARSE_BLOCK)
        run_start = None  # start, within data, of the current run of data blocks
        for off in range(0, len(data), SPARSE_BLOCK):
            block = data[off : off + SPARSE_BLOCK]
            # bytes() first: comparing a memoryview goes element by element, 30x slower.
            if self.sparse and bytes(block) == zero[: len(block)]:
                if run_start is not None:
                    self._pwrite(data[run_start:off], self.position + run_start)
                    run_start = None
            elif run_start is None:
                run_start = off
        if run_start is not None:
            self._pwrite(data[run_start:], self.position + run_start)
        self.position += len(data)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n


def _fill(fd: int, client: ApiClient, volume: str, seq: int, size: int) -> int:
    """Stream the image at *seq* into *fd*; returns the bytes allocated on disk."""
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    writer = SparseWriter(fd, sparse=regular)
    got = asyncio.run(
        client.download(f"/v1/volumes/{quote(volume, safe='')}/image?seq={seq}", writer.write)
    )
    length = writer.finish()
    served_seq = got.headers.get("X-Cdp-Seq")
    if served_seq is not None and served_seq != str(seq):
        raise OperationFailed(f"the daemon sent seq {served_seq} instead of seq {seq}")
    if got.received != size or length != size:
        raise OperationFailed(
            f"the image of {volume} is {size} bytes but {got.received} arrived; "
            "the partial output was discarded"
        )
    os.fsync(fd)
    st = os.fstat(fd)
    if regular and st.st_size != size:
        raise OperationFailed(f"the restored file is {st.st_size} bytes, expected {size}")
    return st.st_blocks * 512 if regular else size


def _sync_folder(path: Path) -> None:
    """Make the new directory entry durable too (best effort: not every file system can)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(fd: int, path: Path) -> None:
    """Remove a partial output: unlink the file we created or truncated.

    With ``--force`` through a symlink, the file written is the link's target; the link is
    kept and the target left empty, since removing the link would not remove the data.
    """
    try:
        st = os.fstat(fd)
        try:
            here = os.lstat(path)
        except FileNotFoundError:
            here = None
        if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
        elif stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
    except OSError:
        pass
    finally:
        os.close(fd)
