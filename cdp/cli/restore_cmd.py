"""``cdp restore VOLUME|--group G --at WHEN --output PATH [--format FMT] [--force]``.

Writes a point as a disk image: a sparse raw image by default, or qcow2, vmdk or vhdx (made
by ``qemu-img convert``) so a point can be brought up on another hypervisor. The output never
replaces an existing file, and never follows a symlink, unless ``--force`` is given: a
mistyped ``--output`` must not overwrite a live disk image.

Steps: WHEN becomes the API's ``when`` object (relative times against this process's clock),
``POST /v1/resolve`` pins it to a seq, and ``GET /v1/volumes/{name}/image?seq=N`` streams that
point. All-zero 64 KiB runs are skipped with a seek instead of written, the file is truncated
to the volume size, synced, and its size checked against the volume's; a transfer that fails
or comes up short deletes the partial file and exits 1.

``--format raw`` streams straight into PATH (opened ``O_CREAT | O_EXCL | O_NOFOLLOW`` unless
forced). Other formats first reserve PATH the same way (an empty placeholder), stream into a
hidden sparse raw file next to it, convert that with ``qemu-img convert -f raw -O FMT`` into a
second hidden file, and rename the result over the placeholder: PATH appears complete or not
at all. The hidden files are removed whatever happens (failure, Ctrl-C, SIGTERM, SIGHUP).

``--group G`` restores every volume of the group at one seq: WHEN is resolved once (for the
group's first volume; the group shares one journal, so one seq), and each volume is written
at that seq to ``PATH/VOLUME.FMT``; PATH is a folder, created if missing. A group restore is
all or nothing: if one volume fails, the images this run already wrote are removed.

On a terminal (stderr is a tty) a progress line shows bytes done / total, rate and ETA; when
stderr is not a terminal nothing but the errors is written there, so output stays stable for
scripts. stdout gets one summary line per volume.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final, TextIO
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

__all__ = [
    "FORMATS",
    "SPARSE_BLOCK",
    "Progress",
    "SparseWriter",
    "check_output_path",
    "open_output",
    "run",
]

SPARSE_BLOCK: Final = 64 * 1024
FORMATS: Final = ("raw", "qcow2", "vmdk", "vhdx")
"""``--format`` values; each is also the file extension a group restore uses."""

QEMU_IMG: Final = "qemu-img"
_QEMU_HINT: Final = "run scripts/bootstrap (it installs qemu-utils), or use --format raw"
_TEMP_MARK: Final = ".cdp-tmp"
_TERMINATING_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "restore",
        help="write a volume or group as it was at WHEN to disk images",
        description="Write VOLUME as it was at WHEN to PATH (a sparse raw image, or qcow2, "
        "vmdk or vhdx\nmade with qemu-img). With --group G, every volume of the group at "
        "the same point,\neach to PATH/VOLUME.FORMAT (PATH is a folder, created if missing).\n\n"
        "WHEN: 2026-11-22T03:15:00Z, -15m, checkpoint:NAME, snapshot:ID, seq:N or latest.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("volume", nargs="?", metavar="VOLUME", help="volume name")
    target.add_argument("--group", metavar="G", help="consistency group name")
    parser.add_argument("--at", metavar="WHEN", required=True, help="point to restore")
    parser.add_argument(
        "--output",
        metavar="PATH",
        required=True,
        help="image to write (with --group: folder to write one image per volume into)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="raw",
        help="image format (default raw; the others need qemu-img)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing images (even through a symlink)"
    )
    parser.set_defaults(run=run)


@dataclass(frozen=True, slots=True)
class _Target:
    volume: str
    path: Path  # absolute
    shown: str  # as the user wrote it, for messages


@dataclass(frozen=True, slots=True)
class _Written:
    target: _Target
    size: int
    allocated: int
    ident: tuple[int, int]  # (st_dev, st_ino) of the image file written


def run(args: argparse.Namespace) -> int:
    # Usage problems (exit 2) first, then the checks that depend on the filesystem (exit 1),
    # then the daemon.
    when = parse_when(args.at, now_ns=time.time_ns())
    config = load(args)
    members = volumes_for(config, args.volume, args.group)
    fmt: str = args.format
    output = Path(os.path.abspath(args.output))
    folder_exists = True
    if args.group is None:
        check_output_path(output, force=args.force)
    else:
        folder_exists = _check_output_folder(output)
    qemu_img = find_qemu_img(fmt) if fmt != "raw" else None

    client = api_client(config)
    if args.group is None:
        names: Sequence[str] = (args.volume,)
    elif members:
        names = tuple(v.name for v in members)
    else:  # a DR-site config names no volumes: the daemon knows the group's members
        names = _group_members(client, args.group)
    targets = [_target(args, output, name, fmt) for name in names]
    if args.group is not None and folder_exists:
        for t in targets:
            check_output_path(t.path, force=args.force)

    # One seq for all: resolve WHEN once, then each volume's size at that seq.
    first = _resolve(client, targets[0].volume, when_to_api(when), args.at)
    seq, ts_ns = first["seq"], first.get("ts_ns")
    points = [first]
    for t in targets[1:]:
        points.append(_resolve(client, t.volume, {"kind": "seq", "seq": seq}, args.at))
    for t, point in zip(targets, points, strict=True):
        if point["seq"] != seq:
            raise OperationFailed(f"the daemon resolved seq {seq} of {t.volume} to {point['seq']}")
        if args.group is not None and point.get("group") != args.group:
            raise OperationFailed(
                f"the daemon has volume {t.volume} in group {point.get('group')!r}, "
                f"not {args.group!r}: its config differs from {config.path}",
                hint="restart the daemon with this config, or pass the config it runs with",
            )

    with _signals_raise():
        try:
            written = _restore_all(client, targets, points, fmt, qemu_img, args, folder_exists)
        except _Terminated as e:
            print(f"Error: terminated by {e.name}; the partial output was removed", file=sys.stderr)
            return 128 + e.signum
    for w in written:
        how = "" if fmt == "raw" else f" as {fmt}"
        print(
            f"restored {w.target.volume} at seq {seq} ({point_time(ts_ns)}) to "
            f"{w.target.shown}{how}: {w.size} bytes, {approx_size(w.allocated)} allocated"
        )
    return 0


def _target(args: argparse.Namespace, output: Path, volume: str, fmt: str) -> _Target:
    if args.group is None:
        return _Target(volume, output, args.output)
    if "/" in volume or volume in ("", ".", ".."):  # names from a daemon's status document
        raise OperationFailed(f"the daemon names a volume {volume!r}, not a usable file name")
    name = f"{volume}.{fmt}"
    return _Target(volume, output / name, os.path.join(args.output, name))


def _resolve(client: ApiClient, volume: str, when: dict[str, object], at: str) -> dict[str, object]:
    try:
        point = asyncio.run(client.post("/v1/resolve", {"volume": volume, "when": when}))
    except PointNotRetained as e:
        raise retained_window_error(e, at, volume) from e
    seq, size = point.get("seq"), point.get("size")
    if not isinstance(seq, int) or not isinstance(size, int) or size < 0:
        raise OperationFailed(f"the daemon's reply to resolve is incomplete: {point}")
    return point


def _group_members(client: ApiClient, group: str) -> tuple[str, ...]:
    doc = asyncio.run(client.get("/v1/status"))
    groups = doc.get("groups")
    for g in groups if isinstance(groups, list) else ():
        if isinstance(g, dict) and g.get("name") == group:
            vols = g.get("volumes")
            if isinstance(vols, list) and vols and all(isinstance(v, str) for v in vols):
                return tuple(vols)
            raise OperationFailed(f"the daemon lists no volumes for group {group!r}")
    raise OperationFailed(f"no group named {group!r} at the daemon", hint="cdp status")


def _restore_all(
    client: ApiClient,
    targets: Sequence[_Target],
    points: Sequence[dict[str, object]],
    fmt: str,
    qemu_img: str | None,
    args: argparse.Namespace,
    folder_exists: bool,
) -> list[_Written]:
    """Write every target; on any failure remove what this run wrote (all or nothing)."""
    made: list[Path] = []
    written: list[_Written] = []
    try:
        if not folder_exists:
            made = _make_folder(targets[0].path.parent)
        for i, (t, point) in enumerate(zip(targets, points, strict=True), start=1):
            seq, size = point["seq"], point["size"]
            assert isinstance(seq, int) and isinstance(size, int)
            label = t.volume if len(targets) == 1 else f"{t.volume} ({i}/{len(targets)})"
            try:
                if qemu_img is None:
                    written.append(_restore_raw(client, t, seq, size, args.force, label))
                else:
                    written.append(
                        _restore_converted(client, t, seq, size, fmt, qemu_img, args.force, label)
                    )
            except PointNotRetained as e:  # folded away between resolve and download
                raise retained_window_error(e, args.at, t.volume) from e
    except BaseException:
        for w in written:
            _unlink_if(w.target.path, w.ident)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise
    return written


def _check_output_folder(path: Path) -> bool:
    """For ``--group``: *path* must be a folder (a symlink to one is fine) or not exist.

    Returns whether it exists. Its parent folders are created with it when missing.
    """
    if path.is_dir():
        return True
    if path.exists() or path.is_symlink():
        raise OutputExists(
            os.fspath(path), "is not a folder; --group writes one image per volume into a folder"
        )
    return False


def _make_folder(path: Path) -> list[Path]:
    """Create the ``--group`` output folder and its missing parents; returns those it made.

    Deepest first, so that removing them in order (each only if empty) undoes the call.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise OutputExists(os.fspath(path), "is not a folder") from None
        return []
    except OSError as e:
        raise OperationFailed(f"{path}: cannot create the folder: {e.strerror or e}") from e
    if missing:
        _sync_folder(missing[-1].parent)
    return missing


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


