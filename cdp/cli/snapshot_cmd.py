"""``cdp snapshot create|list|delete|lock|prune VOLUME|--group G ...``: retained points.

A snapshot names one seq of a consistency group's journal and outlives the journal window
(it shares blocks with the journal and other snapshots, so it costs only what changed).
A locked snapshot cannot be deleted or pruned before the lock expires, by this command or
any other path (the journal refuses it); a lock is only ever extended. ``prune --dry-run``
shows the retention plan of ``[retention.snapshots]`` and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from cdp.cli.common import (
    Subparsers,
    add_common_options,
    add_verb,
    api_client,
    load,
    point_time,
    volumes_for,
    when_to_api,
)
from cdp.errors import OperationFailed, UsageError
from cdp.units import parse_duration
from cdp.when import check_point_name, parse_when


def _target(p: argparse.ArgumentParser) -> None:
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("volume", nargs="?", metavar="VOLUME", help="volume name")
    t.add_argument("--group", metavar="G", help="consistency group name")


def add_parser(subparsers: Subparsers) -> None:
    snap = subparsers.add_parser("snapshot", help="retained, lockable snapshots")
    add_common_options(snap)
    actions = snap.add_subparsers(dest="snapshot_action", metavar="ACTION", required=True)
    create = add_verb(actions, "create", help="take a snapshot (of latest, or --at WHEN)")
    _target(create)
    create.add_argument("--name", metavar="ID", help="snapshot id, usable as snapshot:ID")
    create.add_argument("--at", metavar="WHEN", help="the point to keep (default: latest)")
    create.add_argument("--lock", metavar="DURATION", help='lock it for that long, e.g. "14d"')
    create.set_defaults(run=run_create)
    ls = add_verb(actions, "list", help="list snapshots")
    _target(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=run_list)
    delete = add_verb(actions, "delete", help="delete an unlocked snapshot")
    _target(delete)
    delete.add_argument("--name", metavar="ID", required=True, help="the snapshot id")
    delete.set_defaults(run=run_delete)
    lock = add_verb(actions, "lock", help="lock a snapshot (extend only)")
    _target(lock)
    lock.add_argument("--name", metavar="ID", required=True, help="the snapshot id")
    lock.add_argument("--for", dest="lock_for", metavar="DURATION", required=True,
                      help='from now, e.g. "30d"')  # fmt: skip
    lock.set_defaults(run=run_lock)
    prune = add_verb(actions, "prune", help="apply the [retention.snapshots] plan")
    _target(prune)
    prune.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    prune.set_defaults(run=run_prune)


def _body(args: argparse.Namespace) -> dict[str, object]:
    return {"volume": args.volume} if args.volume is not None else {"group": args.group}


def _duration(text: str, what: str) -> int:
    try:
        ns = parse_duration(text)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from e
    if ns <= 0:
        raise UsageError(f"{what}: must be positive")
    return ns


def _line(s: dict[str, Any]) -> str:
    lock = ""
    if s.get("locked_until_ns", 0) > time.time_ns():
        lock = f", locked until {point_time(s['locked_until_ns'])}"
    where = "" if not s.get("materialized") else ", outside the journal window"
    return (
        f"{s['name']}: seq {s['seq']} at {point_time(s['ts_ns'])} ({s['kind']}{lock}{where}; "
        f"group {s['group']})"
    )


def run_create(args: argparse.Namespace) -> int:
    if args.name is not None:
        check_point_name(args.name)
    body = _body(args)
    if args.at is not None:
        body["when"] = when_to_api(parse_when(args.at, now_ns=time.time_ns()))
    if args.lock is not None:
        body["lock_ns"] = _duration(args.lock, "--lock")
    config = load(args)
    volumes_for(config, args.volume, args.group)
    if args.name is not None:
        body["name"] = args.name
    reply = asyncio.run(api_client(config).post("/v1/snapshots", body))
    print("snapshot " + _line(reply))
    return 0


def run_list(args: argparse.Namespace) -> int:
    config = load(args)
    volumes_for(config, args.volume, args.group)
    q = f"volume={args.volume}" if args.volume is not None else f"group={args.group}"
    reply = asyncio.run(api_client(config).get(f"/v1/snapshots?{q}"))
    snaps = reply.get("snapshots")
    if not isinstance(snaps, list):
        raise OperationFailed(f"the daemon's snapshot list is incomplete: {reply}")
    if args.json:
        print(json.dumps(snaps, indent=2))
    elif not snaps:
        print("no snapshots")
    else:
        for s in snaps:
            print(_line(s))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    config = load(args)
    volumes_for(config, args.volume, args.group)
    asyncio.run(api_client(config).post("/v1/snapshots/delete", {**_body(args), "name": args.name}))
    print(f"deleted snapshot {args.name}")
    return 0


def run_lock(args: argparse.Namespace) -> int:
    ns = _duration(args.lock_for, "--for")
    config = load(args)
    volumes_for(config, args.volume, args.group)
    reply = asyncio.run(
        api_client(config).post(
            "/v1/snapshots/lock", {**_body(args), "name": args.name, "lock_ns": ns}
        )
    )
    print("snapshot " + _line(reply))
    return 0


def run_prune(args: argparse.Namespace) -> int:
    config = load(args)
    volumes_for(config, args.volume, args.group)
    reply = asyncio.run(
        api_client(config).post("/v1/snapshots/prune", {**_body(args), "dry_run": args.dry_run})
    )
    plan = reply.get("plan")
    if not isinstance(plan, list):
        raise OperationFailed(f"the daemon's plan is incomplete: {reply}")
    verb = "would delete" if args.dry_run else "deleted"
    for e in plan:
        action = verb if e["action"] == "delete" else "keep"
        print(f"{action:12} {e['name']}: {e['reason']}")
    if not plan:
        print("no snapshots")
    return 0
