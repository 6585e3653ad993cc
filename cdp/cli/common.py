"""Helpers every verb shares: the common options, loading the config, finding volumes."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias

from cdp.config import DEFAULT_CONFIG_PATH, Config, VolumeConfig, load_config
from cdp.errors import OperationFailed, UsageError

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers: TypeAlias = argparse._SubParsersAction

__all__ = [
    "CONFIG_ENV",
    "ArgumentParser",
    "Subparsers",
    "add_common_options",
    "add_verb",
    "load",
    "not_implemented",
    "resolve_config_path",
    "volumes_for",
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


def volumes_for(config: Config, volume: str | None, group: str | None) -> tuple[VolumeConfig, ...]:
    """The volumes a ``VOLUME|--group G`` argument names, checked against the config.

    Raises:
        UsageError: the volume or group is not in the config (the message lists those that
            are, so a typo is easy to spot).
    """
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
