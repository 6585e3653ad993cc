"""A guest attached with reconnect-delay keeps running across a daemon kill -9 and restart.

QEMU's NBD client retries the connection for ``reconnect-delay`` seconds and resends the
requests that were in flight; our daemon must come back serving the same export, with the
journal recovered, fast enough. The guest writes and syncs files in a loop while the daemon
is killed and restarted; it must finish with no I/O error, and every file it reported must
read back from the journal's latest point.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from tests.guest.vm import boot_guest, guest_kernel_or_skip, make_ext4_image, read_file_from_image

from .daemon_proc import make_daemon

WORKLOAD = """#!/bin/sh
i=0
while [ $i -lt 24 ]; do
  dd if=/dev/urandom of=/mnt/f$i bs=64k count=4 2>/dev/null || exit 3
  sync || exit 4
  echo "CDP-GUEST: f$i=$(sha256sum /mnt/f$i | cut -d' ' -f1)"
  sleep 0.5
  i=$((i+1))
done
exit 0
"""


@pytest.mark.integration
@pytest.mark.slow  # 35 s; tests/nbd/test_nbd_restart.py rides a qemu client through by default
def test_guest_rides_through_kill9_and_restart(tmp_path: Path) -> None:
    kernel = guest_kernel_or_skip()
    image = tmp_path / "disk0.raw"
    make_ext4_image(image, 64, {}, WORKLOAD)
    d = make_daemon(tmp_path, size="64MiB", image=image)
    d.start()
    result = {}

    def run_guest() -> None:
        blockdev = (
            f"driver=nbd,node-name=d0,server.type=unix,server.path={d.nbd()},"
            "export=disk0,reconnect-delay=60"
        )
        result["r"] = boot_guest(
            kernel,
            [],
            timeout_s=300,
            extra_args=("-blockdev", blockdev, "-device", "virtio-blk-pci,drive=d0"),
        )

    t = threading.Thread(target=run_guest)
    t.start()
    try:
        deadline = time.monotonic() + 120
        # wait until the guest is writing (its first sync reached us), then pull the plug
        while time.monotonic() < deadline:
            vols = d.status()["volumes"]
            if vols[0]["capture"]["flushes"] >= 3:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the guest never flushed")
        d.kill9()
        time.sleep(1.0)
        d.start()
        t.join(300)
        r = result["r"]
        assert not r.timed_out, r.describe()
        r.check(workload_rc=0)
        assert "I/O error" not in r.console, r.describe()
        files = {m.split("=")[0]: m.split("=")[1] for m in r.markers if m.startswith("f")}
        assert len(files) == 24, r.describe()
        d.stop()
        latest = tmp_path / "latest.raw"
        d.start()
        latest.write_bytes(d.journal_image())
        for name, digest in files.items():
            got = hashlib.sha256(read_file_from_image(latest, f"/{name}")).hexdigest()
            assert got == digest, f"{name} differs in the journal's latest point"
    finally:
        d.stop()
        t.join(10)
