"""``cdp checkpoint VOLUME|--group G [--name N]``: mark a crash-consistent point now."""

from __future__ import annotations

import argparse

from cdp.cli.common import Subparsers, add_verb, load, not_implemented, volumes_for
from cdp.when import check_point_name


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "checkpoint",
        help="record a crash-consistent checkpoint of a volume or group",
        description="Record a crash-consistent checkpoint; prints its seq and time.\n"
        "A checkpoint of one volume covers its whole consistency group.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("volume", nargs="?", metavar="VOLUME", help="volume name")
    target.add_argument("--group", metavar="G", help="consistency group name")
    parser.add_argument("--name", metavar="N", help="checkpoint name, usable later as checkpoint:N")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.name is not None:
        check_point_name(args.name)
    config = load(args)
    volumes_for(config, args.volume, args.group)
    not_implemented("cdp checkpoint")
