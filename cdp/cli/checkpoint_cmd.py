"""``cdp checkpoint VOLUME|--group G [--name N]``: mark a crash-consistent point now.

``POST /v1/checkpoint``; prints ``checkpoint NAME: seq N at TIME (group G)``. The time is
exact, so it can be given back as ``--at`` (as can ``checkpoint:NAME`` and ``seq:N``).
"""

from __future__ import annotations

import argparse
import asyncio

from cdp.cli.common import Subparsers, add_verb, api_client, load, point_time, volumes_for
from cdp.errors import OperationFailed
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
    body: dict[str, object] = (
        {"volume": args.volume} if args.volume is not None else {"group": args.group}
    )
    if args.name is not None:
        body["name"] = args.name
    reply = asyncio.run(api_client(config).post("/v1/checkpoint", body))
    name, seq, group = reply.get("name"), reply.get("seq"), reply.get("group")
    if not isinstance(name, str) or not isinstance(seq, int) or not isinstance(group, str):
        raise OperationFailed(f"the daemon's checkpoint reply is incomplete: {reply}")
    print(f"checkpoint {name}: seq {seq} at {point_time(reply.get('ts_ns'))} (group {group})")
    return 0
