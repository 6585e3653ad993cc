"""``cdp journal rebuild-index VOLUME``: rebuild the journal index from the segments.

Segments are the truth and every index is derived from them (invariant 2), so this is always
safe; it is the repair step that integrity errors point to. The daemon does it
(``POST /v1/journal/rebuild-index``) for the volume's whole consistency group, since the
group shares one journal.
"""

from __future__ import annotations

import argparse
import asyncio

from cdp.cli.common import Subparsers, add_common_options, add_verb, api_client, load, volumes_for


def add_parser(subparsers: Subparsers) -> None:
    journal = subparsers.add_parser("journal", help="journal maintenance")
    add_common_options(journal)
    actions = journal.add_subparsers(dest="journal_action", metavar="ACTION", required=True)
    rebuild = add_verb(
        actions,
        "rebuild-index",
        help="rebuild a volume's journal index from its segments",
        description="Rebuild the journal index of VOLUME's consistency group from its "
        "segments and packs.\nSafe at any time; the daemon keeps capturing meanwhile.",
    )
    rebuild.add_argument("volume", metavar="VOLUME", help="volume name")
    rebuild.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    volumes_for(config, args.volume, None)
    reply = asyncio.run(
        api_client(config).post("/v1/journal/rebuild-index", {"volume": args.volume})
    )
    print(
        f"rebuilt the journal index of group {reply.get('group')} (volume {args.volume}): "
        f"{reply.get('segments')} segment(s), {reply.get('blocks')} block(s)"
    )
    return 0
