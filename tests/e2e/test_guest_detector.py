"""The corruption detector catches a real guest encrypting its files in place, end to end.

The volume ``disk`` (``source = "nbd"``, ``[detector] sensitivity = "normal"``) is a 64 MiB
ext4 image holding one workload script; every guest (tests/guest/vm.py, qemu-system-x86_64
TCG) boots with the daemon's NBD export as its only disk, and ``cdp.mode=...`` on the kernel
command line picks what the script does:

1. ``write``: five files of compressible text (busybox ``seq``, ``yes``, ``hexdump -C``,
   ``sed``; about 6.6 MiB together, four of them over 1 MiB) are written into the empty file
   system; their sha256 and sizes are printed as markers; the guest syncs and powers off.
   Filling empty space is ordinary: the detector has looked at the writes and no anomaly
   checkpoint exists, no alert says "possible ransomware".
2. ``encrypt``: every file is overwritten in place, block by block, as ransomware does
   (``dd if=/dev/urandom conv=notrunc``: the same blocks, the same size; busybox has no
   cipher, and /dev/urandom output is an acceptable stand-in for ciphertext: both are
   incompressible), with a ``sync`` after each file.
3. Within 30 s the detector has fired: ``cdp timeline disk --json`` lists an ``anomaly``
   checkpoint ``anomaly:disk:last-clean-seq=N:snapshot=NAME``; ``cdp snapshot list`` has
   NAME at seq N, locked into the future; N is after step 1's writes; the timeline's text
   flags the anomaly and names the snapshot; ``cdp status --json`` alerts say "possible
   ransomware" and the daemon logged it.
4. ``cdp rollback disk --to snapshot:NAME --yes``: every file (read with debugfs from the
   image) has step 1's checksum again, and ``e2fsck -fn`` is clean.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest_steps import boot_mode, need_tools, printed_sums
from tests.guest.vm import (
    GuestResult,
    guest_kernel_or_skip,
    make_ext4_image,
    nbd_drive_spec,
    read_file_from_image,
)

from .harness import Daemon, cdp, short_tmp, wait_for

pytestmark = pytest.mark.integration

NAME = "disk"
SIZE_MIB = 64
# name -> busybox sh pipeline writing compressible text to stdout
FILES = {
    "numbers.txt": "seq 1 400000",  # ~2.6 MiB
    "repeat.txt": "yes 'the quick brown fox jumps over the lazy dog' | head -c 1572864",
    "dump.txt": "hexdump -C /bin/busybox | head -c 1234567",  # ~1.2 MiB, not block-aligned
    "ledger.csv": "seq 1 40000 | sed 's/.*/&,account-&,EUR,12.50,paid/'",  # ~1.2 MiB
    "notes.txt": "seq 1 9000 | sed 's/^/note /'",  # ~90 KiB
}
MIN_TOTAL = 4 << 20
ANOMALY_WAIT_S = 30.0
WRITES = "".join(f"\t{cmd} > docs/{f}\n" for f, cmd in FILES.items())

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
	mkdir -p docs
{WRITES}	sync
	;;
encrypt)
	for f in {" ".join(FILES)}; do
		size=$(stat -c %s docs/$f)
		full=$((size / 4096))
		rem=$((size % 4096))
		dd if=/dev/urandom of=docs/$f bs=4096 count=$full conv=notrunc 2>/dev/null
		if [ "$rem" -gt 0 ]; then
			dd if=/dev/urandom of=docs/$f bs=1 seek=$((full * 4096)) count=$rem \
				conv=notrunc 2>/dev/null
		fi
		sync
	done
	;;
*)
	echo "CDP-GUEST: unknown mode"
	exit 3
	;;
esac
for f in {" ".join(FILES)}; do
	echo "CDP-GUEST: $f=$(sha256sum docs/$f | cut -d' ' -f1)"
	echo "CDP-GUEST: size.$f=$(stat -c %s docs/$f)"
done
"""


def _config(tmp: Path, sock: Path, image: Path) -> Path:
    cfg = tmp / "cdp.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp / "state"}"\napi = "unix:{sock / "api.sock"}"\n'
        f'log_format = "json"\n\n[detector]\nsensitivity = "normal"\n\n'
        f'[[volume]]\nname = "{NAME}"\nsize = "{SIZE_MIB}MiB"\n'
        f'source = "nbd"\nimage = "{image}"\nlisten = "unix:{sock / NAME}.sock"\n'
    )
    return cfg


def _sizes(result: GuestResult) -> dict[str, int]:
    return {f: int(result.value(f"size.{f}") or -1) for f in FILES}


def _image_sums(image: Path) -> dict[str, str]:
    return {f: hashlib.sha256(read_file_from_image(image, f"/docs/{f}")).hexdigest() for f in FILES}


def _idle(d: Daemon) -> None:
    """Wait until the guest's NBD connection is gone (a rollback refuses a connected client)."""
    wait_for(lambda: d.volume(NAME)["capture"]["connections"] == 0, "the guest to disconnect")


def _status(cfg: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cdp(cfg, "status", "--json").out)
    return doc


def _detector(cfg: Path) -> dict[str, Any]:
    det: dict[str, Any] | None = _status(cfg)["groups"][0]["detector"]
    assert det is not None, "the detector is not running (it is on by default)"
    return det


