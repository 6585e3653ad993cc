"""Both sites as real processes: `cdp daemon` ships to `cdp replica serve` on loopback.

A real NBD client (qemu-io) writes through the primary's splitter; the DR site must then
restore every checkpoint, and latest, bit for bit as the primary does, through its own
`cdp restore --config dr.toml`, also after kill -9 of the receiver and of the sender
mid-stream.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .harness import CLI, Daemon, cdp, need_qemu_tools, same_bytes, short_tmp, wait_for

pytestmark = pytest.mark.integration

TOKEN = "e2e-token-5f1d2c3b4a"


class Receiver(Daemon):
    """``cdp replica serve --config CONFIG`` (same waits and signals as the daemon)."""

    def start(self) -> Receiver:
        import os

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "replica", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "CDP_CONFIG": ""},
            )
        wait_for(self._answers, "the receiver's API to answer")
        return self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sites(tmp: Path, sock: Path, port: int, *, extra: str = "") -> tuple[Path, Path]:
    (tmp / "tokens").write_text(f"{TOKEN}\n")
    (tmp / "token").write_text(f"{TOKEN}\n")
    (tmp / "tokens").chmod(0o600)
    (tmp / "token").chmod(0o600)
    subprocess.run(["truncate", "-s", "32M", str(tmp / "disk0.raw")], check=True)
    dr = tmp / "dr.toml"
    dr.write_text(
        f'[daemon]\nlog_format = "json"\n\n[receiver]\nlisten = "127.0.0.1:{port}"\n'
        f'tokens_file = "{tmp / "tokens"}"\nstate_dir = "{tmp / "dr-state"}"\n'
        f'api = "unix:{sock / "dr-api.sock"}"\n'
    )
    primary = tmp / "primary.toml"
    primary.write_text(
        f'[daemon]\nstate_dir = "{tmp / "p-state"}"\napi = "unix:{sock / "api.sock"}"\n'
        f'log_format = "json"\n\n[[volume]]\nname = "disk0"\nsize = "32MiB"\nsource = "nbd"\n'
        f'image = "{tmp / "disk0.raw"}"\nlisten = "unix:{sock / "disk0.sock"}"\n\n'
        f'[[replica]]\nname = "dr1"\nurl = "http://127.0.0.1:{port}"\n'
        f'token_file = "{tmp / "token"}"\n{extra}'
    )
    return primary, dr


def qemu_io(sock: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    argv.append(f"nbd+unix:///disk0?socket={sock / 'disk0.sock'}")
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def replica_of(d: Daemon) -> dict[str, Any]:
    g = d.group("disk0")
    r: dict[str, Any] = g["replicas"][0]
    r["last_seq_primary"] = g["window"]["last_seq"]
    return r


def caught_up(d: Daemon) -> bool:
    r = replica_of(d)
    return bool(r["acked_seq"] == r["last_seq_primary"] and r["state"] == "caught-up")


def restores_match(tmp: Path, primary: Path, dr: Path, when: str) -> None:
    a, b = tmp / "a.raw", tmp / "b.raw"
    for p in (a, b):
        p.unlink(missing_ok=True)
    cdp(primary, "restore", "disk0", "--at", when, "--output", str(a))
    cdp(dr, "restore", "disk0", "--at", when, "--output", str(b))
    assert same_bytes(a, b), f"DR restore of {when} differs from the primary's"


def test_replicates_checkpoints_and_restores_at_dr(tmp_path: Path) -> None:
    need_qemu_tools()
    with short_tmp() as sock:
        primary, dr = sites(tmp_path, sock, free_port())
        rcv = Receiver(dr, tmp_path / "dr.log").start()
        d = Daemon(primary, tmp_path / "p.log").start()
        try:
            wait_for(lambda: d.volume("disk0")["onboarding"]["state"] == "done", "onboarding")
            qemu_io(sock, "write -P 0x11 0 1M", "write -P 0x22 4M 64k", "write -z 8M 1M")
            cdp(primary, "checkpoint", "disk0", "--name", "before")
            qemu_io(sock, "write -P 0x33 0 512k", "discard 4M 64k")
            cdp(primary, "checkpoint", "disk0", "--name", "after")
            wait_for(lambda: caught_up(d), "the replica to catch up")
            for when in ("checkpoint:before", "checkpoint:after", "latest"):
                restores_match(tmp_path, primary, dr, when)
            st = cdp(primary, "status").out
            assert "replica:" in st and "caught-up" in st, st
            dst = cdp(dr, "status").out
            assert "replica of:" in dst, dst
            out = cdp(primary, "verify", "disk0", "--replica", "dr1").out
            assert "is identical to the primary at seq" in out, out
            assert cdp(primary, "verify", "disk0", "--replica", "nope", check=None).code == 2
            # the DR site refuses to write its own records
            assert cdp(dr, "checkpoint", "disk0", check=None).code == 1
            # but keeps snapshots of its own and serves past points, like the primary
            cdp(dr, "snapshot", "create", "disk0", "--name", "dr-keep", "--at", "checkpoint:before")
            assert "dr-keep" in cdp(dr, "snapshot", "list", "disk0").out
            assert cdp(dr, "rollback", "disk0", "--to", "latest", "--yes", check=None).code == 1
            exp = subprocess.Popen(
                [*CLI, "export", "disk0", "--at", "snapshot:dr-keep", "--config", str(dr)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert exp.stdout is not None
                uri = exp.stdout.readline().rsplit(": ", 1)[1].strip()
                got = tmp_path / "dr-export.raw"
                subprocess.run(["nbdcopy", uri, str(got)], check=True, timeout=60)
                a = tmp_path / "before.raw"
                cdp(primary, "restore", "disk0", "--at", "checkpoint:before", "--output", str(a))
                assert same_bytes(got, a)
            finally:
                exp.terminate()
                exp.wait(30)
        finally:
            d.stop()
            rcv.stop()


@pytest.mark.slow  # 24 s; tests/replication/test_chaos.py restarts each side by default
def test_kill9_receiver_and_sender_mid_stream(tmp_path: Path) -> None:
    need_qemu_tools()
    rng = random.Random(7)
    with short_tmp() as sock:
        port = free_port()
        primary, dr = sites(tmp_path, sock, port, extra='bandwidth = "40Mbit"\n')
        rcv = Receiver(dr, tmp_path / "dr.log").start()
        d = Daemon(primary, tmp_path / "p.log").start()
        names: list[str] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            k = 0
            while not stop.is_set():
                off = rng.randrange(0, 30) * (1 << 20)
                try:
                    qemu_io(sock, f"write -P {k % 250 + 1} {off} 1M")
                except subprocess.CalledProcessError as e:  # the primary is being killed
                    errors.append(e)
                k += 1

        try:
            wait_for(lambda: d.volume("disk0")["onboarding"]["state"] == "done", "onboarding")
            t = threading.Thread(target=writer, daemon=True)
            t.start()
            for round_ in range(3):
                wait_for(lambda: replica_of(d)["acked_seq"] > 0, "shipping to start")
                name = f"cp{round_}"
                cdp(primary, "checkpoint", "disk0", "--name", name)
                names.append(name)
                rcv.kill()
                rcv = Receiver(dr, tmp_path / "dr.log").start()
                cdp(primary, "checkpoint", "disk0", "--name", name + "b")
                names.append(name + "b")
                wait_for(lambda: replica_of(d)["state"] == "streaming" or caught_up(d), "resume")
            stop.set()
            t.join(60)
            d.kill()  # the sender dies mid-stream too (pending data in flight)
            d = Daemon(primary, tmp_path / "p.log").start()
            wait_for(lambda: caught_up(d), "the replica to catch up after both kills")
            for n in names:
                restores_match(tmp_path, primary, dr, f"checkpoint:{n}")
            restores_match(tmp_path, primary, dr, "latest")
            assert replica_of(d)["reconnects"] >= 0
        finally:
            stop.set()
            d.stop()
            rcv.stop()


def test_an_anomaly_pins_the_same_clean_point_at_both_sites(tmp_path: Path) -> None:
    """The detector's alarm on the primary replicates: the DR site locks the same point."""
    need_qemu_tools()
    with short_tmp() as sock:
        primary, dr = sites(tmp_path, sock, free_port())
        rcv = Receiver(dr, tmp_path / "dr.log").start()
        d = Daemon(primary, tmp_path / "p.log").start()
        try:
            wait_for(lambda: d.volume("disk0")["onboarding"]["state"] == "done", "onboarding")
            qemu_io(sock, "write -P 0x41 0 4M", "write -P 0x42 8M 2M")  # ordinary data
            cdp(primary, "checkpoint", "disk0", "--name", "before")
            (tmp_path / "cipher.bin").write_bytes(os.urandom(4 << 20))
            qemu_io(sock, f"write -s {tmp_path / 'cipher.bin'} 0 4M")  # encrypted in place
            alerts = wait_for(
                lambda: [a for a in d.status()["alerts"] if "possible ransomware" in a],
                "the detector to flag the burst",
            )
            assert "last clean point snapshot:clean-" in alerts[0], alerts
            name = alerts[0].split("snapshot:")[1].split(" ")[0]
            wait_for(lambda: caught_up(d), "the replica to catch up")

            def pinned_at_dr() -> dict[str, Any] | None:
                snaps = json.loads(cdp(dr, "snapshot", "list", "disk0", "--json").out)
                return next((s for s in snaps if s["name"] == name), None)

            s = wait_for(pinned_at_dr, "the DR site to pin the same point")
            assert s["kind"] == "anomaly" and s["locked_until_ns"] > time.time_ns()
            assert cdp(dr, "snapshot", "delete", "disk0", "--name", name, check=None).code == 1
            restores_match(tmp_path, primary, dr, f"snapshot:{name}")
            a = tmp_path / "clean.raw"
            b = tmp_path / "before.raw"
            cdp(primary, "restore", "disk0", "--at", "checkpoint:before", "--output", str(b))
            cdp(primary, "restore", "disk0", "--at", f"snapshot:{name}", "--output", str(a))
            assert same_bytes(a, b), "the clean point is the state before the burst"
        finally:
            d.stop()
            rcv.stop()
