"""A real Linux guest (tests/guest/vm.py) whose only disk is the daemon's NBD export.

The volume's image is a 64 MiB ext4 filesystem holding a workload script. The daemon
onboards it (first point = the image as built), the guest boots from the export with
``cache=none``, writes files of random data, overwrites part of one, deletes another, prints
their sha256 as markers, unmounts and powers off. Then, from the journal alone:

- the reconstruction of the latest point (the API's image stream) holds the files with the
  guest's checksums (read with debugfs), the deleted file is gone, and ``e2fsck -fn`` is
  clean;
- the reconstruction at the onboarding point is the image as built, bit for bit;
- the guest's FLUSH/FUA traffic reached the export (status ``capture.flushes`` > 0).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Volume, need_tools, running_daemon

from tests.guest.vm import (
    boot_guest,
    guest_kernel_or_skip,
    make_ext4_image,
    nbd_drive_spec,
    read_file_from_image,
)

pytestmark = pytest.mark.integration

NAME = "guest0"
SIZE_MIB = 64
INPUT = b"a file put in the image by the host\n" * 300

WORKLOAD = r"""
set -e
mkdir -p out
for i in 1 2 3 4; do
	dd if=/dev/urandom of=out/f$i bs=4096 count=$((i * 96)) 2>/dev/null
	echo "CDP-GUEST: f$i=$(sha256sum out/f$i | cut -d' ' -f1)"
done
sync
# overwrite 32 KiB in the middle of f2, in place; delete f4; copy the host's file
dd if=/dev/urandom of=out/f2 bs=4096 count=8 seek=10 conv=notrunc 2>/dev/null
echo "CDP-GUEST: f2=$(sha256sum out/f2 | cut -d' ' -f1)"
rm out/f4
cp in/host.txt out/copy.txt
echo "CDP-GUEST: copy=$(sha256sum out/copy.txt | cut -d' ' -f1)"
sync
"""


def test_guest_writes_files_that_the_journal_restores(tmp_path: Path) -> None:
    need_tools("qemu-img", "debugfs")
    kernel = guest_kernel_or_skip()
    image = tmp_path / "guest0.raw"
    make_ext4_image(image, SIZE_MIB, {"in/host.txt": INPUT}, workload=WORKLOAD)
    built = tmp_path / "built.raw"
    shutil.copyfile(image, built)

    with running_daemon(tmp_path, [Volume(NAME, SIZE_MIB << 20, image=image)]) as d:
        first_point = d.volume_status(NAME)["onboarding"]["first_point_seq"]
        assert first_point is not None
        result = boot_guest(
            kernel,
            nbd_drive_spec(d.sock(NAME), NAME),
            timeout_s=180,
            log_path=tmp_path / "console.log",
        ).check()
        vol = d.volume_status(NAME)
        assert vol["capture"]["flushes"] > 0, f"no FLUSH/FUA reached the export: {vol}"
        assert vol["capture"]["writes"] > 0
        assert vol["capture"]["protection"] == "ok"

        restored = tmp_path / "restored.raw"
        seq = d.last_seq(NAME)
        d.save_journal_image(NAME, restored, seq)
        onboarded = tmp_path / "onboarded.raw"
        d.save_journal_image(NAME, onboarded, first_point)
        d.assert_journal_matches_image(NAME)
        d.assert_log_clean()

    # from the journal's latest point alone
    for f in ("f1", "f2", "f3"):
        want = result.value(f)
        assert want, f"the guest printed no checksum for {f}: {result.markers}"
        data = read_file_from_image(restored, f"/out/{f}")
        assert hashlib.sha256(data).hexdigest() == want, f"{f} differs in the restored image"
    assert result.value("copy") == hashlib.sha256(INPUT).hexdigest()
    assert read_file_from_image(restored, "/out/copy.txt") == INPUT
    with pytest.raises(FileNotFoundError):
        read_file_from_image(restored, "/out/f4")
    fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    proc = subprocess.run([fsck, "-fn", str(restored)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the onboarding point is the image as it was built
    assert onboarded.read_bytes() == built.read_bytes()
