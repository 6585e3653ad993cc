"""The daemon as a real subprocess, driven by every ``cdp`` verb as a subprocess (issue 3).

The protected volume is a raw image made with ``qemu-img create`` and written with
``qemu-io``, captured by the hash scanner (``source = "scan"``). Restores are compared byte
for byte (``cmp``) and with ``qemu-img compare`` against copies of the image taken at the
points restored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    CLI,
    Daemon,
    cdp,
    need_qemu_tools,
    qemu_img_create,
    qemu_img_identical,
    qemu_io_write,
    same_bytes,
    short_tmp,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INVALID = sorted((REPO / "tests" / "data" / "configs" / "invalid").glob("*.toml"))
MiB = 1 << 20


@pytest.fixture
def site() -> Iterator[Path]:
    """A short folder holding a 16 MiB raw image with 1 MiB of 0xab at its start."""
    need_qemu_tools()
    with short_tmp() as folder:
        qemu_img_create(folder / "disk.raw", "16M")
        qemu_io_write(folder / "disk.raw", 0xAB, "0", "1M")
        yield folder


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is SIGKILLed at teardown if it still runs."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def start(daemons: list[Daemon], config: Path, log: Path) -> Daemon:
    d = Daemon(config, log)
    daemons.append(d)
    return d.start()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_every_verb_against_a_live_daemon(site: Path, daemons: list[Daemon]) -> None:
    image = site / "disk.raw"
    cfg = write_config(site, image=image)
    d = start(daemons, cfg, site / "daemon.log")
    onboarded = d.wait_onboarded()
    assert onboarded["size"] == 16 * MiB
    assert onboarded["source"] == "scan"

    # status, both forms
    human = cdp(cfg, "status").out
    assert re.search(r"^\s+disk0\s+disk0\s+16MiB\s+scan\s+idle\s", human, re.M), human
    assert "done (seq " in human
    assert "window:" in human and "seq 0.." in human
    assert human.rstrip().endswith("alerts: none")
    assert "{" not in human
    res = cdp(cfg, "status", "--json")
    doc = json.loads(res.out)
    assert res.out == json.dumps(doc, indent=2, sort_keys=True) + "\n"  # stable for scripts
    assert set(doc) >= {"daemon", "groups", "volumes", "alerts"}
    assert doc["alerts"] == []
    group = doc["groups"][0]
    assert group["name"] == "disk0" and group["volumes"] == ["disk0"]
    assert group["last_checkpoint"]["name"] == "onboarded:disk0"

    # checkpoint, and a copy of the image as it is at that point
    at_cp = site / "at-checkpoint.raw"
    shutil.copyfile(image, at_cp)
    out = cdp(cfg, "checkpoint", "disk0", "--name", "before-writes").out
    m = re.fullmatch(r"checkpoint before-writes: seq (\d+) at (\S+Z) \(group disk0\)\n", out)
    assert m, out
    cp_seq, cp_time = int(m[1]), m[2]
    assert d.group()["last_checkpoint"] == {
        "name": "before-writes",
        "seq": cp_seq,
        "kind": "crash",
        "ts_ns": d.group()["last_checkpoint"]["ts_ns"],
    }

    # more writes, captured by the scanner
    t_write = time.time_ns()
    qemu_io_write(image, 0xCD, "4M", "512k")
    qemu_io_write(image, 0x00, "0", "64k")  # zeroing counts as a change too
    qemu_io_write(image, 0xEF, "16320k", "64k")  # the last 64 KiB
    d.wait_captured(t_write)
    assert not same_bytes(image, at_cp)

    def restore(when: str, name: str, *extra: str, code: int = 0) -> tuple[Path, str]:
        target = site / name
        res = cdp(cfg, "restore", "disk0", "--at", when, "--output", str(target), *extra,
                  check=code)  # fmt: skip
        return target, res.out + res.err

    # restore at the checkpoint: bit-exact against the copy, sparse
    r1, out = restore("checkpoint:before-writes", "r-cp.raw")
    assert same_bytes(r1, at_cp) and qemu_img_identical(r1, at_cp)
    assert re.fullmatch(
        rf"restored disk0 at seq {cp_seq} \({re.escape(cp_time)}\) to {re.escape(str(r1))}: "
        r"16777216 bytes, \S+ \S+ allocated\n",
        out,
    ), out
    assert allocated(r1) < 4 * MiB  # 1 MiB of data in 16 MiB: holes, not written zeros

    # the same point by seq and by its exact time (ISO-8601)
    r2, _ = restore(f"seq:{cp_seq}", "r-seq.raw")
    assert same_bytes(r2, at_cp)
    r3, _ = restore(cp_time, "r-time.raw")
    assert same_bytes(r3, at_cp)

    # latest: the image as it is now
    r4, _ = restore("latest", "r-latest.raw")
    assert same_bytes(r4, image) and qemu_img_identical(r4, image)

    # relative: once the last record is over a second old, -1s is the newest point too
    last_ts = d.group()["window"]["last_ts_ns"]
    wait_for(lambda: time.time_ns() > last_ts + 1_500_000_000, "the last record to age 1.5s")
    r5, _ = restore("-1s", "r-rel.raw")
    assert same_bytes(r5, image)

    # never overwrite, never follow a symlink
    precious = site / "precious.raw"
    precious.write_bytes(b"keep me")
    _, err = restore("latest", "precious.raw", code=1)
    assert "already exists; refusing to overwrite it" in err and "--force" in err
    assert precious.read_bytes() == b"keep me"
    link = site / "link.raw"
    link.symlink_to(site / "link-target.raw")
    _, err = restore("latest", "link.raw", code=1)
    assert "is a symlink; refusing to follow it" in err
    assert not (site / "link-target.raw").exists()
    # ... unless forced
    restore("checkpoint:before-writes", "precious.raw", "--force")
    assert same_bytes(precious, at_cp)

    # out of the window: exit 1, the message names the retained window; nothing written
    _, err = restore("seq:999999", "r-none.raw", code=1)
    window = d.group()["window"]
    assert (
        f"Error: no retained point for seq:999999 of disk0: the journal holds "
        f"seq {window['first_seq']}..{window['last_seq']}, from the journal start to "
    ) in err
    _, err = restore("-30d", "r-none.raw", code=1)
    assert "no retained point for -30d of disk0: the journal holds seq " in err
    _, err = restore("checkpoint:no-such", "r-none.raw", code=1)
    assert "no retained checkpoint named 'no-such'" in err
    assert not (site / "r-none.raw").exists()

    # usage errors: exit 2, before anything is asked of the daemon
    _, err = restore("yesterday", "r-none.raw", code=2)
    assert 'cannot read WHEN "yesterday"' in err
    _, err = restore("2026-11-22T03:15:00", "r-none.raw", code=2)
    assert "no zone" in err
    res = cdp(cfg, "restore", "nope", "--at", "latest", "--output", str(site / "x"), check=2)
    assert "no volume 'nope'" in res.err and "volumes: disk0" in res.err
    assert cdp(cfg, "checkpoint", "nope", check=2).err.startswith("Error: no volume 'nope'")
    assert cdp(cfg, "checkpoint", "--group", "nope", check=2).err.startswith(
        "Error: no group 'nope'"
    )
    assert "no volume 'nope'" in cdp(cfg, "journal", "rebuild-index", "nope", check=2).err
    assert not (site / "r-none.raw").exists() and not (site / "x").exists()

    # a volume this config names but the running daemon does not (it was started with an
    # older config): the daemon answers 404, an operation failure, exit 1
    newer = site / "newer.toml"
    newer.write_text(
        cfg.read_text() + '\n[[volume]]\nname = "disk9"\nsize = "1MiB"\nsource = "scan"\n'
        'path = "disk9.raw"\n'
    )
    assert cdp(newer, "checkpoint", "disk9", check=1).err.startswith(
        "Error: no volume named 'disk9'"
    )
    res = cdp(newer, "restore", "disk9", "--at", "latest", "--output", str(site / "x"), check=1)
    assert "no volume named 'disk9'" in res.err and not (site / "x").exists()

    # group checkpoint with a generated name
    out = cdp(cfg, "checkpoint", "--group", "disk0").out
    assert re.fullmatch(r"checkpoint cp-\d+: seq \d+ at \S+Z \(group disk0\)\n", out), out

    # rebuild the index; every point still reads back the same
    out = cdp(cfg, "journal", "rebuild-index", "disk0").out
    assert re.fullmatch(
        r"rebuilt the journal index of group disk0 \(volume disk0\): "
        r"\d+ segment\(s\), \d+ block\(s\)\n",
        out,
    ), out
    r6, _ = restore("checkpoint:before-writes", "r-cp2.raw")
    assert same_bytes(r6, at_cp)
    r7, _ = restore("latest", "r-latest2.raw")
    assert same_bytes(r7, image)

    # a second daemon on the same state_dir refuses to start, and leaves the first alone
    second = cdp(cfg, "daemon", check=1)
    assert second.err.startswith(f"Error: another cdp daemon (pid {d.proc and d.proc.pid}) is")
    assert "is using state_dir" in second.err
    st = d.status()["daemon"]
    assert d.proc is not None and st["pid"] == d.proc.pid
    # the service runs the collector policy: start-up's objects are frozen, none thawed yet
    assert st["gc"]["frozen_objects"] > 0 and st["gc"]["thaws"] == 0

    assert d.stop() == 0
    assert "Traceback" not in d.log()


def test_sigterm_then_restart_reopens_cleanly(site: Path, daemons: list[Daemon]) -> None:
    image = site / "disk.raw"
    cfg = write_config(site, image=image)
    d = start(daemons, cfg, site / "daemon.log")
    d.wait_onboarded()
    shutil.copyfile(image, site / "at-cp.raw")
    cdp(cfg, "checkpoint", "disk0", "--name", "kept")
    t_write = time.time_ns()
    qemu_io_write(image, 0x5A, "8M", "1M")
    d.wait_captured(t_write)
    before = json.loads(cdp(cfg, "status", "--json").out)["groups"][0]

    assert d.stop() == 0
    assert "daemon stopped; journals synced and closed" in d.log()
    assert not (site / "api.sock").exists()

    d2 = start(daemons, cfg, site / "daemon2.log")
    vol = d2.wait_onboarded()
    d2.wait_captured(time.time_ns())  # the catch-up pass found nothing new
    after = json.loads(cdp(cfg, "status", "--json").out)["groups"][0]
    assert after["window"] == before["window"]
    assert after["last_checkpoint"] == before["last_checkpoint"]
    assert after["last_checkpoint"]["name"] == "kept"
    assert after["recovery"]["truncated_segment"] is None
    assert after["alerts"] == [] and d2.status()["alerts"] == []
    assert vol["capture"]["changed_bytes"] == 0
    assert "volume onboarded" not in d2.log()  # not onboarded a second time

    cdp(cfg, "restore", "disk0", "--at", "checkpoint:kept", "--output", str(site / "r1.raw"))
    assert same_bytes(site / "r1.raw", site / "at-cp.raw")
    cdp(cfg, "restore", "disk0", "--at", "latest", "--output", str(site / "r2.raw"))
    assert same_bytes(site / "r2.raw", image)

    # SIGINT (Ctrl-C in a terminal) stops it the same way
    d2.signal(signal.SIGINT)
    assert d2.wait_exit() == 0


def test_kill9_then_restart(site: Path, daemons: list[Daemon]) -> None:
    image = site / "disk.raw"
    cfg = write_config(site, image=image)
    d = start(daemons, cfg, site / "daemon.log")
    d.wait_onboarded()
    t_write = time.time_ns()
    qemu_io_write(image, 0x77, "2M", "3M")
    d.wait_captured(t_write)
    captured_window = d.group()["window"]
    old_pid = d.status()["daemon"]["pid"]
    d.signal(signal.SIGKILL)
    assert d.wait_exit() == -signal.SIGKILL

    # Written while the daemon was down: the first pass after the restart must catch it.
    qemu_io_write(image, 0x88, "12M", "256k")
    d2 = start(daemons, cfg, site / "daemon2.log")  # the stale API socket is replaced
    d2.wait_onboarded()
    d2.wait_captured(time.time_ns())
    doc = json.loads(cdp(cfg, "status", "--json").out)
    assert doc["daemon"]["pid"] != old_pid
    group = doc["groups"][0]
    # Killed while idle (the last pass was synced): the journal reopens without a torn tail,
    # keeps all it had, and has the catch-up write on top.
    assert group["recovery"]["truncated_segment"] is None
    assert doc["alerts"] == [] and group["alerts"] == []
    assert group["window"]["first_seq"] == captured_window["first_seq"]
    assert group["window"]["last_seq"] > captured_window["last_seq"]
    cdp(cfg, "restore", "disk0", "--at", "latest", "--output", str(site / "r.raw"))
    assert same_bytes(site / "r.raw", image) and qemu_img_identical(site / "r.raw", image)
    cdp(cfg, "restore", "disk0", "--at", f"seq:{captured_window['last_seq']}",
        "--output", str(site / "r-before.raw"))  # fmt: skip
    assert not same_bytes(site / "r-before.raw", image)  # the 0x88 write came later
    assert d2.stop() == 0


def test_kill9_during_a_restore_leaves_no_hold(site: Path, daemons: list[Daemon]) -> None:
    """A download holds its point; a daemon killed mid-download must not keep it forever."""
    cfg = write_config(site, image=site / "disk.raw")
    d = start(daemons, cfg, site / "daemon.log")
    d.wait_onboarded()
    seq = d.group()["window"]["last_seq"]
    # A client that asks for the image and then stops reading: the daemon blocks mid-stream.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(site / "api.sock"))
        client.sendall(
            f"GET /v1/volumes/disk0/image?seq={seq} HTTP/1.1\r\nHost: cdp\r\n\r\n".encode()
        )
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        held = wait_for(lambda: d.group()["holds"], "the download's hold")
        assert [(h["kind"], h["seq"]) for h in held] == [("export", seq)]
        d.signal(signal.SIGKILL)
        assert d.wait_exit() == -signal.SIGKILL
    d2 = start(daemons, cfg, site / "daemon2.log")
    assert d2.group()["holds"] == []
    assert "released a stale image hold" in d2.log()
    assert d2.stop() == 0


def test_json_logs_parse_and_carry_no_block_data(site: Path, daemons: list[Daemon]) -> None:
    image = site / "disk.raw"
    marker = b"CDP-E2E-BLOCK-PAYLOAD-"
    with open(image, "r+b") as f:  # recognizable bytes, to be sure they never reach the log
        f.seek(5 * MiB)
        f.write(marker * 4000)
    cfg = write_config(site, image=image, log_format="json")
    d = start(daemons, cfg, site / "daemon.log")
    d.wait_onboarded()
    cdp(cfg, "checkpoint", "disk0", "--name", "logged")
    cdp(cfg, "restore", "disk0", "--at", "latest", "--output", str(site / "r.raw"))
    cdp(cfg, "journal", "rebuild-index", "disk0")
    cdp(cfg, "restore", "disk0", "--at", "seq:999999", "--output", str(site / "x"), check=1)
    assert d.stop() == 0

    text = d.log()
    lines = text.splitlines()
    assert len(lines) >= 4
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for rec in records:
        assert isinstance(rec, dict)
        assert list(rec)[:4] == ["ts", "level", "logger", "msg"], rec
        assert rec["level"] in ("debug", "info", "warning", "error", "critical")
        for value in rec.values():
            assert not (isinstance(value, str) and len(value) > 2000), rec
    msgs = [r["msg"] for r in records]
    assert "daemon ready" in msgs and "volume onboarded" in msgs and "checkpoint" in msgs
    assert any(r.get("checkpoint") == "logged" and r.get("group") == "disk0" for r in records)
    assert "daemon stopped; journals synced and closed" in msgs
    assert marker.decode() not in text
    assert "\\u00ab" not in text and "\xab" not in text  # nor the 0xab fill, in any form


def _expected_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ").strip()


def test_invalid_configs_exit_2_naming_file_and_key_and_create_nothing(tmp_path: Path) -> None:
    """Every invalid example, run as ``cdp daemon``; all at once, they are independent."""
    defaults = [Path("/var/lib/cdp"), Path("/run/cdp")]
    existed = {p: p.exists() for p in defaults}
    procs = []
    for path in INVALID:
        folder = tmp_path / path.stem
        folder.mkdir()
        copy = folder / path.name
        copy.write_bytes(path.read_bytes())
        # relative names in the message: the file as given on the command line
        proc = subprocess.Popen(
            [*CLI, "daemon", "--config", path.name],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CDP_CONFIG": ""},
        )
        procs.append((path, folder, proc))
    for path, folder, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (path.name, err)
        key = _expected_key(path)
        first = err.splitlines()[0]
        if key == "<file>":  # a file-level problem (TOML syntax): no key
            assert first.startswith(f"Error: {path.name}: "), first
        else:
            assert first.startswith(f"Error: {path.name}: {key}: "), (first, key)
        assert "Traceback" not in err and out == ""
        assert sorted(p.name for p in folder.iterdir()) == [path.name], path.name
    assert {p: p.exists() for p in defaults} == existed


def test_daemon_refuses_a_non_socket_api_path(site: Path) -> None:
    cfg = write_config(site, image=site / "disk.raw")
    (site / "api.sock").write_text("mine")
    proc = subprocess.run(
        [*CLI, "daemon", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last_lines: list[Any] = proc.stderr.splitlines()[-2:]
    assert last_lines[0].startswith("Error: the daemon stopped: ")
    assert "api.sock exists and is not a socket" in last_lines[0]
    assert last_lines[1].startswith("Try: ")
    assert (site / "api.sock").read_text() == "mine"
