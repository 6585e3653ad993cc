"""`cdp export`: a past point served over NBD at once, to qemu-io and nbdcopy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .harness import CLI, Daemon, cdp, need_qemu_tools, same_bytes, short_tmp, wait_for
from .test_replication_e2e import qemu_io
from .test_rollback_snapshots_e2e import _config

pytestmark = pytest.mark.integration


def _export(cfg: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [*CLI, "export", *args, "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CDP_CONFIG": ""},
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("serving "), line + (p.stderr.read() if p.poll() is not None else "")
    return p, line.rsplit(": ", 1)[1].strip()


def test_export_serves_a_past_point_read_only_and_writable(tmp_path: Path) -> None:
    need_qemu_tools()
    if shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy is not installed (scripts/bootstrap installs it)")
    with short_tmp() as sock:
        cfg = _config(tmp_path, sock)
        d = Daemon(cfg, tmp_path / "d.log").start()
        try:
            wait_for(lambda: d.volume("disk0")["onboarding"]["state"] == "done", "onboarding")
            qemu_io(sock, "write -P 0x61 0 1M", "write -P 0x62 4M 64k")
            cdp(cfg, "checkpoint", "disk0", "--name", "cp")
            qemu_io(sock, "write -P 0x7a 0 2M")
            want = tmp_path / "cp.raw"
            cdp(cfg, "restore", "disk0", "--at", "checkpoint:cp", "--output", str(want))
            live = tmp_path / "live.raw"
            shutil.copy(tmp_path / "disk0.raw", live)

            p, uri = _export(cfg, "disk0", "--at", "checkpoint:cp")
            try:
                got = tmp_path / "got.raw"
                subprocess.run(["nbdcopy", uri, str(got)], check=True, timeout=60)
                assert same_bytes(got, want)
                out = subprocess.run(
                    ["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x61 0 1M", uri],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert "Pattern verification failed" not in out.stdout + out.stderr, out
                w = subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert w.returncode != 0 or "failed" in (w.stdout + w.stderr).lower(), w
                exports = d.status()  # the point is held while exported
                holds = exports["groups"][0]["holds"]
                assert any(h["name"].startswith("point-export:") for h in holds), holds
            finally:
                p.send_signal(signal.SIGTERM)
                assert p.wait(30) == 0

            p, uri = _export(cfg, "disk0", "--at", "checkpoint:cp", "--writable")
            try:
                qemu_io_uri = [
                    "qemu-io", "-f", "raw", "-c", "write -P 0x55 64k 64k",
                    "-c", "read -P 0x55 64k 64k", "-c", "read -P 0x61 0 64k", uri,
                ]  # fmt: skip
                out = subprocess.run(qemu_io_uri, capture_output=True, text=True, timeout=60)
                assert out.returncode == 0 and "verification failed" not in out.stdout, out
            finally:
                p.kill()  # even kill -9 of the command ends the export
                p.wait(30)
            wait_for(
                lambda: (
                    not any(
                        h["name"].startswith("point-export:")
                        for h in d.status()["groups"][0]["holds"]
                    )
                ),
                "the export to stop with its command",
            )
            assert not list(sock.glob("export-*")), list(sock.glob("export-*"))
            # the live volume and its journal never saw the export's writes
            assert same_bytes(tmp_path / "disk0.raw", live)
            latest = tmp_path / "latest.raw"
            cdp(cfg, "restore", "disk0", "--at", "latest", "--output", str(latest))
            assert same_bytes(latest, live)
        finally:
            d.stop()
