"""``cdp export VOLUME|--group G --at WHEN [--listen ADDRESS] [--writable]``: instant export.

The daemon serves that point over NBD at once, without materializing it: reads come from the
journal and the block store, writes (with ``--writable``) go to a throwaway overlay. The
export name is the volume's name. It lasts while this command runs: Ctrl-C, SIGTERM, or the
command dying any other way (the daemon notices the closed API stream) stops it and drops
the overlay. The point is held meanwhile, so retention cannot fold it away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from types import FrameType

from cdp.cli.common import Subparsers, add_verb, api_client, load, volumes_for, when_to_api
from cdp.errors import CdpError, OperationFailed
from cdp.when import parse_when


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "export",
        help="serve a past point over NBD, instantly",
        description="Serve VOLUME (or every volume of --group G) as of WHEN over NBD until "
        "interrupted. Nothing is copied up front.",
    )
    t = parser.add_mutually_exclusive_group(required=True)
    t.add_argument("volume", nargs="?", metavar="VOLUME", help="volume name")
    t.add_argument("--group", metavar="G", help="consistency group name")
    parser.add_argument("--at", required=True, metavar="WHEN", help="the point to serve")
    parser.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="unix:PATH or HOST:PORT (default: a unix socket beside the API socket)",
    )
    parser.add_argument(
        "--writable", action="store_true", help="accept writes into a throwaway overlay"
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="allow a non-loopback TCP address (NBD has no authentication here)",
    )
    parser.set_defaults(run=run)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    when = parse_when(args.at, now_ns=time.time_ns())
    config = load(args)
    volumes_for(config, args.volume, args.group)
    body: dict[str, object] = (
        {"volume": args.volume} if args.volume is not None else {"group": args.group}
    )
    body.update(when=when_to_api(when), writable=args.writable, public=args.public)
    if args.listen:
        body["listen"] = args.listen
    client = api_client(config)
    reply = asyncio.run(client.post("/v1/exports", body))
    eid, uris = reply.get("id"), reply.get("uris")
    if not isinstance(eid, str) or not isinstance(uris, dict):
        raise OperationFailed(f"the daemon's export reply is incomplete: {reply}")
    mode = "read-write (throwaway overlay)" if args.writable else "read-only"
    point = f"snapshot {reply['snapshot']}" if reply.get("snapshot") else f"seq {reply['seq']}"
    for name, uri in uris.items():
        print(f"serving {name} as of {point}, {mode}: {uri}", flush=True)
    print("Ctrl-C stops the export.", file=sys.stderr, flush=True)
    old = signal.signal(signal.SIGTERM, _stop)
    try:
        asyncio.run(client.download(f"/v1/exports/{eid}/attach", lambda b: None))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        with contextlib.suppress(CdpError, KeyboardInterrupt):
            asyncio.run(client.delete(f"/v1/exports/{eid}"))
    print(f"export {eid} stopped", file=sys.stderr)
    return 0
