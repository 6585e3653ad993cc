"""``cdp checkpoint --consistent`` against the real daemon with a ``[hooks]`` config (issue 6).

The volume is hash-scanned (``source = "scan"``); the hooks are ``sh -c`` one-liners that
append to a log file in the test's folder, so the test sees what ran, in which order, with
which environment. No assertion is about how long anything took.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Daemon, cdp, short_tmp, write_config

pytestmark = pytest.mark.integration

MiB = 1 << 20
FLUSHED = b"written by the guest as it froze"


@pytest.fixture
def site() -> Iterator[Path]:
    """A short folder holding a 16 MiB raw image with 1 MiB of 0xab at its start."""
    with short_tmp() as folder:
        with open(folder / "disk.raw", "wb") as f:
            f.write(b"\xab" * MiB)
            f.truncate(16 * MiB)
        yield folder


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def toml_argv(*argv: str) -> str:
    return json.dumps(list(argv))  # a JSON array of strings is a TOML array


def hooks_table(pre_freeze: str, post_thaw: str, timeout: str = "10s") -> str:
    return f"\n[hooks]\npre_freeze = {pre_freeze}\npost_thaw = {post_thaw}\ntimeout = {timeout!r}\n"


def log_line(log: Path, word: str) -> str:
    line = f"{word} $CDP_HOOK $CDP_GROUP $CDP_VOLUMES $CDP_CHECKPOINT"
    return f'echo "{line}" >> {shlex.quote(str(log))}'


def last_checkpoint(cfg: Path) -> dict[str, object]:
    doc = json.loads(cdp(cfg, "status", "--json").out)
    cp: dict[str, object] = doc["groups"][0]["last_checkpoint"]
    return cp


def test_consistent_checkpoint_is_app_and_holds_what_the_freeze_flushed(
    site: Path, daemons: list[Daemon]
) -> None:
    image, log = site / "disk.raw", site / "hooks.log"
    # The freeze hook writes to the disk like a guest flushing its caches as it freezes: the
    # app checkpoint must hold those bytes, so the scan has to catch up before it is taken.
    flush = f"printf '{FLUSHED.decode()}' | dd of={image} bs=4096 seek=2 conv=notrunc status=none"
    cfg = write_config(
        site,
        image=image,
        extra=hooks_table(
            toml_argv("sh", "-c", f"{flush}; {log_line(log, 'freeze')}"),
            toml_argv("sh", "-c", log_line(log, "thaw")),
        ),
    )
    d = Daemon(cfg, site / "daemon.log")
    daemons.append(d)
    d.start().wait_onboarded()

    res = cdp(cfg, "checkpoint", "disk0", "--name", "n", "--consistent")
    assert res.err == ""
    assert res.out.startswith("checkpoint n: seq ")
    assert res.out.endswith("(group disk0, app-consistent)\n")
    cp = last_checkpoint(cfg)
    assert (cp["name"], cp["kind"]) == ("n", "app")
    assert log.read_text().splitlines() == [
        "freeze pre_freeze disk0 disk0 n",
        "thaw post_thaw disk0 disk0 n",
    ]

    restored = site / "at-n.raw"
    cdp(cfg, "restore", "disk0", "--at", "checkpoint:n", "--output", str(restored))
    data = restored.read_bytes()
    assert data[2 * 4096 : 2 * 4096 + len(FLUSHED)] == FLUSHED
    assert data[:4096] == b"\xab" * 4096

    # a plain checkpoint is still crash-consistent and runs no hook
    cdp(cfg, "checkpoint", "disk0", "--name", "plain")
    assert last_checkpoint(cfg)["kind"] == "crash"
    assert len(log.read_text().splitlines()) == 2
    assert d.stop() == 0


def test_hanging_freeze_gives_crash_checkpoint_warning_and_thaw(
    site: Path, daemons: list[Daemon]
) -> None:
    image, marker = site / "disk.raw", site / "thawed"
    cfg = write_config(
        site,
        image=image,
        extra=hooks_table(
            toml_argv("sleep", "100"),
            toml_argv("sh", "-c", f"echo $CDP_CHECKPOINT > {marker}"),
            timeout="1s",
        ),
    )
    d = Daemon(cfg, site / "daemon.log")
    daemons.append(d)
    d.start().wait_onboarded()

    res = cdp(cfg, "checkpoint", "--group", "disk0", "--name", "stuck", "--consistent")
    assert res.out.endswith("(group disk0, crash-consistent)\n")
    assert res.err == (
        "Warning: not app-consistent (pre_freeze timed out after 1s (its process group was "
        "killed)); a crash-consistent checkpoint was taken\n"
    )
    cp = last_checkpoint(cfg)
    assert (cp["name"], cp["kind"]) == ("stuck", "crash")
    assert marker.read_text() == "stuck\n"
    assert "hook failed" in d.log()
    assert d.stop() == 0


def test_consistent_without_hooks_is_refused_before_the_daemon(
    site: Path, daemons: list[Daemon]
) -> None:
    cfg = write_config(site, image=site / "disk.raw")  # no [hooks], no daemon running
    res = cdp(cfg, "checkpoint", "disk0", "--consistent", check=2)
    assert "--consistent needs a [hooks] table" in res.err
