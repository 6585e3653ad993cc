"""Wiring ``[[replica]]`` config into senders: secrets from files, TLS contexts, alerts.

The token is read from ``token_file`` at start (never from argv, never logged); a file that
cannot be read, or holds no token, stops the daemon at start with ``file: key`` named, like
any other config error.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from cdp.config import Config, ReplicaConfig
from cdp.errors import ConfigError
from journal import Journal
from journal.clock import Clock
from replicator import wire
from replicator.sender import Sender, Target


def read_token(config: Config, index: int, r: ReplicaConfig) -> str:
    key = f"replica[{index}].token_file"
    try:
        with open(r.token_file, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ConfigError(config.path, key, f"cannot read the token file: {e.strerror}") from e
    if not lines:
        raise ConfigError(config.path, key, f"{r.token_file} holds no token")
    return lines[0]


def client_ssl(config: Config, index: int, r: ReplicaConfig) -> ssl.SSLContext | None:
    if not r.url.startswith("https:"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(r.tls_ca) if r.tls_ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if r.tls_cert and r.tls_key:
            ctx.load_cert_chain(str(r.tls_cert), str(r.tls_key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(config.path, f"replica[{index}].tls_ca", f"TLS setup failed: {e}") from e
    return ctx


def make_target(config: Config, index: int, r: ReplicaConfig) -> Target:
    return Target(
        name=r.name,
        url=r.url,
        token=read_token(config, index, r),
        ssl=client_ssl(config, index, r),
        bandwidth=r.bandwidth_bps,
        codec=wire.CODEC_ZSTD if r.compression == "zstd" else wire.CODEC_NONE,
        level=r.compression_level,
        coalesce_ns=r.coalesce_ns,
        high_water=r.high_water_bytes,
    )


def make_targets(config: Config) -> list[Target]:
    """Every replica target, secrets read now: a bad token file fails the start, not later."""
    return [make_target(config, i, r) for i, r in enumerate(config.replicas)]


def make_senders(
    targets: list[Target], groups: dict[str, Callable[[], Journal]], clock: Clock
) -> dict[tuple[str, str], Sender]:
    """One sender per (group, replica): every group is shipped to every replica."""
    return {
        (g, t.name): Sender(t, g, journal, clock=clock)
        for g, journal in groups.items()
        for t in targets
    }


def replica_alerts(group: str, st: dict[str, Any]) -> list[str]:
    out = []
    name = st["name"]
    if st["state"] == "refused":
        out.append(f"{group}: replica {name} refuses the stream: {st['detail']}")
    elif st["state"] == "resync-needed":
        out.append(f"{group}: replica {name} needs a resync: {st['detail']}")
    if st["over_high_water"]:
        out.append(
            f"{group}: replica {name} is {st['pending_bytes']} bytes behind "
            f"(high water {st['high_water_bytes']}); RPO lag {st['lag_s']} s"
        )
    return out
