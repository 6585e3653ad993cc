"""App-consistent checkpoints (issue 6): the hook runner and the freeze/checkpoint/thaw order.

Real subprocesses (``sh -c``, ``sleep``, ``true``, ``false``); hooks append lines to a file so
the order of freeze, checkpoint and thaw is checked from what actually ran. Timeouts in the
hooks' configs are short, but no assertion is about how long anything took.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cdp.cli.main import main
from cdp.config import HooksConfig, load_config
from cdp.daemon import hooks
from cdp.daemon.hooks import consistent, group_lock, hook_env, run_hook, scans_caught_up
from cdp.errors import ConfigError
from journal import CheckpointKind

HANG_GUARD_S = 30.0  # keeps a broken build from hanging; never asserted against


def sh(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


def appender(log: Path, word: str) -> tuple[str, ...]:
    """A hook that appends WORD and what the daemon told it to *log*."""
    line = f"{word} $CDP_HOOK $CDP_GROUP $CDP_VOLUMES $CDP_CHECKPOINT"
    return sh(f'echo "{line}" >> {shlex.quote(str(log))}')


def cfg(pre: tuple[str, ...], post: tuple[str, ...], timeout_s: float = 2.0) -> HooksConfig:
    return HooksConfig(pre_freeze=pre, post_thaw=post, timeout_ns=int(timeout_s * 1e9))


ENV = hook_env("vm1", ["vm1-disk0", "vm1-disk1"], "nightly")


class Journal:
    """Stands in for the journal checkpoint: records the kind, appends a marker line."""

    def __init__(self, log: Path, fail: bool = False) -> None:
        self.log, self.fail = log, fail
        self.kinds: list[CheckpointKind] = []

    async def checkpoint(self, kind: CheckpointKind) -> int:
        self.kinds.append(kind)
        await asyncio.to_thread(self._append, f"checkpoint {kind}\n")
        if self.fail:
            raise OSError("disk full")
        return 42

    def _append(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line)


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_gone(pids: list[int]) -> bool:
    end = time.monotonic() + HANG_GUARD_S
    while not all(gone(p) for p in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# ---------------------------------------------------------------------- the protocol


async def test_freeze_ok_gives_app_checkpoint_between_freeze_and_thaw(tmp_path: Path) -> None:
    log = tmp_path / "order"
    j = Journal(log)
    res = await consistent(j.checkpoint, cfg(appender(log, "freeze"), appender(log, "thaw")), ENV)
    assert res.value == 42
    assert res.kind is CheckpointKind.APP and res.consistent and res.reason is None
    assert j.kinds == [CheckpointKind.APP]
    assert lines(log) == [
        "freeze pre_freeze vm1 vm1-disk0,vm1-disk1 nightly",
        "checkpoint app",
        "thaw post_thaw vm1 vm1-disk0,vm1-disk1 nightly",
    ]
    assert res.freeze.ok and res.thaw.ok


async def test_freeze_fails_gives_crash_checkpoint_and_still_thaws(tmp_path: Path) -> None:
    log = tmp_path / "order"
    j = Journal(log)
    freeze = sh(f"echo freeze >> {log}; echo 'guest agent not connected' >&2; exit 3")
    res = await consistent(j.checkpoint, cfg(freeze, appender(log, "thaw")), ENV)
    assert res.kind is CheckpointKind.CRASH and not res.consistent
    assert res.reason == "pre_freeze exited 3: guest agent not connected"
    assert res.freeze.returncode == 3 and res.freeze.output == ("guest agent not connected",)
    assert lines(log)[:2] == ["freeze", "checkpoint crash"]
    assert lines(log)[2].startswith("thaw post_thaw ")


async def test_false_as_freeze(tmp_path: Path) -> None:
    log = tmp_path / "order"
    res = await consistent(Journal(log).checkpoint, cfg(("false",), appender(log, "thaw")), ENV)
    assert res.kind is CheckpointKind.CRASH
    assert res.reason == "pre_freeze exited 1"
    assert [ln.split()[0] for ln in lines(log)] == ["checkpoint", "thaw"]


async def test_hanging_freeze_is_killed_with_its_process_group(tmp_path: Path) -> None:
    log, pids = tmp_path / "order", tmp_path / "pids"
    # Two sleeps in the background and a shell waiting for them: all three must go.
    freeze = sh(f"sleep 100 & echo $! >> {pids}; sleep 100 & echo $! >> {pids}; "
                f"echo $$ >> {pids}; wait")  # fmt: skip
    res = await consistent(
        Journal(log).checkpoint, cfg(freeze, appender(log, "thaw"), timeout_s=1), ENV
    )
    assert res.kind is CheckpointKind.CRASH
    assert res.freeze.timed_out
    assert res.reason == "pre_freeze timed out after 1s (its process group was killed)"
    assert [ln.split()[0] for ln in lines(log)] == ["checkpoint", "thaw"]
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3
    assert wait_gone(started), [p for p in started if not gone(p)]


async def test_freeze_ignoring_sigterm_gets_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "_KILL_GRACE_S", 0.2)
    pids = tmp_path / "pids"
    # An ignored signal stays ignored across exec, so the sleep ignores SIGTERM too.
    res = await run_hook(
        sh(f"trap '' TERM; sleep 100 & echo $! >> {pids}; echo $$ >> {pids}; wait"),
        0.5,
        ENV,
        name="pre_freeze",
    )
    assert res.timed_out and not res.ok
    started = [int(p) for p in pids.read_text().split()]
    assert wait_gone(started)


async def test_missing_executable_has_a_clear_reason(tmp_path: Path) -> None:
    log = tmp_path / "order"
    missing = str(tmp_path / "no-such-freeze")
    res = await consistent(Journal(log).checkpoint, cfg((missing,), appender(log, "thaw")), ENV)
    assert res.kind is CheckpointKind.CRASH
    assert res.reason == f"pre_freeze: cannot run {missing!r}: No such file or directory"
    assert [ln.split()[0] for ln in lines(log)] == ["checkpoint", "thaw"]


async def test_not_executable_has_a_clear_reason(tmp_path: Path) -> None:
    script = tmp_path / "freeze.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    res = await run_hook((str(script),), 2, ENV, name="pre_freeze")
    assert res.reason == f"pre_freeze: cannot run {str(script)!r}: Permission denied"


async def test_thaw_fails_is_reported_and_the_checkpoint_stands(tmp_path: Path) -> None:
    log = tmp_path / "order"
    j = Journal(log)
    res = await consistent(
        j.checkpoint, cfg(appender(log, "freeze"), sh("echo 'thaw: no such domain'; exit 1")), ENV
    )
    assert res.value == 42 and res.kind is CheckpointKind.APP  # taken while frozen
    assert not res.thaw.ok
    assert res.thaw.reason == "post_thaw exited 1: thaw: no such domain"
    assert j.kinds == [CheckpointKind.APP]


async def test_thaw_hangs_is_killed_and_reported(tmp_path: Path) -> None:
    log, pids = tmp_path / "order", tmp_path / "pids"
    thaw = sh(f"sleep 100 & echo $! >> {pids}; echo $$ >> {pids}; wait")
    res = await consistent(
        Journal(log).checkpoint, cfg(appender(log, "freeze"), thaw, timeout_s=1), ENV
    )
    assert res.kind is CheckpointKind.APP and res.value == 42
    assert res.thaw.timed_out
    assert res.thaw.reason == "post_thaw timed out after 1s (its process group was killed)"
    assert wait_gone([int(p) for p in pids.read_text().split()])


async def test_thaw_runs_when_the_checkpoint_fails(tmp_path: Path) -> None:
    log = tmp_path / "order"
    j = Journal(log, fail=True)
    with pytest.raises(OSError, match="disk full"):
        await consistent(j.checkpoint, cfg(appender(log, "freeze"), appender(log, "thaw")), ENV)
    assert [ln.split()[0] for ln in lines(log)] == ["freeze", "checkpoint", "thaw"]


async def test_thaw_runs_when_cancelled_during_the_freeze(tmp_path: Path) -> None:
    log, pids = tmp_path / "order", tmp_path / "pids"
    freeze = sh(f"echo $$ >> {pids}; echo freeze >> {log}; exec sleep 100")
    task = asyncio.create_task(
        consistent(Journal(log).checkpoint, cfg(freeze, appender(log, "thaw"), 60), ENV)
    )
    end = time.monotonic() + HANG_GUARD_S
    while True:  # until the freeze runs
        if "freeze" in lines(log) or time.monotonic() > end:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [ln.split()[0] for ln in lines(log)] == ["freeze", "thaw"]  # no checkpoint
    assert wait_gone([int(p) for p in pids.read_text().split()])


async def test_capture_lag_downgrades_to_crash(tmp_path: Path) -> None:
    log = tmp_path / "order"
    seen: list[float] = []

    async def lagging(timeout_s: float) -> str | None:
        seen.append(timeout_s)
        return "no whole scan pass of disk0"

    res = await consistent(
        Journal(log).checkpoint,
        cfg(appender(log, "freeze"), appender(log, "thaw")),
        ENV,
        catch_up=lagging,
    )
    assert seen == [2.0]
    assert res.kind is CheckpointKind.CRASH
    assert res.reason == "frozen, but the capture did not catch up: no whole scan pass of disk0"
    assert [ln.split()[0] for ln in lines(log)] == ["freeze", "checkpoint", "thaw"]


async def test_catch_up_is_skipped_when_the_freeze_failed(tmp_path: Path) -> None:
    called: list[float] = []

    async def catch_up(timeout_s: float) -> str | None:
        called.append(timeout_s)
        return None

    res = await consistent(
        Journal(tmp_path / "o").checkpoint, cfg(("false",), ("true",)), ENV, catch_up=catch_up
    )
    assert res.kind is CheckpointKind.CRASH and called == []


# ---------------------------------------------------------------------- run_hook details


async def test_output_tail_is_bounded(tmp_path: Path) -> None:
    res = await run_hook(sh("for i in $(seq 1 500); do echo line $i; done; exit 2"), 5, ENV)
    assert res.output == tuple(f"line {i}" for i in range(491, 501))
    assert res.reason == "hook exited 2: line 500"


async def test_hook_gets_daemon_env_and_no_stdin(tmp_path: Path) -> None:
    out = tmp_path / "env"
    env = hook_env("g", ["a"], "cp", base={"PATH": os.environ["PATH"], "KEEP": "1"})
    res = await run_hook(sh(f'echo "$KEEP $CDP_GROUP" > {out}; cat; echo done >> {out}'), 5, env)
    assert res.ok
    assert out.read_text() == "1 g\ndone\n"


async def test_background_child_left_behind_is_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    res = await run_hook(sh(f"sleep 100 & echo $! > {pids}"), 30, ENV, name="pre_freeze")
    assert res.ok and not res.timed_out
    assert wait_gone([int(pids.read_text())])


async def test_hook_killed_by_a_signal(tmp_path: Path) -> None:
    res = await run_hook(sh("kill -9 $$"), 5, ENV, name="post_thaw")
    assert res.returncode == -9
    assert res.reason == "post_thaw was killed by SIGKILL"


async def test_group_lock_is_per_group() -> None:
    assert group_lock("a") is group_lock("a")
    assert group_lock("a") is not group_lock("b")


# ---------------------------------------------------------------------- scan catch-up


@dataclass
class Progress:
    passes: int = 0


@dataclass
class Scanner:
    progress: Progress = field(default_factory=Progress)


@dataclass
class Source:
    kind: str


@dataclass
class VolConfig:
    source: Source


@dataclass
class Volume:
    scanner: Scanner | None
    capture_state: str
    config: VolConfig = field(default_factory=lambda: VolConfig(Source("scan")))


async def test_scan_idle_needs_the_next_pass() -> None:
    v = Volume(Scanner(Progress(passes=5)), "idle")
    task = asyncio.create_task(scans_caught_up({"disk0": v}, HANG_GUARD_S))
    await asyncio.sleep(0.1)
    assert not task.done()
    assert v.scanner is not None
    v.scanner.progress.passes = 6
    assert await task is None


async def test_scan_under_way_needs_the_pass_after_it() -> None:
    v = Volume(Scanner(Progress(passes=5)), "scanning")
    task = asyncio.create_task(scans_caught_up({"disk0": v}, HANG_GUARD_S))
    await asyncio.sleep(0)  # it notes where the scan is
    assert v.scanner is not None
    v.scanner.progress.passes = 6  # the pass that was under way: may predate the freeze
    await asyncio.sleep(0.1)
    assert not task.done()
    v.scanner.progress.passes = 7
    assert await task is None


async def test_scan_that_never_passes_reports_the_volume() -> None:
    v = Volume(Scanner(), "error")
    reason = await scans_caught_up({"legacy": v}, 0.2)
    assert reason is not None and reason.startswith("no whole scan pass of legacy within 0.2s")


async def test_scan_not_running_and_nbd_volumes() -> None:
    assert await scans_caught_up({"d": Volume(None, "starting")}, 1) == (
        "volume d: its scan is not running"
    )
    nbd = Volume(None, "serving", VolConfig(Source("nbd")))
    assert await scans_caught_up({"n": nbd}, 1) is None


# ---------------------------------------------------------------------- config and CLI


def test_hooks_config_forms(tmp_path: Path) -> None:
    path = tmp_path / "cdp.toml"
    path.write_text(
        "[hooks]\npre_freeze = \"./freeze.sh --mode 'all disks'\"\n"
        'post_thaw = ["virsh", "domfsthaw", "vm 1"]\n'
    )
    h = load_config(path).hooks
    assert h == HooksConfig(
        pre_freeze=(str(tmp_path / "freeze.sh"), "--mode", "all disks"),
        post_thaw=("virsh", "domfsthaw", "vm 1"),
        timeout_ns=30 * 10**9,
    )
    path.write_text('[hooks]\npre_freeze = "fsfreeze -f /mnt"\npost_thaw = "true"\ntimeout = "2s"')
    h = load_config(path).hooks
    assert h is not None and h.pre_freeze == ("fsfreeze", "-f", "/mnt")
    assert h.timeout_ns == 2 * 10**9
    path.write_text("")
    assert load_config(path).hooks is None


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('pre_freeze = "true"', "hooks.post_thaw"),
        ('pre_freeze = ""\npost_thaw = "true"', "hooks.pre_freeze"),
        ('pre_freeze = ["a", 1]\npost_thaw = "true"', "hooks.pre_freeze"),
        ('pre_freeze = "true"\npost_thaw = "true"\ntimeout = "0s"', "hooks.timeout"),
        ('pre_freeze = "true"\npost_thaw = "true"\npre_thaw = "x"', "hooks.pre_thaw"),
    ],
)
def test_hooks_config_errors(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "cdp.toml"
    path.write_text(f"[hooks]\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key


def test_consistent_without_hooks_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cdp.toml"
    path.write_text(
        f'[daemon]\napi = "unix:{tmp_path}/nothing-listens.sock"\n'
        '[[volume]]\nname = "v"\nsize = "4MiB"\nsource = "scan"\npath = "v.raw"\n'
    )
    code = main(["checkpoint", "v", "--consistent", "--config", str(path)], environ={})
    _, err = capsys.readouterr()
    assert code == 2
    assert "--consistent needs a [hooks] table" in err
