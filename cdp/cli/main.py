"""``cdp``: argument parsing, dispatch to the verb modules, and THE error-to-exit-code table.

Exit codes (design brief): 0 success, 1 operation failed, 2 usage or config error, 130
interrupted (Ctrl-C). Errors print as ``Error: <one line>`` and, when there is one,
``Try: <hint>`` on stderr. Tracebacks are printed only with ``--debug``, or for exceptions
outside the cdp error tree, which are bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from importlib import metadata
from types import MappingProxyType
from typing import Final

from cdp.cli import (
    checkpoint_cmd,
    configcheck_cmd,
    daemon_cmd,
    export_cmd,
    journal_cmd,
    replica_cmd,
    restore_cmd,
    rollback_cmd,
    snapshot_cmd,
    status_cmd,
    timeline_cmd,
    verify_cmd,
)
from cdp.cli.common import ArgumentParser, add_common_options, resolve_config_path
from cdp.errors import (
    CdpError,
    ConfigError,
    DaemonUnavailable,
    OperationFailed,
    PointNotRetained,
    UsageError,
)

__all__ = ["EXIT_CODES", "build_parser", "exit_code_for", "main"]

# The one table. Looked up along the exception's MRO, so the most specific listed class wins.
# Errors from other packages (journal, replicator) that are not listed use their own
# ``exit_code`` ClassVar; anything else is 1.
EXIT_CODES: Final[Mapping[type[BaseException], int]] = MappingProxyType(
    {
        UsageError: 2,
        ConfigError: 2,
        DaemonUnavailable: 1,
        PointNotRetained: 1,
        OperationFailed: 1,
        CdpError: 1,
        OSError: 1,
        KeyboardInterrupt: 130,
    }
)

# Verbs in the order `cdp --help` lists them.
_VERBS: Final = (
    daemon_cmd,
    replica_cmd,
    status_cmd,
    checkpoint_cmd,
    snapshot_cmd,
    timeline_cmd,
    rollback_cmd,
    restore_cmd,
    export_cmd,
    verify_cmd,
    journal_cmd,
    configcheck_cmd,
)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for *exc*: the table, else its ``exit_code`` attribute, else 1."""
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(cls)
        if code is not None:
            return code
    code = getattr(type(exc), "exit_code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else 1


def _is_expected(exc: BaseException) -> bool:
    """Errors that describe a situation, not a bug: reported without a traceback."""
    if isinstance(exc, CdpError | OSError | KeyboardInterrupt):
        return True
    return isinstance(getattr(type(exc), "exit_code", None), int)


def build_parser() -> argparse.ArgumentParser:
    """The full ``cdp`` parser; every verb gets ``--config`` and ``--debug``."""
    parser = ArgumentParser(
        prog="cdp",
        description="Continuous data protection for VM block volumes.",
        epilog="WHEN: 2026-11-22T03:15:00Z, -15m, checkpoint:NAME, snapshot:ID, seq:N, latest. "
        "Exit codes: 0 ok, 1 operation failed, 2 usage or config error.",
    )
    add_common_options(parser)
    parser.add_argument("--version", action="version", version=f"cdp {_version()}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in _VERBS:
        verb.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the ``cdp`` command line and return its exit code (the console script exits with it).

    *argv* and *environ* default to the process's own; tests pass their own.
    """
    env = os.environ if environ is None else environ
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        args.config = resolve_config_path(getattr(args, "config", None), env)
        code: int = args.run(args)
        return code
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (Exception, KeyboardInterrupt) as exc:
        _report(exc, debug=debug)
        return exit_code_for(exc)


def _report(exc: BaseException, *, debug: bool) -> None:
    err = sys.stderr
    expected = _is_expected(exc)
    if debug or not expected:
        traceback.print_exception(exc, file=err)
    if isinstance(exc, KeyboardInterrupt):
        print("Error: interrupted", file=err)
        return
    if expected:
        print(f"Error: {exc}", file=err)
    else:
        print(f"Error: internal error: {type(exc).__name__}: {exc} (this is a bug)", file=err)
    hint = getattr(exc, "hint", None)
    if isinstance(hint, str) and hint:
        print(f"Try: {hint}", file=err)


def _version() -> str:
    try:
        return metadata.version("cdp")
    except metadata.PackageNotFoundError:
        return "unknown"