def find_qemu_img(fmt: str) -> str:
    """The ``qemu-img`` on PATH, needed for *fmt*.

    Raises:
        OperationFailed: it is not installed (the hint names scripts/bootstrap).
    """
    found = shutil.which(QEMU_IMG)
    if found is None:
        raise OperationFailed(
            f"--format {fmt} needs {QEMU_IMG}, which is not installed (not found on PATH)",
            hint=_QEMU_HINT,
        )
    return found


def _restore_raw(
    client: ApiClient, t: _Target, seq: int, size: int, force: bool, label: str
) -> _Written:
    fd = open_output(t.path, force=force)
    try:
        allocated = _fill(fd, client, t.volume, seq, size, label)
        ident = _ident(os.fstat(fd))
        _sync_folder(t.path.parent)
    except BaseException:
        _discard(fd, t.path)
        raise
    os.close(fd)
    return _Written(t, size, allocated, ident)


def _restore_converted(
    client: ApiClient,
    t: _Target,
    seq: int,
    size: int,
    fmt: str,
    qemu_img: str,
    force: bool,
    label: str,
) -> _Written:
    """Reserve the output, restore into a hidden raw file, convert, rename into place."""
    if force:
        # As with raw: through a symlink, the file replaced is the link's target.
        dest = Path(os.path.realpath(t.path))
        if (dest.exists() or dest.is_symlink()) and not dest.is_file():
            raise OperationFailed(
                f"{t.path}: not a regular file; --format {fmt} writes an image file"
            )
        placeholder = None
    else:
        dest = t.path
        placeholder = open_output(dest, force=False)  # O_EXCL | O_NOFOLLOW: the name is ours
    temps: list[Path] = []
    published: tuple[int, int] | None = None
    try:
        raw_fd, raw_path = _temp_file(dest, "raw")
        temps.append(raw_path)
        try:
            _fill(raw_fd, client, t.volume, seq, size, label)
        finally:
            os.close(raw_fd)
        out_fd, out_path = _temp_file(dest, fmt)
        os.close(out_fd)
        temps.append(out_path)
        _convert(qemu_img, fmt, raw_path, out_path, size, label)
        with contextlib.suppress(FileNotFoundError):
            raw_path.unlink()  # converted: free its space now
        fd = os.open(out_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if placeholder is not None and _ident(os.fstat(placeholder)) != _lstat_ident(dest):
            raise OutputExists(os.fspath(dest), "was replaced during the restore; left it alone")
        os.rename(out_path, dest)
        temps.remove(out_path)
        published = _ident(st)
        _sync_folder(dest.parent)
    except BaseException as e:
        if published is not None:  # interrupted right after the rename
            _unlink_if(dest, published)
        if placeholder is not None:
            _discard(placeholder, dest)
            placeholder = None
        if isinstance(e, OSError):
            raise OperationFailed(
                f"{t.path}: cannot write the {fmt} image: {e.strerror or e}"
            ) from e
        raise
    finally:
        for p in temps:
            with contextlib.suppress(OSError):
                p.unlink()
        if placeholder is not None:
            os.close(placeholder)
    return _Written(t, size, st.st_blocks * 512, _ident(st))


def _temp_file(dest: Path, kind: str) -> tuple[int, Path]:
    """A new hidden file next to *dest* (``O_EXCL``, mode 0600): ``.NAME.XXXX.cdp-tmp.KIND``."""
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{dest.name}.", suffix=f"{_TEMP_MARK}.{kind}", dir=dest.parent
        )
    except OSError as e:
        raise OperationFailed(
            f"{dest.parent}: cannot create a temporary file there: {e.strerror or e}"
        ) from e
    return fd, Path(name)


