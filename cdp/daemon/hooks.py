"""App-consistent checkpoints: run ``[hooks]`` ``pre_freeze``, checkpoint, ``post_thaw``.

``consistent()`` is the whole protocol (issue 6):

1. ``pre_freeze`` runs (e.g. ``virsh domfsfreeze``, ``fsfreeze -f``, a qemu-guest-agent
   freeze). If it exits 0 within the timeout, the guest is quiesced;
2. the capture catches up where it lags (a hash-scanned volume needs a whole pass that
   started after the freeze, or the journal would not hold the frozen state);
3. the journal checkpoint is taken: kind ``app`` when 1 and 2 succeeded, else ``crash``
   (a crash-consistent point is still worth having, and the answer says why it is not more);
4. ``post_thaw`` runs **always**: after a failed or timed-out freeze (which may have frozen
   part of the guest), and when the checkpoint itself failed.

Hooks are argv lists run without a shell, as asyncio subprocesses (the event loop keeps
serving), each in a new session so a timeout kills its whole process group (``sh -c 'a &
b'`` leaves nothing behind). stdin is /dev/null; stdout and stderr are captured together and
their last lines logged. The environment is the daemon's plus ``CDP_HOOK``, ``CDP_GROUP``,
``CDP_VOLUMES`` (comma-separated) and ``CDP_CHECKPOINT``; neither the environment nor the
arguments (which may hold credentials) are logged, only the program name.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from cdp.config import HooksConfig
from journal import CheckpointKind

__all__ = [
    "Consistent",
    "HookResult",
    "consistent",
    "group_lock",
    "hook_env",
    "run_hook",
    "scans_caught_up",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

TAIL_LINES: Final = 10
"""How many of a hook's last output lines are kept (and logged)."""
_LINE_MAX: Final = 300  # characters kept of one output line
_KILL_GRACE_S: Final = 2.0  # SIGTERM to SIGKILL, after a timeout
_DRAIN_S: Final = 1.0  # reading output after the hook exited, if something still holds it
_POLL_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class HookResult:
    """How one hook run ended. ``reason`` is one line for people; None when it succeeded."""

    name: str
    ok: bool
    reason: str | None = None
    returncode: int | None = None
    timed_out: bool = False
    output: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"ok": self.ok, "returncode": self.returncode}
        if self.reason is not None:
            doc["reason"] = self.reason
        if self.timed_out:
            doc["timed_out"] = True
        return doc


@dataclass(frozen=True, slots=True)
class Consistent(Generic[T]):
    """What :func:`consistent` did: the checkpoint's result and how consistent it is."""

    value: T
    kind: CheckpointKind
    reason: str | None  # why the checkpoint is not app-consistent (None: it is)
    freeze: HookResult
    thaw: HookResult

    @property
    def consistent(self) -> bool:
        return self.kind is CheckpointKind.APP


class _Tail:
    """The last few lines of a byte stream, each cut to a bounded length."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *done, self._partial = (self._partial + data).split(b"\n")
        for line in done:
            self._add(line)
        if len(self._partial) > 4 * _LINE_MAX:  # a huge line without a newline
            self._partial = self._partial[: 4 * _LINE_MAX]

    def finish(self) -> tuple[str, ...]:
        if self._partial:
            self._add(self._partial)
            self._partial = b""
        return tuple(self.lines)

    def _add(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip()
        if text:
            self.lines.append(text if len(text) <= _LINE_MAX else text[:_LINE_MAX] + "...")


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}s"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def run_hook(
    argv: Sequence[str], timeout_s: float, env: Mapping[str, str], *, name: str = "hook"
) -> HookResult:
    """Run *argv* (no shell) with *env*, for at most *timeout_s*; never raises for its failure.

    On a timeout (or when the caller is cancelled) the hook's process group gets SIGTERM,
    then SIGKILL after a grace period. Whatever the hook left running in its group when it
    exited is killed too, so no stray holds the output pipe or outlives the hook.
    """
    if not argv:
        return HookResult(name, ok=False, reason=f"{name}: no command")
    program = os.path.basename(argv[0])
    # Our own pipe, not PIPE: asyncio's wait() also waits for PIPEs to close, which a child
    # left in the background (holding stdout) would delay past the hook's exit.
    rfd, wfd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=wfd,
            stderr=wfd,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as e:
        os.close(rfd)
        why = f"{name}: cannot run {argv[0]!r}: {e.strerror or e}"
        log.error("hook could not start", extra={"hook": name, "program": program, "err": why})
        return HookResult(name, ok=False, reason=why)
    finally:
        os.close(wfd)
    pgid = proc.pid  # start_new_session: the hook leads its own process group
    tail = _Tail()
    stream = asyncio.StreamReader()
    pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(rfd, "rb", buffering=0)
    )

    async def read() -> None:
        while chunk := await stream.read(65536):
            tail.feed(chunk)

    reader = asyncio.create_task(read(), name=f"hook-output:{name}")
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            timed_out = True
            _killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_KILL_GRACE_S):
                    await proc.wait()
            _killpg(pgid, signal.SIGKILL)
            await proc.wait()
        if _group_alive(pgid):  # children it left behind
            _killpg(pgid, signal.SIGKILL if timed_out else signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_S):  # what is still in the pipe
                await asyncio.shield(reader)
    finally:
        if proc.returncode is None:  # cancelled while it ran
            _killpg(pgid, signal.SIGKILL)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        pipe.close()
    output = tail.finish()
    rc = proc.returncode
    reason: str | None
    if timed_out:
        reason = f"{name} timed out after {_fmt_s(timeout_s)} (its process group was killed)"
    elif rc == 0:
        reason = None
    elif rc is not None and rc < 0:
        reason = f"{name} was killed by {_signal_name(-rc)}"
    else:
        reason = f"{name} exited {rc}"
    if reason is not None and output:
        reason += f": {output[-1]}"
    result = HookResult(name, ok=reason is None, reason=reason, returncode=rc,
                        timed_out=timed_out, output=output)  # fmt: skip
    level = logging.INFO if result.ok else logging.ERROR
    log.log(
        level,
        "hook finished" if result.ok else "hook failed",
        extra={"hook": name, "program": program, "returncode": rc, "timed_out": timed_out,
               "output": " | ".join(output)},
    )  # fmt: skip
    return result


def hook_env(
    group: str, volumes: Sequence[str], checkpoint: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The hooks' environment: *base* (default: the daemon's) plus the CDP_* variables."""
    env = dict(os.environ if base is None else base)
    env.update(CDP_GROUP=group, CDP_VOLUMES=",".join(volumes), CDP_CHECKPOINT=checkpoint)
    return env


