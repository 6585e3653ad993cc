"""``cdp configcheck``: validate a config file and exit; systemd runs it before the daemon."""

from __future__ import annotations

import argparse

from cdp.cli.common import Subparsers, add_verb, load


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "configcheck",
        help="check a config file and exit (0 and OK if valid, 2 and the error if not)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    parts = [f"{len(config.volumes)} volume(s) in {len(config.groups())} group(s)"]
    parts.append(f"{len(config.replicas)} replica(s)")
    if config.receiver is not None:
        parts.append(f"receiver on {config.receiver.listen}")
    print(f"OK: {config.path}: {', '.join(parts)}")
    return 0