_QEMU_PROGRESS: Final = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")


def _convert(qemu_img: str, fmt: str, src: Path, dst: Path, size: int, label: str) -> None:
    """``qemu-img convert -f raw -O FMT SRC DST``; its progress feeds ours on a terminal.

    Raises:
        OperationFailed: qemu-img failed (its own message is shown) or could not be run.
    """
    progress = Progress(f"{label} to {fmt}", size)
    cmd = [qemu_img, "convert", "-f", "raw", "-O", fmt]
    if progress.enabled:
        cmd.append("-p")  # "    (12.34/100%)\r" on stdout, parsed below
    cmd += [os.fspath(src), os.fspath(dst)]
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError as e:
        raise OperationFailed(f"cannot run {qemu_img}: {e.strerror or e}", hint=_QEMU_HINT) from e
    messages: list[str] = []
    try:
        assert proc.stdout is not None
        pipe = proc.stdout.fileno()
        pending = b""
        while chunk := os.read(pipe, 65536):
            pending += chunk
            *parts, pending = re.split(rb"[\r\n]", pending)
            for part in parts:
                text = part.decode(errors="replace").strip()
                m = _QEMU_PROGRESS.fullmatch(text)
                if m:
                    progress.update(int(size * float(m[1]) / 100))
                elif text:
                    messages.append(text)
        if pending.strip():
            messages.append(pending.decode(errors="replace").strip())
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        progress.close()
        if proc.stdout is not None:
            proc.stdout.close()
    if code != 0:
        detail = "; ".join(messages[-3:]) or f"exit status {code}"
        raise OperationFailed(f"qemu-img could not convert the image to {fmt}: {detail}")


