"""Helpers every verb shares: the common options, loading the config, finding volumes."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias

from cdp.config import DEFAULT_CONFIG_PATH, Config, VolumeConfig, load_config
from cdp.errors import OperationFailed, PointNotRetained, UsageError
from cdp.when import AtCheckpoint, AtSeq, AtSnapshot, AtTime, Latest, When, format_time_ns

if TYPE_CHECKING:
    from cdp.cli.api_client import ApiClient

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers: TypeAlias = argparse._SubParsersAction

__all__ = [
    "CONFIG_ENV",
    "ArgumentParser",
    "Subparsers",
    "add_common_options",
    "add_verb",
    "api_client",
    "approx_size",
    "describe_window",
    "load",
    "not_implemented",
    "point_time",
    "resolve_config_path",
    "retained_window_error",
    "volumes_for",
    "when_to_api",
]

CONFIG_ENV: Final = "CDP_CONFIG"

_NEGATIVE_VALUE: Final = re.compile(r"^-\d+$|^-\d*\.\d+$|^-(?:\d+(?:ns|us|µs|ms|s|m|h|d|w))+$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError instead of exiting.

    So usage errors go through the one exit-code table and print as ``Error:`` / ``Try:``
    like every other error, and tests can call ``main()`` without catching SystemExit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes "-15m" for an option, so `--at -15m` would fail with "expected one
        # argument". Values that look like negative numbers are exempt; extend that to
        # negative durations (relative WHEN, --since). No cdp option starts with "-<digit>".
        self._negative_number_matcher = _NEGATIVE_VALUE

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"{self.prog} --help")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--debug``, accepted before or after the verb.

    Defaults are SUPPRESS so a subparser does not overwrite a value given before the verb
    (argparse copies subparser defaults over the parent's); ``main`` fills in the default.
    """
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print a traceback with errors",
    )


def add_verb(
    subparsers: Subparsers, name: str, *, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Register verb *name* with the common options; the caller adds its own arguments."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(parser)
    return parser


def resolve_config_path(given: str | None, environ: Mapping[str, str]) -> Path:
    """``--config``, else ``$CDP_CONFIG`` (when set and non-empty), else /etc/cdp/cdp.toml."""
    return Path(given or environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load(args: argparse.Namespace) -> Config:
    """Load the config that ``main`` resolved into ``args.config``."""
    path: Path = args.config
    return load_config(path)


def api_client(config: Config) -> ApiClient:
    """A client for the API *config* names (``[daemon] api``, or ``[receiver] api``).

    Imported on use: aiohttp is half of the CLI's start-up time, and usage errors, config
    errors and ``cdp daemon`` itself (until it starts) do not need it.
    """
    from cdp.cli.api_client import ApiClient

    return ApiClient(config.api_address())


def volumes_for(config: Config, volume: str | None, group: str | None) -> tuple[VolumeConfig, ...]:
    """The volumes a ``VOLUME|--group G`` argument names, checked against the config.

    A DR-site config (``[receiver]``, no volumes) names no volumes: the replicas there are
    whatever the primaries ship, so the receiver's API checks the name (404, exit 1).

    Raises:
        UsageError: the volume or group is not in the config (the message lists those that
            are, so a typo is easy to spot).
    """
    if config.receiver is not None and not config.volumes:
        return ()
    if volume is not None:
        found = config.volume(volume)
        if found is None:
            known = ", ".join(v.name for v in config.volumes) or "none"
            raise UsageError(
                f"no volume {volume!r} in {config.path} (volumes: {known})",
                hint=f"cdp status --config {config.path}",
            )
        return (found,)
    assert group is not None, "argparse requires VOLUME or --group"
    members = config.group(group)
    if not members:
        known = ", ".join(config.groups()) or "none"
        raise UsageError(
            f"no group {group!r} in {config.path} (groups: {known})",
            hint=f"cdp status --config {config.path}",
        )
    return members


def not_implemented(what: str) -> NoReturn:
    """Fail a verb whose daemon side does not exist yet, after its arguments were checked."""
    raise OperationFailed(
        f"{what} is not implemented yet (it needs the daemon API)",
        hint="see issue 3 for progress",
    )


def when_to_api(when: When) -> dict[str, object]:
    """The API's ``when`` object for a parsed WHEN (docs/design/api.md).

    Relative times were already resolved against the CLI's clock by ``parse_when``, so the
    daemon only ever sees absolute ones.
    """
    if isinstance(when, Latest):
        return {"kind": "latest"}
    if isinstance(when, AtSeq):
        return {"kind": "seq", "seq": when.seq}
    if isinstance(when, AtTime):
        return {"kind": "time", "t_ns": when.t_ns}
    if isinstance(when, AtCheckpoint):
        return {"kind": "checkpoint", "name": when.name}
    if isinstance(when, AtSnapshot):
        return {"kind": "snapshot", "id": when.id}
    raise AssertionError(f"unhandled WHEN {when!r}")  # pragma: no cover


def point_time(t_ns: object) -> str:
    """A journal time for people: RFC 3339 UTC, exact (so it can be pasted into ``--at``).

    Time 0 is the journal's empty start (nothing before the first record), not 1970.
    """
    if not isinstance(t_ns, int) or isinstance(t_ns, bool):
        return "-"
    return "the journal start" if t_ns <= 0 else format_time_ns(t_ns)


def describe_window(
    first_seq: int | None, last_seq: int | None, first_ts: int | None, last_ts: int | None
) -> str:
    """``seq 3..42, 2026-11-22T03:15:00Z to 2026-11-23T03:15:00Z`` (what can be restored)."""
    if first_seq is None or last_seq is None:
        return "an unknown window"
    text = f"seq {first_seq}..{last_seq}"
    if last_ts is not None and last_ts > 0:
        if first_ts is not None and first_ts > 0:
            text += f", {point_time(first_ts)} to {point_time(last_ts)}"
        else:
            text += f", from the journal start to {point_time(last_ts)}"
    return text


def retained_window_error(err: PointNotRetained, when: str, volume: str) -> PointNotRetained:
    """*err* (a 409 from the API) again, with a message naming WHEN and the retained window."""
    window = describe_window(err.first_seq, err.last_seq, err.window_start_ns, err.window_end_ns)
    return PointNotRetained(
        f"no retained point for {when} of {volume}: the journal holds {window}",
        window_start_ns=err.window_start_ns,
        window_end_ns=err.window_end_ns,
        first_seq=err.first_seq,
        last_seq=err.last_seq,
        hint=err.hint,
    )


_SIZE_UNITS: Final = ("KiB", "MiB", "GiB", "TiB", "PiB")


def approx_size(n: object) -> str:
    """A byte count rounded for people: ``512 B``, ``1.5 MiB``, ``12 GiB``."""
    if not isinstance(n, int) or isinstance(n, bool):
        return "-"
    if n < 1024:
        return f"{n} B"
    value, i = n / 1024, 0
    while value >= 1024 and i < len(_SIZE_UNITS) - 1:
        value, i = value / 1024, i + 1
    unit = _SIZE_UNITS[i]
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