async def consistent(
    journal_checkpoint: Callable[[CheckpointKind], Awaitable[T]],
    hooks: HooksConfig,
    env: Mapping[str, str],
    *,
    catch_up: Callable[[float], Awaitable[str | None]] | None = None,
) -> Consistent[T]:
    """Freeze, checkpoint, thaw (always). See the module docstring.

    *catch_up*, awaited after a successful freeze with the timeout in seconds, returns None
    once the journal holds everything written before the freeze, else why it does not.
    Exceptions from *journal_checkpoint* propagate, after the thaw ran.
    """
    timeout_s = hooks.timeout_ns / 1e9
    reason: str | None = None
    try:
        freeze = await run_hook(
            hooks.pre_freeze, timeout_s, {**env, "CDP_HOOK": "pre_freeze"}, name="pre_freeze"
        )
        if not freeze.ok:
            reason = freeze.reason
        elif catch_up is not None:
            lag = await catch_up(timeout_s)
            if lag is not None:
                reason = f"frozen, but the capture did not catch up: {lag}"
        kind = CheckpointKind.CRASH if reason is not None else CheckpointKind.APP
        value = await journal_checkpoint(kind)
    finally:
        thaw = await run_hook(
            hooks.post_thaw, timeout_s, {**env, "CDP_HOOK": "post_thaw"}, name="post_thaw"
        )
        if not thaw.ok:
            log.error(
                "post_thaw failed: the guest may still be frozen",
                extra={"group": env.get("CDP_GROUP"), "err": thaw.reason},
            )
    return Consistent(value=value, kind=kind, reason=reason, freeze=freeze, thaw=thaw)


async def scans_caught_up(volumes: Mapping[str, object], timeout_s: float) -> str | None:
    """Wait until each hash-scanned volume finished a whole scan pass started after this call.

    *volumes* maps names to the daemon's volume runtimes; those without a ``scanner`` (NBD
    volumes journal every write before acknowledging it) need no wait. A runtime's
    ``capture_state`` is set on the event loop around each pass, so "idle" or "error" means
    no pass is under way and the next one to complete starts later; otherwise the pass
    under way may have read blocks before the freeze, and the one after it is needed.
    Returns None when caught up, else why not (after *timeout_s*).
    """
    targets: dict[str, tuple[object, int]] = {}
    for name, v in volumes.items():
        scanner = getattr(v, "scanner", None)
        source = getattr(getattr(v, "config", None), "source", None)
        if scanner is None:
            if getattr(source, "kind", None) == "scan":
                return f"volume {name}: its scan is not running"
            continue
        progress = scanner.progress
        between = getattr(v, "capture_state", None) in ("idle", "error")
        targets[name] = (progress, int(progress.passes) + (1 if between else 2))
    if not targets:
        return None
    end = time.monotonic() + timeout_s
    while True:
        behind = [n for n, (p, want) in targets.items() if int(getattr(p, "passes", 0)) < want]
        if not behind:
            return None
        if time.monotonic() >= end:
            return (
                f"no whole scan pass of {', '.join(behind)} within {_fmt_s(timeout_s)} "
                "after the freeze (see poll_interval and scan_rate)"
            )
        await asyncio.sleep(_POLL_S)


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def group_lock(group: str) -> asyncio.Lock:
    """One lock per group (and event loop): consistent checkpoints of a group never overlap.

    Two overlapping runs would interleave freeze and thaw: the first thaw would unfreeze
    the guest while the second still marks its checkpoint ``app``.
    """
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(group, asyncio.Lock())
