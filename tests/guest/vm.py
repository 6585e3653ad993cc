"""Boot a real Linux guest under qemu-system-x86_64 (TCG) for tests.

The guest is Debian's own kernel (``linux-image-6.1.0-NN-amd64``, fetched with
``apt-get download``) plus a tiny initramfs made here from ``/bin/busybox`` (package
``busybox-static``) and the dozen modules needed for ext4 on virtio-blk. Its ``/init`` mounts
``/dev/vda`` (ext4) on ``/mnt``, runs ``/mnt/workload.sh`` if present, syncs, unmounts and
powers off. Progress is printed on the serial console as marker lines::

    CDP-GUEST: boot               init started
    CDP-GUEST: mounted /dev/vda   the disk is mounted on /mnt
    CDP-GUEST: start              workload.sh starts (cwd /mnt, stdin /dev/null)
    CDP-GUEST: done rc=N          workload.sh exited with N
    CDP-GUEST: no workload        there was no /mnt/workload.sh
    CDP-GUEST: umount rc=N
    CDP-GUEST: poweroff           about to power off
    CDP-GUEST: error ...          setup failed (insmod, no disk, mount); powers off at once

A workload may print its own markers (``echo "CDP-GUEST: sha256=$sum"``);
:meth:`GuestResult.value` reads the ``key=value`` ones back.

Typical use::

    kernel = guest_kernel_or_skip()            # cached after the first run
    make_ext4_image(img, 64, {"in/a": b"x"}, workload="sha256sum in/a | ...")
    with serve_qemu_nbd(img, sock) as drive:   # or any NBD server: nbd_drive_spec(sock, name)
        result = boot_guest(kernel, drive).check()
    data = read_file_from_image(img, "/out/file")

Kernel command-line options read by ``/init`` (pass with ``kernel_args=``):
``cdp.dev=/dev/vdb`` mounts another disk than ``/dev/vda``.

The kernel, its modules and the initramfs are cached in :func:`default_cache_dir`
(``$CDP_TEST_CACHE/guest``, else ``~/.cache/cdp-tests/guest``), one folder per kernel version.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MARKER",
    "MODULES",
    "GuestKernel",
    "GuestResult",
    "GuestSetupError",
    "GuestUnavailable",
    "boot_guest",
    "default_cache_dir",
    "ensure_guest_kernel",
    "guest_kernel_or_skip",
    "make_ext4_image",
    "nbd_drive_spec",
    "qemu_available",
    "read_file_from_image",
    "serve_qemu_nbd",
]

MARKER = "CDP-GUEST: "

# Load order matters: each module needs the ones before it. virtio_ring must precede virtio,
# or virtio_pci fails with "Unknown symbol register_virtio_device".
MODULES: tuple[str, ...] = (
    "crc16",
    "crc32c_generic",
    "libcrc32c",
    "mbcache",
    "jbd2",
    "ext4",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)

QEMU = "qemu-system-x86_64"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"

# Bump when the initramfs layout changes in a way the recipe hash below does not see.
_INITRD_FORMAT = 1

_INIT_TEMPLATE = r"""#!/bin/busybox sh
# /init of the cdp test guest, written by tests/guest/vm.py. Runs as PID 1.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp

say() { echo "@MARKER@$*"; }
halt_now() {
	sync
	say "poweroff"
	poweroff -f
	sleep 10
}

say "boot"
for m in @MODULES@; do
	if ! insmod "/lib/modules/$m.ko"; then
		say "error insmod $m"
		halt_now
	fi
done

dev=/dev/vda
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	cdp.dev=*) dev="${arg#cdp.dev=}" ;;
	esac
done

i=0
while [ ! -b "$dev" ]; do
	i=$((i + 1))
	if [ "$i" -gt 400 ]; then
		say "error no block device $dev"
		halt_now
	fi
	usleep 50000
done

if ! mount -t ext4 "$dev" /mnt; then
	say "error mount $dev"
	halt_now
fi
say "mounted $dev"

if [ -f /mnt/workload.sh ]; then
	say "start"
	(cd /mnt && sh /mnt/workload.sh </dev/null)
	say "done rc=$?"
else
	say "no workload"
fi

