"""``cdp replica serve``: the DR-site service around ``replicator.receiver.Receiver``.

It serves the replication endpoints on ``[receiver] listen`` (TLS when a certificate is
configured) and the same control API as the primary on ``[receiver] api``, so ``cdp status``,
``cdp restore`` and ``cdp journal rebuild-index`` work at the DR site with its own config.
Background jobs per replica journal: sealing (data moves into the block store) and retention
under the DR site's own ``[retention]``, independent of the primary's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from cdp.config import Config, ReceiverConfig
from cdp.daemon.quarantine import mark_replicated_anomaly
from cdp.daemon.site import journal_doc
from cdp.daemon.snapshots import grid_enabled, snapshot_round
from cdp.gc_policy import GcPolicy
from cdp.sockpath import prepare_socket_path, remove_socket
from journal import JournalOptions, Record, wall_clock
from journal.clock import Clock
from replicator.receiver import Receiver, ReplicaGroup, TokenFile

log = logging.getLogger(__name__)

VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class ReplicaVolume:
    name: str
    group: ReplicaGroup


def server_ssl(rc: ReceiverConfig) -> ssl.SSLContext | None:
    if rc.tls_cert is None or rc.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(rc.tls_cert), str(rc.tls_key))
    if rc.tls_client_ca is not None:  # mutual TLS: no certificate, no connection
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(rc.tls_client_ca))
    return ctx


class ReceiverService:
    """The DR site: a Site (cdp.daemon.site) for the control API, plus the receiver."""

    read_only = True

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = wall_clock,
        journal_options: JournalOptions | None = None,
        retention_interval_s: float = 60.0,
        gc_policy: GcPolicy | None = None,
    ) -> None:
        assert config.receiver is not None
        self.config = config
        self.rc = config.receiver
        self._clock = clock
        self.retention_interval_s = retention_interval_s
        self.started_ns = 0
        self.receiver = Receiver(
            str(self.rc.state_dir),
            TokenFile(str(self.rc.tokens_file)) if self.rc.tokens_file else None,
            client_names=self.rc.tls_client_names,
            mtls=self.rc.tls_client_ca is not None,
            journal_options=journal_options,
            clock=clock,
        )
        self.receiver.on_applied = self._on_applied
        self.ready = asyncio.Event()
        self.gc_policy = gc_policy  # None: leave the collector alone (in-process tests)

    def _on_applied(self, g: ReplicaGroup, recs: list[Record]) -> None:
        """The primary's anomaly checkpoints pin the same clean point here, locked."""
        if self.config.detector.enabled:
            mark_replicated_anomaly(
                g.journal, g.name, recs, now_ns=self._clock(), lock_ns=self.config.detector.lock_ns
            )

    # -- Site --------------------------------------------------------------------------
    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def groups(self) -> Mapping[str, ReplicaGroup]:
        return self.receiver.groups

    @property
    def volumes(self) -> Mapping[str, ReplicaVolume]:
        out: dict[str, ReplicaVolume] = {}
        for g in self.receiver.groups.values():
            for name in g.journal.status().volumes:
                out[name] = ReplicaVolume(name, g)
        return out

    def status(self) -> dict[str, object]:
        rs = self.receiver.status()
        groups = []
        alerts: list[str] = []
        for g in self.receiver.groups.values():
            st = g.journal.status()
            galerts = list(st.alerts)
            alerts += [f"{g.name}: {a}" for a in galerts]
            doc = journal_doc(g.name, sorted(st.volumes), st)
            doc["alerts"] = galerts
            doc["replica"] = {
                "primary_journal": g.meta.journal.hex() if g.meta else None,
                "epoch": g.meta.epoch if g.meta else 0,
                "batches": g.batches,
                "bytes_in": g.bytes_in,
                "last_batch_ns": g.last_batch_ns,
            }
            groups.append(doc)
        volumes = [
            {
                "name": v.name,
                "group": v.group.name,
                "size": v.group.journal.volume_size(v.name),
                "source": "replica",
            }
            for v in self.volumes.values()
        ]
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": VERSION,
                "started_ns": self.started_ns,
                "role": "replica",
                "gc": None if self.gc_policy is None else self.gc_policy.status(),
            },
            "receiver": {
                "listen": str(self.rc.listen),
                "tls": self.rc.tls_cert is not None,
                "accepted_batches": rs["accepted_batches"],
                "refused": rs["refused"],
            },
            "groups": groups,
            "volumes": volumes,
            "alerts": alerts,
        }

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from cdp.daemon.api import ApiServer

        self.started_ns = self._clock()
        if self.gc_policy is not None:
            self.gc_policy.install()
        await asyncio.to_thread(self.receiver.open)
        runner = web.AppRunner(self.receiver.make_app(), access_log=None)
        api = ApiServer(self, self.rc.api)
        try:
            await runner.setup()
            await self._listen(runner)
            await api.start()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._sealer(stop), name="replica-sealer")
                    tg.create_task(self._retention(stop), name="replica-retention")
                    tg.create_task(self._snapshots(stop), name="replica-snapshots")
                    if self.gc_policy is not None:
                        tg.create_task(self.gc_policy.run(stop, self._activity), name="gc")
                    self.ready.set()
                    log.info(
                        "receiver ready",
                        extra={"listen": str(self.rc.listen), "groups": len(self.groups)},
                    )
                    await stop.wait()
            finally:
                await api.stop()
        finally:
            await runner.cleanup()
            a = self.rc.listen
            if a.kind == "unix" and a.path:
                remove_socket(a.path)
            await asyncio.to_thread(self.receiver.close)
            log.info("receiver stopped; replica journals synced and closed")

    async def _listen(self, runner: web.AppRunner) -> None:
        a = self.rc.listen
        ctx = server_ssl(self.rc)
        if a.kind == "unix":
            assert a.path is not None
            prepare_socket_path(a.path)
            site: web.BaseSite = web.UnixSite(runner, a.path, ssl_context=ctx)
        else:
            assert a.host is not None and a.port is not None
            site = web.TCPSite(runner, a.host, a.port, ssl_context=ctx)
        await site.start()
        log.info("receiver listening", extra={"address": str(a), "tls": ctx is not None})

    def _activity(self) -> int:
        """Grows with every record applied to a replica journal (for ``GcPolicy``)."""
        return sum(int(g.journal.next_seq) for g in list(self.receiver.groups.values()))

    async def _sealer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            busy = False
            for g in list(self.receiver.groups.values()):
                j = g.journal
                if j.healthy and j.unsealed_segments:
                    try:
                        busy = bool(await asyncio.to_thread(j.seal_pending, 1)) or busy
                    except Exception as e:
                        log.error("replica sealing failed", extra={"group": g.name, "err": str(e)})
            await _wait(stop, 0.05 if busy else 0.5)

    async def _snapshots(self, stop: asyncio.Event) -> None:
        """The DR site's own snapshot schedule and plan, over every replica journal."""
        grid = self.config.retention.snapshots
        if not grid_enabled(grid):
            return
        while not stop.is_set():
            for g in list(self.receiver.groups.values()):
                try:
                    await asyncio.to_thread(snapshot_round, g.journal, grid, self._clock(), g.name)
                except Exception as e:
                    log.error("replica snapshots failed", extra={"group": g.name, "err": str(e)})
            await _wait(stop, 30.0)

    async def _retention(self, stop: asyncio.Event) -> None:
        r = self.config.retention
        while not stop.is_set():
            await _wait(stop, self.retention_interval_s)
            for g in list(self.receiver.groups.values()):
                try:
                    await asyncio.to_thread(
                        g.journal.apply_retention,
                        keep_ns=r.journal_window_ns,
                        max_bytes=r.journal_max_bytes,
                    )
                except Exception as e:
                    log.error("replica retention failed", extra={"group": g.name, "err": str(e)})


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def run_receiver(
    config: Config, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> int:
    """Entry point for ``cdp replica serve``: SIGTERM/SIGINT stop it; returns the exit code."""
    from cdp.daemon.service import run_until_signal

    return run_until_signal(
        config, lambda stop: ReceiverService(config, gc_policy=GcPolicy()).run(stop), loop_factory
    )
