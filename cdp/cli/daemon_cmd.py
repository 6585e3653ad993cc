"""``cdp daemon``: the primary-site service (systemd: cdp.service).

Loads and validates the whole config before starting anything, so a bad config exits 2 with
nothing started, then sets up logging as the config says.
"""

from __future__ import annotations

import argparse
import sys

from cdp.cli.common import Subparsers, add_verb, load, not_implemented
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
    setup_logging(config.daemon.log_format, config.daemon.log_level, sys.stderr)
    not_implemented("cdp daemon")
