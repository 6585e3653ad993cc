"""Rollback and snapshots against the real daemon, through the CLI, with qemu-io as the guest."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .harness import Daemon, cdp, need_qemu_tools, same_bytes, short_tmp, wait_for
from .test_replication_e2e import qemu_io

pytestmark = pytest.mark.integration


def _config(tmp: Path, sock: Path, extra: str = "") -> Path:
    subprocess.run(["truncate", "-s", "16M", str(tmp / "disk0.raw")], check=True)
    cfg = tmp / "cdp.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp / "state"}"\napi = "unix:{sock / "api.sock"}"\n'
        f'log_format = "json"\n\n[[volume]]\nname = "disk0"\nsize = "16MiB"\nsource = "nbd"\n'
        f'image = "{tmp / "disk0.raw"}"\nlisten = "unix:{sock / "disk0.sock"}"\n{extra}'
    )
    return cfg


def test_rollback_dry_run_refusal_force_and_roll_forward(tmp_path: Path) -> None:
    need_qemu_tools()
    with short_tmp() as sock:
        cfg = _config(tmp_path, sock)
        d = Daemon(cfg, tmp_path / "d.log").start()
        try:
            wait_for(lambda: d.volume("disk0")["onboarding"]["state"] == "done", "onboarding")
            qemu_io(sock, "write -P 0x41 0 2M", "write -P 0x42 8M 1M")
            cdp(cfg, "checkpoint", "disk0", "--name", "good")
            cdp(cfg, "snapshot", "create", "disk0", "--name", "s-good", "--lock", "1h")
            cdp(
                cfg,
                "restore",
                "disk0",
                "--at",
                "checkpoint:good",
                "--output",
                str(tmp_path / "good.raw"),
            )
            (tmp_path / "evil.bin").write_bytes(bytes(range(256)) * 4096)
            qemu_io(sock, f"write -s {tmp_path / 'evil.bin'} 0 1M", "write -P 0x66 12M 64k")
            evil = tmp_path / "evil.raw"
            subprocess.run(
                ["cp", "--sparse=always", str(tmp_path / "disk0.raw"), str(evil)], check=True
            )

            out = cdp(cfg, "rollback", "disk0", "--to", "checkpoint:good", "--dry-run").out
            assert "dry run: nothing changed" in out and "checkpoint before: good" in out, out
            assert "snapshot before:   s-good" in out, out
            assert same_bytes(tmp_path / "disk0.raw", evil), "a dry run changes nothing"
            # no terminal and no --yes: refused as a usage error
            assert cdp(cfg, "rollback", "disk0", "--to", "checkpoint:good", check=None).code == 2

            # a connected client: refused without --force
            client = subprocess.Popen(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    "sleep 60000",
                    f"nbd+unix:///disk0?socket={sock / 'disk0.sock'}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_for(lambda: d.volume("disk0")["capture"]["connections"] > 0, "the client")
                r = cdp(cfg, "rollback", "disk0", "--to", "checkpoint:good", "--yes", check=None)
                assert r.code == 1 and "connected" in r.err, r.err
                assert same_bytes(tmp_path / "disk0.raw", evil)
                r = cdp(cfg, "rollback", "disk0", "--to", "checkpoint:good", "--yes", "--force")
                assert "restart the VM" in r.err, r.err
            finally:
                client.kill()
                client.wait(10)
            assert same_bytes(tmp_path / "disk0.raw", tmp_path / "good.raw")
            latest = tmp_path / "latest.raw"
            cdp(cfg, "restore", "disk0", "--at", "latest", "--output", str(latest))
            assert same_bytes(latest, tmp_path / "good.raw"), "the rollback is journaled"
            pre = next(
                line.split("checkpoint:")[1].rstrip("`")
                for line in r.out.splitlines()
                if "checkpoint:pre-rollback-" in line
            )
            cdp(cfg, "rollback", "disk0", "--to", f"checkpoint:{pre}", "--yes")
            assert same_bytes(tmp_path / "disk0.raw", evil), "rolling forward again"
            # the snapshot is locked: no path deletes it
            assert cdp(cfg, "snapshot", "delete", "disk0", "--name", "s-good", check=None).code == 1
            r = cdp(cfg, "snapshot", "delete", "disk0", "--name", "nope", check=None)
            assert r.code == 1 and "no snapshot named 'nope'" in r.err, r.err
            snaps = json.loads(cdp(cfg, "snapshot", "list", "disk0", "--json").out)
            assert [s["name"] for s in snaps] == ["s-good"]
            cdp(cfg, "rollback", "disk0", "--to", "snapshot:s-good", "--yes")
            assert same_bytes(tmp_path / "disk0.raw", tmp_path / "good.raw")
            tl = cdp(cfg, "timeline", "disk0", "--since", "10m").out
            assert "checkpoint good (seq" in tl and "-> checkpoint:good" in tl, tl
            assert "snapshot s-good (seq" in tl and "locked until" in tl, tl
            assert "checkpoint pre-rollback-" in tl and "#" in tl, tl
            doc = json.loads(cdp(cfg, "timeline", "disk0", "--json").out)
            assert sum(r["bytes"] for r in doc["rate"]) >= 3 << 20, doc["rate"]
        finally:
            d.stop()
