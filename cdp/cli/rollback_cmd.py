"""``cdp rollback VOLUME|--group G --to WHEN [--dry-run] [--yes] [--force]``.

Reverts the live volume(s) to a point. ``--dry-run`` shows the nearest checkpoints and
snapshots and how many chunks and bytes would change, and changes nothing. The rollback is
journaled between two checkpoints, so it can be undone by rolling back to
``checkpoint:pre-rollback-...``. It refuses while NBD clients are connected; ``--force``
disconnects them, and the VM must then be restarted (a disk changed under a running guest
corrupts its file systems). Without ``--yes`` it asks first on a terminal and refuses
(exit 2) when there is no terminal to ask.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from cdp.cli.common import (
    Subparsers,
    add_verb,
    api_client,
    approx_size,
    load,
    point_time,
    volumes_for,
    when_to_api,
)
from cdp.errors import OperationFailed, UsageError
from cdp.when import parse_when


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "rollback",
        help="revert live volumes to a point in time",
        description="Revert VOLUME (its whole consistency group) or --group G to WHEN.",
    )
    t = parser.add_mutually_exclusive_group(required=True)
    t.add_argument("volume", nargs="?", metavar="VOLUME", help="volume name")
    t.add_argument("--group", metavar="G", help="consistency group name")
    parser.add_argument("--to", required=True, metavar="WHEN", help="the point to go back to")
    parser.add_argument("--dry-run", action="store_true", help="show what would change")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--force", action="store_true", help="disconnect NBD clients first (restart the VM!)"
    )
    parser.set_defaults(run=run)


def _near(n: dict[str, Any], key: str) -> str:
    x = n.get(key)
    if not x:
        return "none"
    return f"{x['name']} (seq {x['seq']}, {point_time(x['ts_ns'])})"


def _show(reply: dict[str, Any]) -> None:
    n = reply.get("nearest", {})
    print(f"target: seq {reply['seq']} (group {reply['group']})")
    print(f"  checkpoint before: {_near(n, 'checkpoint_before')}")
    print(f"  checkpoint after:  {_near(n, 'checkpoint_after')}")
    print(f"  snapshot before:   {_near(n, 'snapshot_before')}")
    print(f"  snapshot after:    {_near(n, 'snapshot_after')}")
    for v in reply.get("volumes", []):
        print(f"  {v['volume']}: {v['chunks']} chunks, {approx_size(v['bytes'])} to rewrite")
    for vol, k in reply.get("connected", {}).items():
        if k:
            print(f"  {vol}: {k} NBD client(s) connected")


def run(args: argparse.Namespace) -> int:
    when = parse_when(args.to, now_ns=time.time_ns())
    config = load(args)
    volumes_for(config, args.volume, args.group)
    body: dict[str, object] = (
        {"volume": args.volume} if args.volume is not None else {"group": args.group}
    )
    body["when"] = when_to_api(when)
    client = api_client(config)
    preview = asyncio.run(client.post("/v1/rollback", {**body, "dry_run": True}))
    _show(preview)
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("rollback changes live volumes: confirm with --yes")
        answer = input(f"roll {preview['group']} back to seq {preview['seq']}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not rolled back")
            return 1
    if when_to_api(when).get("kind") != "snapshot":  # a snapshot may be beyond the window
        body["when"] = {"kind": "seq", "seq": preview["seq"]}  # exactly the point shown
    reply = asyncio.run(client.post("/v1/rollback", {**body, "force": args.force}))
    if reply.get("dry_run") is not False:
        raise OperationFailed(f"the daemon's rollback reply is incomplete: {reply}")
    print(
        f"rolled back group {reply['group']} to seq {reply['seq']}: "
        f"{approx_size(reply['bytes'])} rewritten; undo with "
        f"`cdp rollback {args.volume or '--group ' + args.group} "
        f"--to checkpoint:{reply['pre_checkpoint']}`"
    )
    if reply.get("disconnected"):
        print(
            "warning: NBD clients were disconnected: restart the VM now (its page cache "
            "holds the state from before the rollback)",
            file=sys.stderr,
        )
    return 0
