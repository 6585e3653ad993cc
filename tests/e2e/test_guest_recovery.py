"""Ransomware recovery end to end: a real Linux guest, the real daemon, the real CLI.

The volume ``disk`` (``source = "nbd"``) is a 64 MiB ext4 image holding one workload script;
every guest (tests/guest/vm.py, qemu-system-x86_64 TCG) boots with the daemon's NBD export as
its only disk, and the kernel command line (``cdp.mode=...``) picks what the script does:

1. ``write``: four files of random data (64-512 KiB) are written; their sha256 are printed as
   markers; the guest syncs and powers off. ``cdp checkpoint disk --name clean``.
2. ``encrypt``: every file is overwritten in place with random data
   (``dd if=/dev/urandom conv=notrunc``, as ransomware does) and a ransom note is left; the
   image (read with debugfs) holds the new contents.
3. ``cdp rollback disk --to checkpoint:clean --yes`` (no client connected) exits 0: the image
   holds step 1's files again, the note is gone, and ``e2fsck -fn`` is clean.
4. ``cdp export disk --at checkpoint:clean`` (read-only) serves the point; a guest booted from
   it with a read-only drive (``verify``; /mnt is mounted ``ro``) prints the files' sha256:
   step 1's, and no ransom note. SIGTERM ends the export with exit 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.guest_steps import boot_mode, need_tools, printed_sums
from tests.guest.vm import (
    guest_kernel_or_skip,
    make_ext4_image,
    nbd_drive_spec,
    read_file_from_image,
)

from .harness import CLI, Daemon, cdp, short_tmp, wait_for

pytestmark = pytest.mark.integration

NAME = "disk"
SIZE_MIB = 64
FILES = {"f1": 16, "f2": 40, "f3": 80, "f4": 128}  # name -> 4 KiB blocks (64 KiB .. 512 KiB)
NOTE = "out/README-RECOVER.txt"

WORKLOAD = rf"""
set -e
mode=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	cdp.mode=*) mode="${{arg#cdp.mode=}}" ;;
	esac
done
echo "CDP-GUEST: mode=$mode"
case "$mode" in
write)
	mkdir -p out
	for f in {" ".join(f"{f}:{n}" for f, n in FILES.items())}; do
		dd if=/dev/urandom of=out/${{f%%:*}} bs=4096 count=${{f#*:}} 2>/dev/null
	done
	sync
	;;
encrypt)
	for f in {" ".join(f"{f}:{n}" for f, n in FILES.items())}; do
		dd if=/dev/urandom of=out/${{f%%:*}} bs=4096 count=${{f#*:}} conv=notrunc 2>/dev/null
	done
	echo "your files are encrypted" > {NOTE}
	sync
	;;
verify)
	echo "CDP-GUEST: mnt=$(awk '$2 == "/mnt" {{ split($4, o, ","); print o[1] }}' /proc/mounts)"
	if [ -e {NOTE} ]; then echo "CDP-GUEST: note=present"; else echo "CDP-GUEST: note=absent"; fi
	;;
*)
	echo "CDP-GUEST: unknown mode"
	exit 3
	;;
esac
for f in {" ".join(FILES)}; do
	echo "CDP-GUEST: $f=$(sha256sum out/$f | cut -d' ' -f1)"
done
"""


def _config(tmp: Path, sock: Path, image: Path) -> Path:
    cfg = tmp / "cdp.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp / "state"}"\napi = "unix:{sock / "api.sock"}"\n'
        f'log_format = "json"\n\n[[volume]]\nname = "{NAME}"\nsize = "{SIZE_MIB}MiB"\n'
        f'source = "nbd"\nimage = "{image}"\nlisten = "unix:{sock / NAME}.sock"\n'
    )
    return cfg


def _image_sums(image: Path) -> dict[str, str]:
    return {f: hashlib.sha256(read_file_from_image(image, f"/out/{f}")).hexdigest() for f in FILES}


def _idle(d: Daemon) -> None:
    """Wait until the guest's NBD connection is gone (a rollback refuses a connected client)."""
    wait_for(lambda: d.volume(NAME)["capture"]["connections"] == 0, "the guest to disconnect")


def _export(cfg: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [*CLI, "export", *args, "--config", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CDP_CONFIG": ""},
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("serving "):
        p.kill()
        _, err = p.communicate(timeout=30)
        raise AssertionError(f"cdp export did not serve: {line!r} {err}")
    assert "read-only" in line, line
    return p, line.rsplit(": ", 1)[1].strip()


def test_guest_ransomware_rollback_and_export(tmp_path: Path) -> None:
    need_tools("qemu-img", "debugfs", "e2fsck")
    kernel = guest_kernel_or_skip()
    image = tmp_path / "disk.raw"
    make_ext4_image(image, SIZE_MIB, {}, workload=WORKLOAD)

    with short_tmp() as sock:
        cfg = _config(tmp_path, sock, image)
        d = Daemon(cfg, tmp_path / "daemon.log").start()
        try:
            wait_for(lambda: d.volume(NAME)["onboarding"]["state"] == "done", "onboarding")
            live = nbd_drive_spec(sock / f"{NAME}.sock", NAME)

            # 1. the guest writes its files; 2. checkpoint them
            first = boot_mode(kernel, live, "write", tmp_path / "guest1.log", timeout_s=240)
            clean = printed_sums(first, FILES)
            _idle(d)
            assert len(set(clean.values())) == len(FILES), clean
            assert _image_sums(image) == clean, "the image does not hold the guest's files"
            cdp(cfg, "checkpoint", NAME, "--name", "clean")

            # 3. ransomware overwrites every file in place
            second = boot_mode(kernel, live, "encrypt", tmp_path / "guest2.log", timeout_s=240)
            encrypted = printed_sums(second, FILES)
            _idle(d)
            on_disk = _image_sums(image)
            assert on_disk == encrypted, "the image does not hold the overwritten files"
            for f in FILES:
                assert on_disk[f] != clean[f], f"{f} was not overwritten"
            assert read_file_from_image(image, f"/{NOTE}").startswith(b"your files")

            # 4. roll the volume back to the checkpoint
            r = cdp(cfg, "rollback", NAME, "--to", "checkpoint:clean", "--yes")
            assert _image_sums(image) == clean, f"rollback did not restore the files: {r}"
            with pytest.raises(FileNotFoundError):
                read_file_from_image(image, f"/{NOTE}")
            fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
            proc = subprocess.run([fsck, "-fn", str(image)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr

            # 5. a guest boots from the checkpoint served read-only by `cdp export`
            p, uri = _export(cfg, NAME, "--at", "checkpoint:clean")
            try:
                drive = f"file={uri.replace(',', ',,')},format=raw,if=virtio,readonly=on"
                verified = boot_mode(
                    kernel, drive, "verify", tmp_path / "guest3.log", timeout_s=240
                )
                assert printed_sums(verified, FILES) == clean
                assert verified.value("note") == "absent", verified.markers
                assert verified.value("mnt") == "ro", verified.markers  # the drive is read-only
            finally:
                p.send_signal(signal.SIGTERM)
                try:
                    rc = p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(30)
                    raise
            assert rc == 0, p.stderr.read() if p.stderr else ""
            assert _image_sums(image) == clean, "the export changed the live volume"
            assert d.volume(NAME)["capture"]["protection"] == "ok"
            assert d.stop() == 0, d.log()[-6000:]
            assert "Traceback" not in d.log(), d.log()[-6000:]
        finally:
            d.kill()