sync
umount /mnt
say "umount rc=$?"
halt_now
"""


class GuestUnavailable(Exception):
    """The guest cannot be had on this machine (no qemu-system-x86_64, kernel not downloadable).

    Tests should skip on this (see :func:`guest_kernel_or_skip`); anything else is a failure.
    """


class GuestSetupError(RuntimeError):
    """Building the guest failed for a reason that is a bug or a broken install."""


@dataclass(frozen=True)
class GuestKernel:
    version: str  # e.g. "6.1.0-56-amd64"
    vmlinuz: Path
    initrd: Path  # gzip-compressed newc cpio


@dataclass
class GuestResult:
    returncode: int  # of qemu (via timeout(1)): 0 after poweroff, 124 on timeout
    console: str  # serial console output, "\r\n" normalised to "\n"
    stderr: str  # qemu's own messages
    markers: list[str]  # text after "CDP-GUEST: " on each console line, in order
    timed_out: bool
    duration_s: float
    command: list[str] = field(repr=False)

    @property
    def workload_rc(self) -> int | None:
        """Exit status of workload.sh, or None if it never finished (or was absent)."""
        for m in reversed(self.markers):
            match = re.fullmatch(r"done rc=(\d+)", m)
            if match:
                return int(match.group(1))
        return None

    @property
    def powered_off(self) -> bool:
        return self.returncode == 0 and "poweroff" in self.markers

    @property
    def errors(self) -> list[str]:
        return [m for m in self.markers if m.startswith("error")]

    def value(self, key: str) -> str | None:
        """Value of the last ``key=value`` marker, e.g. ``value("sha256")``."""
        prefix = key + "="
        for m in reversed(self.markers):
            if m.startswith(prefix):
                return m[len(prefix) :].strip()
        return None

    def check(self, *, workload_rc: int | None = 0) -> GuestResult:
        """Raise AssertionError (with the console tail) unless the guest ran cleanly.

        Cleanly: no timeout, no ``error`` marker, powered off, and the workload exited with
        ``workload_rc`` (pass None to skip that check). Returns self for chaining.
        """
        problems = []
        if self.timed_out:
            problems.append(f"timed out after {self.duration_s:.1f}s")
        if self.errors:
            problems.append(f"guest errors: {self.errors}")
        if not self.powered_off:
            problems.append(f"no clean poweroff (qemu rc={self.returncode})")
        if workload_rc is not None and self.workload_rc != workload_rc:
            problems.append(f"workload rc={self.workload_rc}, expected {workload_rc}")
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.describe())
        return self

    def describe(self, tail_lines: int = 60) -> str:
        tail = "\n".join(self.console.splitlines()[-tail_lines:])
        return (
            f"command: {' '.join(self.command)}\n"
            f"markers: {self.markers}\n"
            f"qemu stderr:\n{self.stderr.strip()}\n"
            f"console (last {tail_lines} lines):\n{tail}"
        )


# --- kernel + initramfs -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$CDP_TEST_CACHE/guest`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/cdp-tests/guest``."""
    root = os.environ.get("CDP_TEST_CACHE")
    if root:
        return Path(root) / "guest"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cdp-tests" / "guest"


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def guest_kernel_or_skip(cache_dir: Path | None = None) -> GuestKernel:
    """:func:`ensure_guest_kernel`, calling ``pytest.skip`` if the guest is unavailable here."""
    import pytest

    if not qemu_available():
        pytest.skip(f"{QEMU} not installed (Debian package qemu-system-x86)")
    try:
        return ensure_guest_kernel(cache_dir)
    except GuestUnavailable as e:
        pytest.skip(f"guest kernel unavailable: {e}")


