"""``cdp restore VOLUME --at WHEN --output FILE [--force]``: write a point as a raw image.

The output is a sparse raw image of the volume at WHEN. It never replaces an existing file,
and never follows a symlink, unless ``--force`` is given: a mistyped ``--output`` must not
overwrite a live disk image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cdp.cli.common import Subparsers, add_verb, load, not_implemented, volumes_for
from cdp.errors import OutputExists, UsageError
from cdp.when import parse_when


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "restore",
        help="write a volume as it was at WHEN to a sparse raw image",
        description="Write VOLUME as it was at WHEN to FILE (a sparse raw image).\n\n"
        "WHEN: 2026-11-22T03:15:00Z, -15m, checkpoint:NAME, snapshot:ID, seq:N or latest.",
    )
    parser.add_argument("volume", metavar="VOLUME", help="volume name")
    parser.add_argument("--at", metavar="WHEN", required=True, help="point to restore")
    parser.add_argument("--output", metavar="FILE", required=True, help="image to write")
    parser.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (even a symlink)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Usage problems (exit 2) first, then the checks that depend on the filesystem (exit 1).
    parse_when(args.at, now_ns=time.time_ns())
    config = load(args)
    volumes_for(config, args.volume, None)
    # The daemon may run with another working directory, so it gets an absolute path.
    output = Path(os.path.abspath(args.output))
    check_output_path(output, force=args.force)
    not_implemented("cdp restore")


def check_output_path(path: Path, *, force: bool) -> None:
    """Refuse an existing file or a symlink at *path* unless *force*; require its folder.

    This is an early, friendly check; whoever writes the file must still open it with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (unless forced), since the path can change in between.

    Raises:
        OutputExists: *path* exists or is a symlink (dangling or not) and not *force*.
        UsageError: the folder of *path* does not exist.
    """
    if not force:
        if path.is_symlink():
            raise OutputExists(os.fspath(path), "is a symlink; refusing to follow it")
        if path.exists():
            raise OutputExists(os.fspath(path), "already exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory for --output")
