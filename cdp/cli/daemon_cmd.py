"""``cdp daemon``: the primary-site service (systemd: cdp.service).

Loads and validates the whole config before starting anything, so a bad config exits 2 with
nothing started, then sets up logging as the config says and runs until SIGTERM or SIGINT:
exit 0 once the journals are synced and closed.

Before starting, it takes an exclusive lock on ``<state_dir>/daemon.lock`` (held until the
process exits, released by the kernel even after kill -9): two daemons writing one journal
would corrupt it, and the second would also take over the first one's API socket.

A failure to start (the state folder cannot be written or is locked, the API path exists and
is not a socket, a journal cannot be opened) or a fatal error while running exits 1 with one
``Error:`` line saying what failed, not a traceback (``--debug`` adds it). Errors outside
that set are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cdp.cli.common import Subparsers, add_verb, load
from cdp.config import Config
from cdp.errors import OperationFailed
from cdp.log import setup_logging


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "daemon",
        help="run the primary-site service in the foreground",
        description="Run the primary-site service in the foreground until SIGTERM or SIGINT.",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    # Imported on use: the service pulls in aiohttp, the journal and the capture code, which
    # the other verbs do not need.
    from cdp.daemon.service import run_daemon

    return run_service(
        config, config.daemon.state_dir, lambda: run_daemon(config), "the daemon",
        f"cdp daemon --config {config.path}",
    )  # fmt: skip


def run_service(
    config: Config, state_dir: Path, serve: Callable[[], int], what: str, restart: str
) -> int:
    """Lock the state folder, log as configured, run; expected failures become one line.

    Shared by ``cdp daemon`` and ``cdp replica serve``: OS and journal errors (the folder,
    a socket path, a journal that cannot open) exit 1 with ``Error:`` and what failed;
    anything else is a bug and keeps its traceback.
    """
    lock_fd = claim_state_dir(state_dir)
    setup_logging(config.daemon.log_format, config.daemon.log_level, sys.stderr)
    from journal import JournalError

    try:
        return serve()
    except Exception as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, OSError | JournalError) for e in leaves):
            raise
        raise OperationFailed(
            f"{what} stopped: " + "; ".join(dict.fromkeys(_describe(e) for e in leaves)),
            hint=f"fix that and start it again ({restart})",
        ) from exc
    finally:
        os.close(lock_fd)


def claim_state_dir(state_dir: Path) -> int:
    """Create *state_dir* if needed and lock it for this process; returns the lock's fd.

    The fd is inherited by nothing (close-on-exec) and stays open until the process ends.

    Raises:
        OperationFailed: the folder cannot be created or written, or another daemon holds it.
    """
    lock_path = state_dir / "daemon.lock"
    try:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError as e:
        reason = e.strerror or str(e)
        if isinstance(e, FileExistsError | NotADirectoryError):
            reason = "it (or a folder above it) is not a folder"
        raise OperationFailed(
            f"cannot use state_dir {state_dir}: {reason}",
            hint="check [daemon] state_dir and the permissions of that folder",
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise OperationFailed(
            f"another cdp daemon (pid {holder}) is using state_dir {state_dir}",
            hint="stop it first, or give this one its own [daemon] state_dir",
        ) from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or *exc* itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _describe(exc: BaseException) -> str:
    """One line: ``PATH: reason`` for OS errors (not Python's ``[Errno 13] ...`` form)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else None
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc)