class Progress:
    """One ``\\r`` line on stderr: a bar, bytes done / total, rate and ETA.

    Drawn only when stderr is a terminal, at most ten times a second; :meth:`close` erases
    it so the summary line that follows starts on a clean line. Elsewhere it does nothing.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.done = 0
        self._start = time.monotonic()
        self._drawn_at: float | None = None

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if self._drawn_at is None or now - self._drawn_at >= 0.1 or done >= self.total:
            self._drawn_at = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The line to draw: the bar shrinks (down to nothing) to fit the terminal's width."""
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        figures = (
            f"{approx_size(self.done)} / {approx_size(self.total)} {frac:4.0%} "
            f"{approx_size(int(rate))}/s ETA {_duration(eta)}"
        )
        columns = shutil.get_terminal_size((80, 24)).columns - 1
        width = min(20, columns - len(self.label) - len(figures) - 4)
        if width < 5:
            return f"{self.label} {figures}"[: max(columns, 10)]
        filled = int(frac * width)
        return f"{self.label} [{'#' * filled}{'-' * (width - filled)}] {figures}"

    def close(self) -> None:
        if self.enabled and self._drawn_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


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


def _fill(fd: int, client: ApiClient, volume: str, seq: int, size: int, label: str) -> int:
    """Stream the image at *seq* into *fd*; returns the bytes allocated on disk."""
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    writer = SparseWriter(fd, sparse=regular)
    progress = Progress(label, size)

    def sink(data: bytes) -> None:
        writer.write(data)
        progress.advance(len(data))

    try:
        got = asyncio.run(
            client.download(f"/v1/volumes/{quote(volume, safe='')}/image?seq={seq}", sink)
        )
    finally:
        progress.close()
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


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lstat_ident(path: Path) -> tuple[int, int] | None:
    try:
        return _ident(os.lstat(path))
    except OSError:
        return None


def _unlink_if(path: Path, ident: tuple[int, int]) -> None:
    """Remove *path* if it is still the file this run wrote (not, say, a forced symlink)."""
    if _lstat_ident(path) == ident:
        with contextlib.suppress(OSError):
            os.unlink(path)


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


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a restore: unwinds like Ctrl-C, so every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While restoring, SIGTERM and SIGHUP raise :class:`_Terminated` (Ctrl-C already raises).

    Without this they would end the process on the spot and leave the hidden temporary
    files (and a partial output) behind. Only the main thread can set handlers; elsewhere
    (tests calling ``main`` from a thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    previous = [(sig, signal.signal(sig, handler)) for sig in _TERMINATING_SIGNALS]
    try:
        yield
    finally:
        for sig, old in previous:
            signal.signal(sig, old)