def _anomalies(cfg: Path) -> list[dict[str, Any]]:
    doc = json.loads(cdp(cfg, "timeline", NAME, "--json").out)
    return [c for c in doc["checkpoints"] if c["kind"] == "anomaly"]


def _ransomware_alerts(cfg: Path) -> list[str]:
    return [a for a in _status(cfg)["alerts"] if "possible ransomware" in a]


def _caught_up(cfg: Path) -> dict[str, Any]:
    """The detector's counters once they stop moving (it has read what the guest wrote)."""
    prev: dict[str, Any] = {}

    def settled() -> dict[str, Any] | None:
        nonlocal prev
        det = _detector(cfg)
        done = det if det["sampled"] > 0 and det == prev else None
        prev = det
        return done

    return wait_for(settled, "the detector to read the guest's writes", every=1.0)


def _detector_log(d: Daemon) -> str:
    lines = [line for line in d.log().splitlines() if "detector" in line or "ransomware" in line]
    return "\n".join(lines[-20:])


@pytest.mark.slow  # 31 s; the corpus test covers detection, test_guest_recovery the rollback
def test_guest_in_place_encryption_is_flagged_and_rolled_back(tmp_path: Path) -> None:
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

            # 1. the guest writes compressible files into empty space: ordinary
            written = boot_mode(kernel, live, "write", tmp_path / "guest1.log", timeout_s=300)
            clean, sizes = printed_sums(written, FILES), _sizes(written)
            _idle(d)
            assert sum(sizes.values()) >= MIN_TOTAL, sizes
            assert sum(s > 1 << 20 for s in sizes.values()) >= 2, sizes
            assert len(set(clean.values())) == len(FILES), clean
            assert _image_sums(image) == clean, "the image does not hold the guest's files"
            det1 = _caught_up(cfg)
            assert det1["alarms"] == 0, det1
            assert _anomalies(cfg) == [], "a false alarm on files written into empty space"
            assert _ransomware_alerts(cfg) == []
            seq_written = int(_status(cfg)["groups"][0]["window"]["last_seq"])

            # 2. ransomware overwrites every file in place with incompressible bytes
            t_attack = time.time_ns()
            encrypted = boot_mode(kernel, live, "encrypt", tmp_path / "guest2.log", timeout_s=300)
            assert _sizes(encrypted) == sizes, "the files were not overwritten in place"
            _idle(d)
            on_disk = _image_sums(image)
            assert on_disk == printed_sums(encrypted, FILES), (
                "the image does not hold the overwritten files"
            )
            for f in FILES:
                assert on_disk[f] != clean[f], f"{f} was not overwritten"

            # 3. the detector fired and pinned the last clean point
            try:
                found = wait_for(
                    lambda: _anomalies(cfg), "an anomaly checkpoint", deadline_s=ANOMALY_WAIT_S
                )
            except AssertionError as e:
                raise AssertionError(
                    f"{e}: {sum(sizes.values())} bytes of text overwritten in place with "
                    f"/dev/urandom; detector after the write {det1}, now {_detector(cfg)}; "
                    f"alerts {_status(cfg)['alerts']}; daemon log:\n{_detector_log(d)}"
                ) from None
            cp = found[0]  # one per burst (a cooldown of 60 s; this attack takes seconds)
            assert cp["ts_ns"] >= t_attack, cp
            prefix = f"anomaly:{NAME}:last-clean-seq="
            assert cp["name"].startswith(prefix) and ":snapshot=" in cp["name"], cp
            clean_seq = int(cp["name"][len(prefix) :].split(":", 1)[0])
            snap = cp["name"].rsplit(":snapshot=", 1)[1]
            assert seq_written <= clean_seq < cp["seq"], (seq_written, cp)

            snaps = {
                s["name"]: s for s in json.loads(cdp(cfg, "snapshot", "list", NAME, "--json").out)
            }
            assert snap in snaps, f"no snapshot {snap}: {sorted(snaps)}"
            assert snaps[snap]["seq"] == clean_seq, snaps[snap]
            assert snaps[snap]["kind"] == "anomaly", snaps[snap]
            assert snaps[snap]["locked_until_ns"] > time.time_ns(), snaps[snap]

            tl = cdp(cfg, "timeline", NAME).out
            flagged = [line.strip() for line in tl.splitlines() if line.strip().startswith("!!")]
            assert flagged, tl  # the anomaly, flagged, naming the point to go back to
            assert snap in flagged[0] and str(clean_seq) in flagged[0], tl
            assert f"snapshot {snap} (seq {clean_seq}, locked until" in tl, tl
            assert f"-> snapshot:{snap}" in tl, tl

            alerts = _ransomware_alerts(cfg)
            assert alerts, _status(cfg)["alerts"]
            assert f"snapshot:{snap}" in alerts[0] and NAME in alerts[0], alerts
            assert _detector(cfg)["alarms"] >= 1
            assert "possible ransomware" in d.log(), _detector_log(d)

            # 4. roll back to the pinned last clean point
            r = cdp(cfg, "rollback", NAME, "--to", f"snapshot:{snap}", "--yes")
            assert _image_sums(image) == clean, f"rollback did not restore the files: {r}"
            fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
            proc = subprocess.run([fsck, "-fn", str(image)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr

            assert d.volume(NAME)["capture"]["protection"] == "ok"
            assert d.stop() == 0, d.log()[-6000:]
            assert "Traceback" not in d.log(), d.log()[-6000:]
        finally:
            d.kill()
