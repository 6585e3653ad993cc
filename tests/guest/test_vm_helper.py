"""Self-tests of the guest VM helper (tests/guest/vm.py).

Each boot takes about 5-7 s under TCG on this machine; the first run also downloads the
Debian kernel package (~70 MB) into the cache (see vm.default_cache_dir()).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.vm import (
    GuestKernel,
    boot_guest,
    guest_kernel_or_skip,
    make_ext4_image,
    read_file_from_image,
    serve_qemu_nbd,
)

pytestmark = pytest.mark.integration

INPUT = b"input written by the host\n" * 1000
INPUT_SHA256 = hashlib.sha256(INPUT).hexdigest()

# Reads the host's file, writes 4 MiB of random data, prints both sha256 sums as markers.
WORKLOAD = """\
set -e
echo "CDP-GUEST: in-sha256=$(sha256sum in/input.txt | cut -d' ' -f1)"
mkdir -p out
dd if=/dev/urandom of=out/random.bin bs=64k count=64 2>/dev/null
sync
echo "CDP-GUEST: out-sha256=$(sha256sum out/random.bin | cut -d' ' -f1)"
"""


@pytest.fixture(scope="module")
def guest_kernel() -> GuestKernel:
    return guest_kernel_or_skip()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path, for unix sockets (107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="cdp-vm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_random_file(result_value: str | None, image: Path) -> None:
    data = read_file_from_image(image, "/out/random.bin")
    assert len(data) == 64 * 65536
    assert result_value == hashlib.sha256(data).hexdigest()


def test_image_roundtrip_without_boot(tmp_path: Path) -> None:
    image = make_ext4_image(
        tmp_path / "disk.raw", 16, {"a/b/c.bin": b"\x00\x01" * 5000}, workload="true\n"
    )
    assert image.stat().st_size == 16 * 1024 * 1024
    assert read_file_from_image(image, "a/b/c.bin") == b"\x00\x01" * 5000
    assert read_file_from_image(image, "/workload.sh") == b"#!/bin/sh\ntrue\n"
    with pytest.raises(FileNotFoundError):
        read_file_from_image(image, "/nope")
    with pytest.raises(ValueError):
        make_ext4_image(tmp_path / "bad.raw", 16, {"../x": b""}, workload=None)


def test_boot_from_raw_file(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    image = make_ext4_image(tmp_path / "disk.raw", 64, {"in/input.txt": INPUT}, WORKLOAD)

    result = boot_guest(guest_kernel, str(image), timeout_s=120).check()

    assert result.markers[:3] == ["boot", "mounted /dev/vda", "start"]
    assert result.markers[-2:] == ["umount rc=0", "poweroff"]
    assert result.value("in-sha256") == INPUT_SHA256
    _check_random_file(result.value("out-sha256"), image)


@pytest.mark.slow  # the NBD guest tests boot the same way, from our export
def test_boot_from_qemu_nbd_unix_socket(
    guest_kernel: GuestKernel, tmp_path: Path, short_tmp: Path
) -> None:
    image = make_ext4_image(tmp_path / "disk.raw", 64, {"in/input.txt": INPUT}, WORKLOAD)

    with serve_qemu_nbd(image, short_tmp / "nbd.sock", "disk0") as drive:
        assert drive.startswith("file=nbd+unix:///disk0?socket=")
        assert drive.endswith(",format=raw,if=virtio,cache=none")
        result = boot_guest(guest_kernel, drive, timeout_s=120).check()

    assert result.value("in-sha256") == INPUT_SHA256
    _check_random_file(result.value("out-sha256"), image)


@pytest.mark.slow
def test_failing_workload_is_reported(guest_kernel: GuestKernel, tmp_path: Path) -> None:
    image = make_ext4_image(tmp_path / "disk.raw", 16, {}, "echo 'CDP-GUEST: k=v'\nexit 7\n")

    result = boot_guest(guest_kernel, image)

    assert result.workload_rc == 7
    assert result.value("k") == "v"
    assert result.powered_off
    with pytest.raises(AssertionError, match="workload rc=7"):
        result.check()
    result.check(workload_rc=7)