def ensure_guest_kernel(cache_dir: Path | None = None) -> GuestKernel:
    """Return a bootable kernel + initramfs, downloading and building them on first use.

    The kernel package is the one ``linux-image-amd64`` depends on (override with
    ``$CDP_GUEST_KERNEL_PACKAGE``). If apt cannot resolve or download it, the newest kernel
    already in the cache is used; with none cached, raises :class:`GuestUnavailable`.
    Safe to call from concurrent processes (the cache is locked with flock).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    busybox = _static_busybox()
    with _flock(cache_dir / ".lock"):
        kdir: Path | None = None
        problem = ""
        try:
            package = os.environ.get("CDP_GUEST_KERNEL_PACKAGE") or _resolve_kernel_package()
            version = package.removeprefix("linux-image-")
            if (cache_dir / version / "vmlinuz").is_file():
                kdir = cache_dir / version
            else:
                kdir = _download_kernel(package, version, cache_dir)
        except GuestUnavailable as e:
            problem = str(e)
        if kdir is None:
            kdir = _newest_cached_kernel(cache_dir)
            if kdir is None:
                raise GuestUnavailable(problem)
        initrd = _ensure_initrd(kdir, busybox)
        return GuestKernel(version=kdir.name, vmlinuz=kdir / "vmlinuz", initrd=initrd)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _resolve_kernel_package() -> str:
    if shutil.which("apt-cache") is None:
        raise GuestUnavailable("apt-cache not found (not a Debian host?)")
    proc = subprocess.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Depends:\s*(linux-image-[0-9][^\s<>]*)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise GuestUnavailable(
            f"`apt-cache depends {KERNEL_META_PACKAGE}` named no kernel package "
            f"(run `apt-get update`?): {(proc.stdout + proc.stderr).strip()[:500]}"
        )
    return match.group(1)


def _version_key(name: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", name)]


def _newest_cached_kernel(cache_dir: Path) -> Path | None:
    found = [p for p in cache_dir.iterdir() if (p / "vmlinuz").is_file() and p.name[0].isdigit()]
    return max(found, key=lambda p: _version_key(p.name)) if found else None


def _download_kernel(package: str, version: str, cache_dir: Path) -> Path:
    """apt-get download + dpkg -x; keep vmlinuz and the (decompressed) modules we need."""
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=cache_dir) as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=900,
        )
        debs = sorted(work.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise GuestUnavailable(
                f"`apt-get download {package}` failed (rc={proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()[-800:]}"
            )
        tree = work / "root"
        _run(["dpkg", "-x", str(debs[0]), str(tree)], timeout=600)

        vmlinuz = tree / "boot" / f"vmlinuz-{version}"
        moddir = tree / "lib" / "modules" / version
        if not vmlinuz.is_file() or not moddir.is_dir():
            raise GuestSetupError(f"{debs[0].name} has no boot/vmlinuz-{version} or modules")

        staged = work / version
        (staged / "modules").mkdir(parents=True)
        available = _module_files(moddir)
        builtin = _builtin_modules(moddir)
        order = []
        for name in MODULES:
            src = available.get(name)
            if src is None:
                if name in builtin:
                    continue  # compiled into this kernel: nothing to load
                raise GuestSetupError(f"module {name} not found in {package}")
            (staged / "modules" / f"{name}.ko").write_bytes(_read_module(src))
            order.append(name)
        (staged / "modules" / "order").write_text("\n".join(order) + "\n")
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        (staged / "package").write_text(debs[0].name + "\n")
        os.rename(staged, cache_dir / version)
    return cache_dir / version


def _module_name(filename: str) -> str:
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", filename).replace("-", "_")


def _module_files(moddir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        if re.search(r"\.ko(\.(xz|gz|zst))?$", path.name):
            found.setdefault(_module_name(path.name), path)
    return found


def _builtin_modules(moddir: Path) -> set[str]:
    builtin = moddir / "modules.builtin"
    if not builtin.is_file():
        return set()
    return {_module_name(Path(line).name) for line in builtin.read_text().split()}


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod cannot be relied on to handle .xz/.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - Debian 12 modules are not compressed
            raise GuestSetupError(f"{path.name} is zstd-compressed; need zstandard") from e
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            return reader.read()
    return data


def _static_busybox() -> Path:
    path = Path(os.environ.get("CDP_GUEST_BUSYBOX", BUSYBOX))
    if not path.is_file():
        raise GuestSetupError(f"{path} not found: install the busybox-static package")
    if not _elf_is_static(path.read_bytes()):
        raise GuestSetupError(f"{path} is dynamically linked: install busybox-static (not busybox)")
    return path


def _elf_is_static(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF with no PT_INTERP program header."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _ensure_initrd(kdir: Path, busybox: Path) -> Path:
    order = (kdir / "modules" / "order").read_text().split()
    init = _INIT_TEMPLATE.replace("@MARKER@", MARKER).replace("@MODULES@", " ".join(order))
    recipe = hashlib.sha256()
    recipe.update(f"format={_INITRD_FORMAT}\n".encode())
    recipe.update(init.encode())
    recipe.update(hashlib.sha256(busybox.read_bytes()).digest())
    for name in order:
        recipe.update(hashlib.sha256((kdir / "modules" / f"{name}.ko").read_bytes()).digest())
    initrd = kdir / f"initrd-{recipe.hexdigest()[:16]}.gz"
    if initrd.is_file():
        return initrd

    for old in kdir.glob("initrd-*.gz"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix=".initrd-", dir=kdir) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(busybox, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
        for name in order:
            shutil.copyfile(
                kdir / "modules" / f"{name}.ko", root / "lib" / "modules" / f"{name}.ko"
            )

        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            if rel != Path("."):
                names.append(str(rel))
            names.extend(str(rel / f) for f in sorted(filenames))
        proc = subprocess.run(
            [str(busybox), "cpio", "-o", "-H", "newc"],
            cwd=root,
            input=("\n".join(names) + "\n").encode(),
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0 or not proc.stdout:
            raise GuestSetupError(f"busybox cpio failed: {proc.stderr.decode(errors='replace')}")
        partial = Path(tmp) / "initrd.gz"
        partial.write_bytes(gzip.compress(proc.stdout, compresslevel=6, mtime=0))
        os.rename(partial, initrd)
    return initrd


# --- disk images ---------------------------------------------------------------------------------


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise GuestSetupError(f"{name} not found: install e2fsprogs")
    return found


def make_ext4_image(
    path: Path,
    size_mib: int,
    files: dict[str, bytes],
    workload: str | None = None,
    *,
    block_size: int = 4096,
) -> Path:
    """Create (or overwrite) a raw ext4 image holding ``files`` and ``workload.sh``.

    ``files`` maps paths relative to the filesystem root (``"in/data.bin"``) to contents;
    ``workload`` is a busybox ``sh`` script the guest runs from ``/mnt`` (the mount point).
    The inode tables and journal are initialised up front (no lazy init writes in the guest),
    and ``block_size`` is forced (mke2fs would pick 1 KiB for images under 512 MiB).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="cdp-ext4-") as tmp:
        staging = Path(tmp)
        for rel, data in files.items():
            rel_path = Path(rel.lstrip("/"))
            if ".." in rel_path.parts or rel_path == Path("."):
                raise ValueError(f"bad path in image: {rel!r}")
            if workload is not None and rel_path == Path("workload.sh"):
                raise ValueError("workload.sh given both in files and as workload")
            target = staging / rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if workload is not None:
            script = staging / "workload.sh"
            script.write_text(workload if workload.startswith("#!") else "#!/bin/sh\n" + workload)
            script.chmod(0o755)
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        _run(
            [
                _tool("mke2fs"),
                "-q",
                "-F",
                "-t",
                "ext4",
                "-m",
                "0",
                "-b",
                str(block_size),
                "-L",
                "cdp-guest",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-d",
                str(staging),
                str(path),
            ],
            timeout=120,
        )
    return path


