"""``cdp journal rebuild-index VOLUME``: rebuild the journal index from the segments.

Segments are the truth and every index is derived from them (invariant 2), so this is always
safe; it is the repair step that integrity errors point to.
"""

from __future__ import annotations

import argparse

from cdp.cli.common import (
    Subparsers,
    add_common_options,
    add_verb,
    load,
    not_implemented,
    volumes_for,
)


def add_parser(subparsers: Subparsers) -> None:
    journal = subparsers.add_parser("journal", help="journal maintenance")
    add_common_options(journal)
    actions = journal.add_subparsers(dest="journal_action", metavar="ACTION", required=True)
    rebuild = add_verb(
        actions,
        "rebuild-index",
        help="rebuild a volume's journal index from its segments",
    )
    rebuild.add_argument("volume", metavar="VOLUME", help="volume name")
    rebuild.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    volumes_for(config, args.volume, None)
    not_implemented("cdp journal rebuild-index")
