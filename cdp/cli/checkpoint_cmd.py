"""``cdp checkpoint VOLUME|--group G [--name N] [--consistent]``: mark a point now.

``POST /v1/checkpoint``; prints ``checkpoint NAME: seq N at TIME (group G)``. The time is
exact, so it can be given back as ``--at`` (as can ``checkpoint:NAME`` and ``seq:N``).

``--consistent`` (issue 6) has the daemon run the config's ``[hooks]`` around it: a freeze
that works gives an ``app`` checkpoint, one that fails or times out still gives a ``crash``
checkpoint, so the verb prints a ``Warning:`` line and exits 0 (a point was taken). A failed
``post_thaw`` is a warning too: the checkpoint exists, but the guest may still be frozen.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cdp.cli.common import Subparsers, add_verb, api_client, load, point_time, volumes_for
from cdp.errors import OperationFailed, UsageError
from cdp.when import check_point_name

# Beyond the hooks' own timeouts (freeze, capture catch-up, thaw): the checkpoint itself.
_CONSISTENT_SLACK_S = 60.0


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "checkpoint",
        help="record a crash-consistent checkpoint of a volume or group",
        description="Record a crash-consistent checkpoint; prints its seq and time.\n"
        "A checkpoint of one volume covers its whole consistency group.\n"
        "With --consistent the daemon runs [hooks] pre_freeze before and post_thaw after\n"
        "(always); if the freeze fails the checkpoint is still taken, crash-consistent,\n"
        "with a warning (exit 0).",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("volume", nargs="?", metavar="VOLUME", help="volume name")
    target.add_argument("--group", metavar="G", help="consistency group name")
    parser.add_argument("--name", metavar="N", help="checkpoint name, usable later as checkpoint:N")
    parser.add_argument(
        "--consistent",
        action="store_true",
        help="app-consistent: freeze the guest with the config's [hooks] around the checkpoint",
    )
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
    client = api_client(config)
    if args.consistent:
        if config.hooks is None:
            raise UsageError(
                f"--consistent needs a [hooks] table (pre_freeze, post_thaw) in {config.path}",
                hint="see docs/config.md, [hooks]; or leave out --consistent",
            )
        body["consistent"] = True
        # freeze, catch-up and thaw each get the timeout
        client.timeout_s = 3 * config.hooks.timeout_ns / 1e9 + _CONSISTENT_SLACK_S
    reply = asyncio.run(client.post("/v1/checkpoint", body))
    name, seq, group = reply.get("name"), reply.get("seq"), reply.get("group")
    if not isinstance(name, str) or not isinstance(seq, int) or not isinstance(group, str):
        raise OperationFailed(f"the daemon's checkpoint reply is incomplete: {reply}")
    where = f"group {group}"
    if args.consistent:
        where += ", app-consistent" if reply.get("consistent") is True else ", crash-consistent"
    print(f"checkpoint {name}: seq {seq} at {point_time(reply.get('ts_ns'))} ({where})")
    if args.consistent and reply.get("consistent") is not True:
        why = reply.get("reason") or "the daemon did not say why"
        print(f"Warning: not app-consistent ({why}); a crash-consistent checkpoint was taken",
              file=sys.stderr)  # fmt: skip
    if args.consistent and reply.get("thaw_error"):
        print(f"Warning: {reply['thaw_error']}; the checkpoint exists, but the guest may still "
              "be frozen: check it and thaw it by hand", file=sys.stderr)  # fmt: skip
    return 0
