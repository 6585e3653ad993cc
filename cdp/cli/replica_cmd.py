"""``cdp replica serve``: the DR-site receiver service (systemd: cdp-replica.service).

Like ``cdp daemon``: the whole config is validated first (a config without ``[receiver]``,
or whose ``tokens_file`` cannot be read, exits 2 with nothing started), the state folder is
locked for this process, and SIGTERM or SIGINT stops it with every replica journal synced.
"""

from __future__ import annotations

import argparse
import os

from cdp.cli.common import Subparsers, add_common_options, add_verb, load
from cdp.cli.daemon_cmd import run_service
from cdp.errors import ConfigError


def add_parser(subparsers: Subparsers) -> None:
    replica = subparsers.add_parser("replica", help="DR-site replica service")
    add_common_options(replica)
    actions = replica.add_subparsers(dest="replica_action", metavar="ACTION", required=True)
    serve = add_verb(
        actions,
        "serve",
        help="run the DR-site receiver in the foreground",
        description="Receive replication streams from primary daemons into replica journals, "
        "and serve the control API for the cdp commands at the DR site.",
    )
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    rc = config.receiver
    if rc is None:
        raise ConfigError(
            config.path, "receiver", "missing: cdp replica serve needs a [receiver] table"
        )
    if rc.tokens_file is not None and not os.access(rc.tokens_file, os.R_OK):
        raise ConfigError(
            config.path,
            "receiver.tokens_file",
            f"cannot read {rc.tokens_file}",
            hint="one bearer token per line; readable by the service user only (mode 0600)",
        )
    from cdp.daemon.receiver_service import run_receiver

    return run_service(
        config, rc.state_dir, lambda: run_receiver(config), "the receiver",
        f"cdp replica serve --config {config.path}",
    )  # fmt: skip