def read_file_from_image(image: Path, path_in_fs: str) -> bytes:
    """Contents of ``path_in_fs`` inside an ext4 image, read with ``debugfs`` (no mount)."""
    fs_path = "/" + path_in_fs.lstrip("/")
    if '"' in fs_path or "\n" in fs_path:
        raise ValueError(f"unsupported path: {path_in_fs!r}")
    proc = subprocess.run(
        [_tool("debugfs"), "-R", f'cat "{fs_path}"', str(image)],
        capture_output=True,
        timeout=120,
    )
    # debugfs prints its banner ("debugfs 1.47.0 (5-Feb-2023)") and any error on stderr, and
    # exits 0 even when the file is missing.
    errors = [
        line
        for line in proc.stderr.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if any("not found" in line for line in errors):
        raise FileNotFoundError(f"{fs_path} in {image}: {'; '.join(errors)}")
    if proc.returncode != 0 or errors:
        raise GuestSetupError(f"debugfs cat {fs_path} on {image}: {'; '.join(errors)}")
    return proc.stdout


# --- booting -------------------------------------------------------------------------------------


def nbd_drive_spec(socket_path: Path | str, export_name: str, *, cache: str = "none") -> str:
    """qemu ``-drive`` value for an NBD export on a unix socket, as a virtio disk."""
    sock = str(socket_path).replace(",", ",,")
    return f"file=nbd+unix:///{export_name}?socket={sock},format=raw,if=virtio,cache={cache}"


def _drive_arg(drive: str | os.PathLike[str]) -> str:
    if isinstance(drive, os.PathLike) or "=" not in drive:
        return f"file={os.fspath(drive).replace(',', ',,')},format=raw,if=virtio"
    return drive


def boot_guest(
    kernel: GuestKernel,
    drive: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    timeout_s: float = 120,
    extra_args: Sequence[str] = (),
    kernel_args: Sequence[str] = (),
    memory_mib: int = 512,
    log_path: Path | None = None,
) -> GuestResult:
    """Boot the guest with ``drive`` as /dev/vda, wait for it to power off, return the result.

    ``drive`` is a qemu ``-drive`` spec (``nbd_drive_spec(...)``, or e.g.
    ``file=PATH,format=raw,if=virtio``) or a plain path of a raw image; a list of them gives
    /dev/vda, /dev/vdb, ... ``extra_args`` go to qemu, ``kernel_args`` to the kernel command
    line. Never raises for a failing guest: check ``result.check()`` or the fields.
    ``log_path`` receives the console output too.
    """
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise GuestUnavailable(f"{QEMU} not installed (Debian package qemu-system-x86)")
    drives = [drive] if isinstance(drive, str | os.PathLike) else list(drive)
    append = " ".join(["console=ttyS0", "quiet", "panic=-1", *kernel_args])
    qemu_cmd = [
        qemu,
        "-machine", "q35",
        "-accel", "tcg",
        "-m", str(memory_mib),
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(kernel.initrd),
        "-append", append,
    ]  # fmt: skip
    for d in drives:
        qemu_cmd += ["-drive", _drive_arg(d)]
    qemu_cmd += list(extra_args)
    cmd = ["timeout", "--kill-after=10", f"{timeout_s:g}", *qemu_cmd]

    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s + 30
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # timeout(1) itself stuck: should not happen
        rc, out, err = 124, e.stdout or b"", e.stderr or b""
    duration = time.monotonic() - start

    console = out.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    if log_path is not None:
        Path(log_path).write_text(console)
    markers = [line.split(MARKER, 1)[1].strip() for line in console.splitlines() if MARKER in line]
    return GuestResult(
        returncode=rc,
        console=console,
        stderr=err.decode(errors="replace"),
        markers=markers,
        timed_out=rc in (124, 137),
        duration_s=duration,
        command=cmd,
    )


@contextlib.contextmanager
def serve_qemu_nbd(
    image: Path, socket_path: Path, export_name: str = "disk0", *, start_timeout_s: float = 15
) -> Iterator[str]:
    """Serve a raw image with ``qemu-nbd`` on a unix socket; yield its :func:`nbd_drive_spec`.

    Keep ``socket_path`` short (unix socket paths are limited to 107 bytes).
    """
    qemu_nbd = shutil.which("qemu-nbd")
    if qemu_nbd is None:
        raise GuestSetupError("qemu-nbd not found: install qemu-utils")
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [
                qemu_nbd,
                f"--socket={socket_path}",
                "--format=raw",
                f"--export-name={export_name}",
                "--persistent",
                str(image),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + start_timeout_s
            while not _unix_socket_accepts(socket_path):
                if proc.poll() is not None:
                    log.seek(0)
                    output = log.read().decode(errors="replace")
                    raise GuestSetupError(f"qemu-nbd exited with {proc.returncode}: {output}")
                if time.monotonic() > deadline:
                    raise GuestSetupError(f"qemu-nbd did not listen on {socket_path}")
                time.sleep(0.05)
            yield nbd_drive_spec(socket_path, export_name)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            socket_path.unlink(missing_ok=True)


def _unix_socket_accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _run(cmd: list[str], *, timeout: float) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise GuestSetupError(
            f"{' '.join(cmd)} failed (rc={proc.returncode}): {(proc.stdout + proc.stderr).strip()}"
        )
