"""``cdp restore --format raw|qcow2|vmdk|vhdx`` and ``--group`` against the real daemon (issue 6).

One daemon for the module protects a two-volume group (``vm1``: disk0, disk1), both raw
images captured by the hash scanner and written with ``qemu-io``. A group checkpoint is
taken, copies of both images are kept as they were at it, and both are written again after
it, so the checkpoint and latest differ. Every restore is read back with ``qemu-img compare``
(and ``qemu-img info`` for the format); failures must leave neither the output nor the
hidden temporary files behind.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import (
    CLI,
    DEADLINE_S,
    Daemon,
    need_qemu_tools,
    qemu_img_create,
    qemu_io_write,
    same_bytes,
    short_tmp,
    wait_for,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 8 * MiB
VOLUMES = ("disk0", "disk1")
CONVERTED = ("qcow2", "vmdk", "vhdx")


@dataclass(frozen=True)
class Site:
    folder: Path
    config: Path
    daemon: Daemon
    cp_seq: int  # the group checkpoint "cp1"
    at_cp: dict[str, Path]  # copies of the images as they were at cp1


@dataclass
class Res:
    code: int
    out: str
    err: str


def cdp(site: Site, *argv: str, check: int | None = 0, env: dict[str, str] | None = None) -> Res:
    proc = subprocess.run(
        [*CLI, *argv, "--config", str(site.config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=DEADLINE_S,
        env={**os.environ, "CDP_CONFIG": "", **(env or {})},
    )
    res = Res(proc.returncode, proc.stdout, proc.stderr)
    if check is not None:
        assert res.code == check, f"cdp {' '.join(argv)} exited {res.code}: {res.err}{res.out}"
    return res


def config_text(folder: Path) -> str:
    """Like tests/e2e/harness.write_config, with two scan volumes in one group."""
    text = (
        '[daemon]\nstate_dir = "state"\napi = "unix:api.sock"\nlog_format = "text"\n'
        'log_level = "info"\nevent_loop = "asyncio"\n'
    )
    for name in VOLUMES:
        text += (
            f'\n[[volume]]\nname = "{name}"\ngroup = "vm1"\nsize = "8MiB"\nsource = "scan"\n'
            f'path = "{folder / (name + ".raw")}"\npoll_interval = "200ms"\n'
            'scan_rate = "1GiB/s"\n'
        )
    return text


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    need_qemu_tools()
    with short_tmp() as folder:
        images = {name: folder / f"{name}.raw" for name in VOLUMES}
        for image in images.values():
            qemu_img_create(image, "8M")
        qemu_io_write(images["disk0"], 0xAB, "0", "1M")
        qemu_io_write(images["disk1"], 0x11, "2M", "1M")
        cfg = folder / "cdp.toml"
        cfg.write_text(config_text(folder))
        daemon = Daemon(cfg, folder / "daemon.log")
        try:
            daemon.start()
            for name in VOLUMES:
                daemon.wait_onboarded(name)
            t_write = time.time_ns()
            qemu_io_write(images["disk0"], 0xCD, "4M", "512k")
            qemu_io_write(images["disk1"], 0x22, "6M", "256k")
            for name in VOLUMES:
                daemon.wait_captured(t_write, name)
            at_cp = {}
            for name, image in images.items():
                at_cp[name] = folder / f"{name}.at-cp1.raw"
                shutil.copyfile(image, at_cp[name])
            proc = subprocess.run(
                [*CLI, "checkpoint", "--group", "vm1", "--name", "cp1", "--config", str(cfg)],
                capture_output=True, text=True, check=True, timeout=DEADLINE_S,
            )  # fmt: skip
            m = re.fullmatch(r"checkpoint cp1: seq (\d+) at \S+Z \(group vm1\)\n", proc.stdout)
            assert m, proc.stdout
            # after the checkpoint: latest differs from cp1 on both volumes
            t_write = time.time_ns()
            qemu_io_write(images["disk0"], 0xEE, "0", "64k")
            qemu_io_write(images["disk1"], 0x33, "7M", "64k")
            for name in VOLUMES:
                daemon.wait_captured(t_write, name)
            yield Site(folder, cfg, daemon, int(m[1]), at_cp)
            assert daemon.stop() == 0
            assert "Traceback" not in daemon.log()
        finally:
            daemon.kill()


@pytest.fixture
def out(site: Site, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty folder per test, next to the daemon's files."""
    path = site.folder / f"out-{request.node.name}".replace("[", "-").replace("]", "")
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def info(path: Path) -> dict[str, object]:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def identical(a: Path, fmt_a: str, b: Path, fmt_b: str = "raw") -> bool:
    """``qemu-img compare -f FMT_A -F FMT_B`` (exit 0 identical, 1 different)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def hidden(folder: Path) -> list[str]:
    """Names in *folder* that start with a dot (the restore's temporary files)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def summary(volume: str, seq: int, path: Path, fmt: str) -> str:
    how = "" if fmt == "raw" else f" as {fmt}"
    return (
        rf"restored {volume} at seq {seq} \(\S+Z\) to {re.escape(str(path))}{how}: "
        rf"{SIZE} bytes, \S+ \S+ allocated"
    )


@pytest.mark.parametrize("fmt", CONVERTED)
def test_each_format_reads_back_identical_to_the_raw_restore(
    site: Site, out: Path, fmt: str
) -> None:
    raw = out / "disk0.raw"
    res = cdp(site, "restore", "disk0", "--at", "checkpoint:cp1", "--output", str(raw))
    assert re.fullmatch(summary("disk0", site.cp_seq, raw, "raw") + "\n", res.out), res.out
    assert same_bytes(raw, site.at_cp["disk0"])

    image = out / f"disk0.{fmt}"
    res = cdp(site, "restore", "disk0", "--at", "checkpoint:cp1", "--output", str(image),
              "--format", fmt)  # fmt: skip
    assert res.err == ""  # not a terminal: no progress line
    assert re.fullmatch(summary("disk0", site.cp_seq, image, fmt) + "\n", res.out), res.out
    doc = info(image)
    assert doc["format"] == fmt and doc["virtual-size"] == SIZE
    assert identical(image, fmt, raw)
    assert not identical(image, fmt, site.folder / "disk0.raw")  # latest differs from cp1
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == sorted([raw.name, image.name])


def test_format_raw_is_the_default_and_explicit_raw_is_the_same(site: Site, out: Path) -> None:
    a, b = out / "a.raw", out / "b.raw"
    cdp(site, "restore", "disk1", "--at", f"seq:{site.cp_seq}", "--output", str(a))
    cdp(site, "restore", "disk1", "--at", f"seq:{site.cp_seq}", "--output", str(b),
        "--format", "raw")  # fmt: skip
    assert same_bytes(a, b) and same_bytes(a, site.at_cp["disk1"])
    assert info(b)["format"] == "raw"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_group_restore_writes_every_volume_at_one_seq(site: Site, out: Path, fmt: str) -> None:
    folder = out / "vm1" / "cp1"  # created, parents too
    res = cdp(site, "restore", "--group", "vm1", "--at", "checkpoint:cp1",
              "--output", str(folder), "--format", fmt)  # fmt: skip
    lines = res.out.splitlines()
    assert len(lines) == 2, res.out
    for line, name in zip(lines, VOLUMES, strict=True):
        assert re.fullmatch(summary(name, site.cp_seq, folder / f"{name}.{fmt}", fmt), line)
    assert sorted(p.name for p in folder.iterdir()) == [f"{n}.{fmt}" for n in VOLUMES]
    for name in VOLUMES:
        single = out / f"{name}.single.raw"
        cdp(site, "restore", name, "--at", f"seq:{site.cp_seq}", "--output", str(single))
        assert identical(folder / f"{name}.{fmt}", fmt, single)
        assert identical(folder / f"{name}.{fmt}", fmt, site.at_cp[name])
        assert info(folder / f"{name}.{fmt}")["format"] == fmt

    # again into the same folder: refused, files untouched; with --force: replaced
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    res = cdp(site, "restore", "--group", "vm1", "--at", "latest", "--output", str(folder),
              "--format", fmt, check=1)  # fmt: skip
    assert "already exists; refusing to overwrite it" in res.err and "--force" in res.err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    res = cdp(site, "restore", "--group", "vm1", "--at", "latest", "--output", str(folder),
              "--format", fmt, "--force")  # fmt: skip
    seqs = {int(s) for s in re.findall(r" at seq (\d+) ", res.out)}
    assert len(seqs) == 1 and seqs.pop() > site.cp_seq  # latest: one seq for the group
    for name in VOLUMES:
        assert identical(folder / f"{name}.{fmt}", fmt, site.folder / f"{name}.raw")
    assert hidden(folder) == []


def test_group_output_must_be_a_folder(site: Site, out: Path) -> None:
    plain = out / "file"
    plain.write_bytes(b"keep")
    res = cdp(site, "restore", "--group", "vm1", "--at", "latest", "--output", str(plain),
              check=1)  # fmt: skip
    assert "is not a folder" in res.err
    assert plain.read_bytes() == b"keep"
    res = cdp(site, "restore", "--group", "nope", "--at", "latest", "--output", str(out / "x"),
              check=2)  # fmt: skip
    assert "no group 'nope'" in res.err and "groups: vm1" in res.err
    # not retained: exit 1 and the folder is not created
    res = cdp(site, "restore", "--group", "vm1", "--at", "seq:999999",
              "--output", str(out / "g"), check=1)  # fmt: skip
    assert "no retained point for seq:999999 of disk0" in res.err
    assert sorted(p.name for p in out.iterdir()) == ["file"]


def test_refusals(site: Site, out: Path) -> None:
    precious = out / "precious.qcow2"
    precious.write_bytes(b"keep me")
    res = cdp(site, "restore", "disk0", "--at", "latest", "--output", str(precious),
              "--format", "qcow2", check=1)  # fmt: skip
    assert "already exists; refusing to overwrite it" in res.err and "--force" in res.err
    assert precious.read_bytes() == b"keep me"
    link = out / "link.vmdk"
    link.symlink_to(out / "target.vmdk")
    res = cdp(site, "restore", "disk0", "--at", "latest", "--output", str(link),
              "--format", "vmdk", check=1)  # fmt: skip
    assert "is a symlink; refusing to follow it" in res.err
    # --force replaces it, through the symlink (the link stays, its target is the image)
    cdp(site, "restore", "disk0", "--at", "latest", "--output", str(precious),
        "--format", "qcow2", "--force")  # fmt: skip
    assert info(precious)["format"] == "qcow2"
    assert identical(precious, "qcow2", site.folder / "disk0.raw")
    cdp(site, "restore", "disk0", "--at", "latest", "--output", str(link),
        "--format", "vmdk", "--force")  # fmt: skip
    assert link.is_symlink() and info(out / "target.vmdk")["format"] == "vmdk"

    # usage errors: exit 2, nothing written
    x = str(out / "x.qcow2")
    res = cdp(site, "restore", "disk0", "--group", "vm1", "--at", "latest", "--output", x,
              check=2)  # fmt: skip
    assert "not allowed with" in res.err
    res = cdp(site, "restore", "--at", "latest", "--output", x, check=2)
    assert "one of the arguments VOLUME --group is required" in res.err
    res = cdp(site, "restore", "disk0", "--at", "latest", "--output", x, "--format", "vdi",
              check=2)  # fmt: skip
    assert "invalid choice: 'vdi'" in res.err
    assert sorted(p.name for p in out.iterdir()) == ["link.vmdk", "precious.qcow2", "target.vmdk"]


def test_missing_qemu_img_is_a_clear_error_and_writes_nothing(site: Site, out: Path) -> None:
    empty = out / "empty-bin"
    empty.mkdir()
    res = cdp(site, "restore", "disk0", "--at", "latest", "--output", str(out / "d.qcow2"),
              "--format", "qcow2", env={"PATH": str(empty)}, check=1)  # fmt: skip
    first, hint = res.err.splitlines()
    assert (
        first == "Error: --format qcow2 needs qemu-img, which is not installed (not found on PATH)"
    )
    assert hint.startswith("Try: run scripts/bootstrap")
    assert sorted(p.name for p in out.iterdir()) == ["empty-bin"]
    # raw needs no qemu-img
    cdp(site, "restore", "disk0", "--at", "latest", "--output", str(out / "d.raw"),
        env={"PATH": str(empty)})  # fmt: skip


FAKE_QEMU_IMG = """#!/bin/sh
# A stand-in qemu-img: records its arguments and the output folder, then fails or hangs.
dst="$7"
printf '%s\\n' "$@" > "$FAKE_DIR/args"
ls -A "$(dirname "$dst")" > "$FAKE_DIR/ls"
case "$FAKE_MODE" in
fail) echo "qemu-img: $dst: error while converting qcow2: simulated disk failure" >&2; exit 1 ;;
hang) touch "$FAKE_DIR/started"; exec sleep 30 ;;
esac
"""


@pytest.fixture
def fake_bin(out: Path) -> Iterator[Path]:
    """A folder whose only qemu-img is :data:`FAKE_QEMU_IMG`."""
    fake = out.parent / f"{out.name}-bin"
    fake.mkdir()
    (fake / "qemu-img").write_text(FAKE_QEMU_IMG)
    (fake / "qemu-img").chmod(0o755)
    yield fake
    shutil.rmtree(fake, ignore_errors=True)


def test_failed_conversion_shows_qemu_img_message_and_leaves_nothing(
    site: Site, out: Path, fake_bin: Path
) -> None:
    target = out / "d.qcow2"
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_DIR": str(fake_bin), "FAKE_MODE": "fail"}
    res = cdp(site, "restore", "disk0", "--at", "latest", "--output", str(target),
              "--format", "qcow2", env=env, check=1)  # fmt: skip
    assert res.err.startswith("Error: qemu-img could not convert the image to qcow2: qemu-img: ")
    assert "simulated disk failure" in res.err and "Traceback" not in res.err
    assert res.out == ""
    # qemu-img was given a hidden raw file next to the output, and a hidden target there
    args = (fake_bin / "args").read_text().splitlines()
    assert args[:5] == ["convert", "-f", "raw", "-O", "qcow2"]
    src, dst = Path(args[5]), Path(args[6])
    assert src.parent == out and dst.parent == out
    assert src.name.startswith(".d.qcow2.") and src.name.endswith(".raw")
    assert dst.name.startswith(".d.qcow2.") and dst.name.endswith(".qcow2")
    during = sorted((fake_bin / "ls").read_text().split())
    assert during == sorted(["d.qcow2", src.name, dst.name])  # d.qcow2: the reserved name
    assert list(out.iterdir()) == []  # afterwards: nothing at all

    # the same in a group restore: the folders it created are removed again
    folder = out / "grp" / "cp"
    res = cdp(site, "restore", "--group", "vm1", "--at", "latest", "--output", str(folder),
              "--format", "qcow2", env=env, check=1)  # fmt: skip
    assert "simulated disk failure" in res.err
    assert list(out.iterdir()) == []


def _signal_state(sig: int, pid: int | str = "self") -> str:
    """``ignored``, ``blocked``, or ``default`` (or handled) for ``sig`` in process ``pid``."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    bit = 1 << (sig - 1)
    if int(fields["SigIgn"], 16) & bit:
        return "ignored"
    if int(fields["SigBlk"], 16) & bit:
        return "blocked"
    return "default"


def _default_signal(sig: int) -> None:
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_conversion_leaves_nothing(
    site: Site, out: Path, fake_bin: Path, sig: int, code: int
) -> None:
    target = out / "d.vhdx"
    env = {**os.environ, "CDP_CONFIG": "", "PATH": f"{fake_bin}:/usr/bin:/bin",
           "FAKE_DIR": str(fake_bin), "FAKE_MODE": "hang"}  # fmt: skip
    # A child inherits an ignored or blocked signal, and this test runs after many others
    # in one pytest process: say so if that is why the signal did nothing (it once exited 0
    # after the fake's 30 s sleep), and start the CLI as a terminal would, with both default.
    inherited = _signal_state(sig)
    proc = subprocess.Popen(
        [*CLI, "restore", "disk0", "--at", "latest", "--output", str(target), "--format", "vhdx",
         "--config", str(site.config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: _default_signal(sig),
    )  # fmt: skip
    try:
        wait_for(lambda: (fake_bin / "started").exists(), "the conversion to start")
        assert _signal_state(sig, proc.pid) == "default", f"the CLI's {sig!r} is not default"
        assert len(list(out.iterdir())) == 3  # reserved name, hidden raw, hidden target
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, f"{err} (pytest's own {sig!r}: {inherited})"
    assert "Traceback" not in err
    assert err.startswith("Error: interrupted" if sig == signal.SIGINT else "Error: terminated")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_unwritable_folder_fails_cleanly(site: Site, out: Path) -> None:
    out.chmod(0o500)
    try:
        res = cdp(site, "restore", "disk0", "--at", "latest", "--output", str(out / "d.qcow2"),
                  "--format", "qcow2", check=1)  # fmt: skip
        assert "Permission denied" in res.err and "Traceback" not in res.err
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_progress_on_a_terminal_only(site: Site, out: Path) -> None:
    """stderr a tty: a \\r progress line with rate and ETA, erased at the end; stdout as ever."""
    master, slave = pty.openpty()
    target = out / "d.qcow2"
    try:
        proc = subprocess.Popen(
            [*CLI, "restore", "disk0", "--at", "latest", "--output", str(target),
             "--format", "qcow2", "--config", str(site.config)],
            stdout=subprocess.PIPE, stderr=slave, text=True,
            env={**os.environ, "CDP_CONFIG": "", "COLUMNS": "200"},
        )  # fmt: skip
        os.close(slave)
        slave = -1
        tty = b""
        while True:  # read the terminal as it goes, so the child never blocks on it
            ready, _, _ = select.select([master], [], [], DEADLINE_S)
            assert ready, "no output from the restore"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            tty += chunk
        stdout = proc.stdout.read() if proc.stdout else ""
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = tty.decode()
    assert "\r" in text and "ETA " in text and "/s " in text
    assert re.search(r"disk0 \[#{20}\] 8\.0 MiB / 8\.0 MiB 100% ", text), text
    assert "disk0 to qcow2 [" in text  # the conversion's own progress
    assert text.endswith("\r\x1b[K")  # erased: the summary starts on a clean line
    assert re.fullmatch(summary("disk0", int(re.findall(r"seq (\d+)", stdout)[0]), target,
                                "qcow2") + "\n", stdout)  # fmt: skip
