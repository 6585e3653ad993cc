"""The daemon: one owner for every background task, clean start and stop.

``Daemon.run(stop)`` opens one journal per consistency group under
``<state_dir>/groups/<group>``, declares the configured volumes, starts the capture, sealing
and retention jobs and the control API in one TaskGroup, and on ``stop`` drains them, syncs
and closes every journal. Journals are synchronous (threads + fsync); the event loop only
ever reaches them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cdp.capture.hashscan import HashScanner
from cdp.capture.splitter import CleanMarker, onboard_export
from cdp.config import Config, NbdSource, NbdTlsMode, ScanSource, VolumeConfig
from cdp.daemon.detect import DetectorSetup, DetectorState, run_detector
from cdp.daemon.quarantine import Quarantine
from cdp.daemon.replication import make_senders, make_targets, replica_alerts
from cdp.daemon.site import journal_doc
from cdp.daemon.snapshots import grid_enabled, snapshot_round
from cdp.detector import DetectorConfig
from cdp.gc_policy import GcPolicy
from cdp.nbd.export import Export, ExportSet
from cdp.nbd.server import NbdServer, server_tls_context
from journal import (
    CheckpointKind,
    Journal,
    JournalOptions,
    wall_clock,
)
from journal.clock import Clock
from replicator.sender import Sender

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SEAL_BACKLOG = 4  # rolled segments left hot while guests write (see Daemon._sealer)


@dataclass(slots=True)
class Group:
    """A consistency group: volumes that share one journal and one seq."""

    name: str
    journal: Journal
    volumes: list[VolumeConfig]
    path: str = ""
    sealer_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    last_retention_error: str | None = None
    last_sealer_error: str | None = None
    reopens: int = 0
    retired: list[Journal] = field(default_factory=list)  # replaced after a failure
    quarantines: list[Quarantine] = field(default_factory=list)  # detector alarms
    detector: DetectorState | None = None

    def not_a_point(self, seq: int) -> str | None:
        return None  # every retained seq of a primary journal is a crash-consistent point


@dataclass(slots=True)
class VolumeRuntime:
    config: VolumeConfig
    group: Group
    scanner: HashScanner | None = None
    export: Export | None = None
    capture_state: str = "starting"
    capture_detail: str = ""
    onboard_state: str = "none"
    onboard_scanned: int = 0
    first_point_seq: int | None = None


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = wall_clock,
        journal_options: JournalOptions | None = None,
        retention_interval_s: float = 60.0,
        snapshot_interval_s: float = 30.0,
        gc_policy: GcPolicy | None = None,
    ) -> None:
        self.config = config
        self.snapshot_interval_s = snapshot_interval_s
        self.clock = clock
        self.journal_options = journal_options or JournalOptions()
        self.retention_interval_s = retention_interval_s
        self.groups: dict[str, Group] = {}
        self.volumes: dict[str, VolumeRuntime] = {}
        self.started_ns = 0
        self.ready = asyncio.Event()
        self._stop_threads = threading.Event()
        self.nbd_servers: list[NbdServer] = []
        self.senders: dict[tuple[str, str], Sender] = {}
        self.read_only = False
        self.gc_policy = gc_policy  # None: leave the collector alone (in-process tests)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then drain, sync and close. Raises on a failed start."""
        from cdp.daemon.api import ApiServer  # the API module imports this one

        self.started_ns = self.clock()
        if self.gc_policy is not None:
            self.gc_policy.install()
        targets = make_targets(self.config)
        await asyncio.to_thread(self._open_journals)
        self.senders = make_senders(
            targets, {n: _journal_of(g) for n, g in self.groups.items()}, self.clock
        )
        await asyncio.to_thread(self._release_removed_replicas)
        api = ApiServer(self, self.config.daemon.api)
        try:
            await self._start_exports()
            await api.start()
            try:
                async with asyncio.TaskGroup() as tg:
                    for g in self.groups.values():
                        tg.create_task(self._snapshots(g, stop), name=f"snapshots:{g.name}")
                        tg.create_task(self._detect(g, stop), name=f"detector:{g.name}")
                        tg.create_task(self._sealer(g, stop), name=f"sealer:{g.name}")
                        tg.create_task(self._retention(g, stop), name=f"retention:{g.name}")
                        tg.create_task(self._repair(g, stop), name=f"repair:{g.name}")
                    for v in self.volumes.values():
                        tg.create_task(self._capture(v, stop), name=f"capture:{v.config.name}")
                    for (gname, rname), snd in self.senders.items():
                        tg.create_task(snd.run(stop), name=f"replicate:{gname}:{rname}")
                    if self.gc_policy is not None:
                        tg.create_task(self.gc_policy.run(stop, self._activity), name="gc")
                    self.ready.set()
                    log.info(
                        "daemon ready",
                        extra={"groups": len(self.groups), "volumes": len(self.volumes)},
                    )
                    await stop.wait()
                    self._stop_threads.set()
            finally:
                await api.stop()
        finally:
            self._stop_threads.set()
            await self._stop_exports()
            await asyncio.to_thread(self._close_journals)
            log.info("daemon stopped; journals synced and closed")

    def _release_removed_replicas(self) -> None:
        """A ``[[replica]]`` removed from the config no longer holds history back."""
        names = {r.name for r in self.config.replicas}
        for g in self.groups.values():
            for kind, name in list(g.journal.holds):
                if kind == "replica" and name not in names:
                    g.journal.release_hold(kind, name)
                    log.warning(
                        "released the hold of a replica no longer configured",
                        extra={"group": g.name, "replica": name},
                    )

    async def _start_exports(self) -> None:
        """Open every nbd volume's image and listen; volumes sharing an address share a server."""
        by_addr: dict[str, ExportSet] = {}
        addrs = {}
        tls: dict[str, tuple[Path | None, Path | None, NbdTlsMode]] = {}
        for v in self.volumes.values():
            src = v.config.source
            if not isinstance(src, NbdSource):
                continue
            g = v.group
            ex = Export(
                v.config.name,
                v.config.size_bytes,
                str(src.image),
                _journal_of(g),
                chunk_size=self.journal_options.chunk_size,
            )
            await asyncio.to_thread(ex.open)
            v.export = ex
            key = str(src.listen)
            by_addr.setdefault(key, ExportSet()).exports[ex.name] = ex
            addrs[key] = src.listen
            want = (src.tls_cert, src.tls_key, src.tls)
            if tls.setdefault(key, want) != want:
                raise ValueError(
                    f"volumes listening on {key} disagree on TLS (tls_cert, tls_key, tls); "
                    "one NBD server per address has one TLS setting"
                )
        for key, exports in by_addr.items():
            cert, tls_key, mode = tls[key]
            ctx = None
            if cert is not None and tls_key is not None:
                # an unreadable or mismatched cert/key raises OSError (ssl.SSLError is one)
                ctx = await asyncio.to_thread(server_tls_context, str(cert), str(tls_key))
            server = NbdServer(exports, ctx, mode)
            a = addrs[key]
            if a.kind == "unix":
                assert a.path is not None
                await server.start_unix(a.path)
            else:
                assert a.host is not None and a.port is not None
                await server.start_tcp(a.host, a.port)
            self.nbd_servers.append(server)
            log.info("nbd listening", extra={"address": key, "exports": sorted(exports.exports)})

    async def _stop_exports(self) -> None:
        for server in self.nbd_servers:
            await server.stop()
        for v in self.volumes.values():
            ex = v.export
            if ex is None or ex.fd < 0:
                continue
            await ex.flush()
            clean = ex.protected and v.onboard_state == "done"
            await asyncio.to_thread(ex.close)
            if clean:
                await asyncio.to_thread(CleanMarker(v.group.path, ex.name).write, ex.image)

    def _open_journals(self) -> None:
        root = os.path.join(str(self.config.daemon.state_dir), "groups")
        os.makedirs(root, mode=0o750, exist_ok=True)
        by_group: dict[str, list[VolumeConfig]] = {}
        for v in self.config.volumes:
            by_group.setdefault(v.group, []).append(v)
        try:
            for name, vols in sorted(by_group.items()):
                gpath = os.path.join(root, name)
                j = Journal.open(gpath, clock=self.clock, options=self.journal_options)
                g = Group(name, j, vols, gpath)
                self.groups[name] = g
                if j.recovery.truncated_segment:
                    log.warning(
                        "journal tail was torn and truncated",
                        extra={
                            "group": name,
                            "segment": j.recovery.truncated_segment,
                            "offset": j.recovery.truncated_at,
                            "bytes": j.recovery.truncated_bytes,
                        },
                    )
                for v in vols:
                    if j.volumes.get(v.name) is None or j.volumes[v.name].size != v.size_bytes:
                        j.add_volume(v.name, v.size_bytes)
                    self.volumes[v.name] = VolumeRuntime(v, g)
                j.sync()
        except BaseException:
            self._close_journals()
            raise

    @staticmethod
    def _close_retired(g: Group) -> None:
        for old in g.retired:
            with contextlib.suppress(Exception):  # it failed already; only free its files
                old.close()
        g.retired.clear()

    def _close_journals(self) -> None:
        for g in self.groups.values():
            self._close_retired(g)
            try:
                g.journal.close()
            except Exception:
                log.exception("closing journal failed", extra={"group": g.name})

    # ------------------------------------------------------------------ jobs
    async def _snapshots(self, g: Group, stop: asyncio.Event) -> None:
        """The snapshot schedule and its retention plan, every ``snapshot_interval_s``."""
        grid = self.config.retention.snapshots
        if not grid_enabled(grid):
            return
        while not stop.is_set():
            try:
                await asyncio.to_thread(snapshot_round, g.journal, grid, self.clock(), g.name)
            except Exception as e:  # a failed round is retried; capture goes on
                log.error("snapshot schedule failed", extra={"group": g.name, "err": str(e)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.snapshot_interval_s)

    async def _detect(self, g: Group, stop: asyncio.Event) -> None:
        """Score the group's writes in the corruption detector's own process
        (cdp/daemon/detect.py): off the acknowledgement path and off the daemon's GIL."""
        ds = self.config.detector
        excluded = frozenset(v.name for v in g.volumes if not v.detect)
        if not ds.enabled or len(excluded) == len(g.volumes):
            return
        setup = DetectorSetup(
            DetectorConfig.for_sensitivity(ds.sensitivity), excluded,
            self.journal_options.chunk_size, ds.lock_ns, self.clock,
        )  # fmt: skip
        await run_detector(g, setup, stop)

    async def _sealer(self, g: Group, stop: asyncio.Event) -> None:
        """Move data of rolled segments into the block store, off the write path.

        Production first: hashing and compressing compete with the guest for the CPU (and
        the GIL), so while guests are writing the sealer waits until SEAL_BACKLOG segments
        are pending; it catches up as soon as they pause. Hot segments are complete and
        durable, so waiting only costs disk space, bounded by the backlog.
        """
        writes = self._guest_writes(g)
        while not stop.is_set():
            backlog = g.journal.unsealed_segments
            now = self._guest_writes(g)
            busy, writes = now != writes, now
            if backlog and busy and backlog < SEAL_BACKLOG:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await stop.wait()
                continue
            try:
                n = await asyncio.to_thread(g.journal.seal_pending, 1)
                g.last_sealer_error = None
            except Exception as e:  # keep capturing; status shows it, repair may reopen
                n = 0
                g.last_sealer_error = str(e)
                log.error("sealing failed", extra={"group": g.name, "err": str(e)})
            if n:
                continue
            g.sealer_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await _first(stop.wait(), g.sealer_wakeup.wait())

    def _activity(self) -> int:
        """Grows with every record appended and every guest read (for ``GcPolicy``)."""
        appended = sum(int(g.journal.next_seq) for g in self.groups.values())
        return appended + sum(v.export.stats.reads for v in self.volumes.values() if v.export)

    def _guest_writes(self, g: Group) -> int:
        return sum(
            v.export.stats.writes for v in self.volumes.values() if v.group is g and v.export
        )

    async def _retention(self, g: Group, stop: asyncio.Event) -> None:
        ret = self.config.retention
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.retention_interval_s):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                rep = await asyncio.to_thread(
                    g.journal.apply_retention,
                    keep_ns=ret.journal_window_ns,
                    max_bytes=ret.journal_max_bytes,
                )
                g.last_retention_error = None
                if rep.folded_segments:
                    log.info(
                        "retention folded history",
                        extra={
                            "group": g.name,
                            "segments": rep.folded_segments,
                            "base_seq": rep.base_seq,
                        },
                    )
                for h in rep.released_holds:
                    log.warning(
                        "journal size cap released a replica hold",
                        extra={"group": g.name, "peer": h.name, "seq": h.seq},
                    )
            except Exception as e:  # keep capturing; status shows the error
                g.last_retention_error = str(e)
                log.exception("retention failed", extra={"group": g.name})

    async def _capture(self, v: VolumeRuntime, stop: asyncio.Event) -> None:
        src = v.config.source
        if v.export is not None:
            await self._onboard_nbd(v, stop)
            return
        path: str | None = None
        if isinstance(src, ScanSource):
            path, interval, rate = str(src.path), src.poll_interval_ns / 1e9, src.scan_rate_bps
        else:
            interval, rate = 0.0, 0
        if path is None:
            v.capture_state = "unavailable"
            v.capture_detail = f"source {src.kind!r} has no capture implementation yet"
            log.warning(
                "no capture for this source yet",
                extra={"volume": v.config.name, "source": src.kind},
            )
            return
        scanner = HashScanner(
            v.group.journal,
            v.config.name,
            path,
            chunk_size=self.journal_options.chunk_size,
            rate_bps=rate,
        )
        v.scanner = scanner
        first = True
        done = await asyncio.to_thread(
            v.group.journal.find_checkpoint, f"onboarded:{v.config.name}"
        )
        if done is not None:  # onboarded by an earlier run: the first pass only catches up
            scanner.progress.first_point_seq, first = done.seq, False
        while not stop.is_set():
            v.capture_state = "onboarding" if first else "scanning"
            try:
                changed = await asyncio.to_thread(scanner.scan_once, self._stop_threads)
            except OSError as e:
                v.capture_state, v.capture_detail = "error", f"{path}: {e.strerror or e}"
                log.error("scan failed", extra={"volume": v.config.name, "err": str(e)})
            else:
                if stop.is_set():
                    return
                if first:
                    seq = await asyncio.to_thread(
                        v.group.journal.checkpoint,
                        f"onboarded:{v.config.name}",
                        CheckpointKind.CRASH,
                    )
                    await asyncio.to_thread(v.group.journal.sync)
                    scanner.progress.first_point_seq = seq
                    log.info(
                        "volume onboarded",
                        extra={"volume": v.config.name, "seq": seq, "bytes": changed},
                    )
                    first = False
                v.capture_detail = ""
                if changed:
                    v.group.sealer_wakeup.set()
                v.capture_state = "idle"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(interval, 0.05)):
                    await stop.wait()

    async def _onboard_nbd(self, v: VolumeRuntime, stop: asyncio.Event) -> None:
        """The image as found becomes the first point; skipped after a clean shutdown."""
        ex = v.export
        assert ex is not None
        g = v.group
        v.capture_state = "serving"
        marker = CleanMarker(g.path, ex.name)
        if await asyncio.to_thread(marker.matches, ex.image):
            v.onboard_state = "done"
            cp = g.journal.find_checkpoint(f"onboarded:{ex.name}")
            v.first_point_seq = int(cp.seq) if cp is not None else None
            await asyncio.to_thread(marker.remove)
            return
        await asyncio.to_thread(marker.remove)
        v.onboard_state = "scanning"
        rate = 256 * 1024 * 1024
        try:
            seq = await onboard_export(ex, lambda: g.journal, rate, stop, v)
        except Exception as e:
            v.onboard_state = "error"
            v.capture_detail = f"onboarding failed: {e}"
            log.error("onboarding failed", extra={"volume": ex.name, "err": str(e)})
            return
        if seq is not None:
            v.onboard_state, v.first_point_seq = "done", seq
            g.sealer_wakeup.set()
            log.info("volume onboarded", extra={"volume": ex.name, "seq": seq})

    async def _repair(self, g: Group, stop: asyncio.Event) -> None:
        """Bring protection back after a journal failure: reopen it, capture missed chunks."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await stop.wait()
            if g.retired:
                await asyncio.to_thread(self._close_retired, g)
            broken = [
                v.export
                for v in self.volumes.values()
                if v.group is g and v.export is not None and not v.export.protected
            ]
            if stop.is_set() or not broken:
                continue
            try:
                if not g.journal.healthy:
                    await asyncio.to_thread(self._reopen, g)
                for ex in broken:  # on the loop thread, in steps: guest I/O goes on between
                    done = ex.repair_step(g.journal)
                    while done is None:
                        await asyncio.sleep(0)  # yield to the guests' requests, then go on
                        done = ex.repair_step(g.journal)
                await asyncio.to_thread(g.journal.sync)
            except Exception as e:  # still failing (e.g. the disk is still full)
                log.warning("protection still broken", extra={"group": g.name, "err": str(e)})

    def _reopen(self, g: Group) -> None:
        """Open a fresh journal, then swap it in: status never sees a closed one.

        If the open fails, the failed journal stays in place (still readable for status)
        and the next repair round tries again.
        """
        new = Journal.open(g.path, clock=self.clock, options=self.journal_options)
        self._close_retired(g)
        # The failed journal is closed one repair round later, not now: a status or API
        # call in another thread may still hold it for a moment.
        g.retired.append(g.journal)
        g.journal = new
        g.reopens += 1
        log.warning(
            "journal reopened after a failure",
            extra={"group": g.name, "truncated": g.journal.recovery.truncated_bytes},
        )

    # ------------------------------------------------------------------ queries
    def group_of(self, volume: str) -> Group:
        v = self.volumes.get(volume)
        if v is None:
            raise KeyError(volume)
        return v.group

    def _nbd_status(self, v: VolumeRuntime) -> dict[str, object]:
        ex = v.export
        assert ex is not None
        st = ex.stats
        return {
            "name": v.config.name,
            "group": v.group.name,
            "size": v.config.size_bytes,
            "source": "nbd",
            "capture": {
                "state": v.capture_state,
                "detail": v.capture_detail,
                "connections": len(ex.connections),
                "writes": st.writes,
                "bytes_written": st.bytes_written,
                "flushes": st.flushes,
                "protection": "ok" if ex.protected else "broken",
                "dirty_chunks": len(ex.dirty),
                "gaps": [
                    {
                        "started_ns": gp.started_ns,
                        "ended_ns": gp.ended_ns,
                        "resumed_seq": gp.resumed_seq,
                        "reason": gp.reason,
                    }
                    for gp in ex.gaps
                ],
            },
            "onboarding": {
                "state": v.onboard_state,
                "scanned_bytes": v.onboard_scanned,
                "total_bytes": v.config.size_bytes,
                "first_point_seq": v.first_point_seq,
            },
        }

    def status(self) -> dict[str, object]:
        groups = []
        alerts: list[str] = []
        for g in self.groups.values():
            st = g.journal.status()
            galerts = list(st.alerts)
            if g.last_retention_error:
                galerts.append(f"retention failed: {g.last_retention_error}")
            alerts += [f"{g.name}: {a}" for a in galerts]
            for q in g.quarantines:
                d = q.detection
                point = f"snapshot:{q.snapshot}" if q.snapshot else f"seq:{d.last_clean_seq}"
                galerts.append(
                    f"possible ransomware on {', '.join(d.volumes)}: "
                    f"{d.suspicious_bytes} bytes of in-place high-entropy overwrites from seq "
                    f"{d.first_seq}; last clean point {point} (seq {d.last_clean_seq}, locked)"
                )
                alerts.append(f"{g.name}: {galerts[-1]}")
            reps = [s.status() for (gn, _), s in self.senders.items() if gn == g.name]
            for r in reps:
                alerts += replica_alerts(g.name, r)
            doc = journal_doc(g.name, [v.name for v in g.volumes], st)
            doc["replicas"] = reps
            doc["detector"] = (
                None
                if g.detector is None
                else {
                    "sampled": g.detector.sampled,
                    "sampled_bytes": g.detector.sampled_bytes,
                    "scored_seq": g.detector.scored_seq,
                    "dropped_batches": g.detector.dropped,
                    "restarts": g.detector.restarts,
                    "alarms": len(g.quarantines),
                }
            )
            doc["alerts"] = galerts
            groups.append(doc)
        volumes = []
        for v in self.volumes.values():
            if v.export is not None:
                volumes.append(self._nbd_status(v))
                ex = v.export
                if not ex.protected:
                    alerts.append(
                        f"{v.config.name}: protection broken since {ex.gaps[-1].started_ns}: "
                        f"{ex.gaps[-1].reason}; {len(ex.dirty)} chunks to capture"
                    )
                continue
            p = v.scanner.progress if v.scanner else None
            if v.capture_state == "error":
                alerts.append(f"{v.config.name}: capture error: {v.capture_detail}")
            volumes.append(
                {
                    "name": v.config.name,
                    "group": v.group.name,
                    "size": v.config.size_bytes,
                    "source": v.config.source.kind,
                    "capture": {
                        "state": v.capture_state,
                        "detail": v.capture_detail,
                        "last_scan_ns": p.last_scan_ns if p else 0,
                        "changed_bytes": p.changed_bytes if p else 0,
                    },
                    "onboarding": {
                        "state": "done"
                        if p and p.first_point_seq
                        else ("scanning" if p else "none"),
                        "scanned_bytes": p.scanned_bytes if p else 0,
                        "total_bytes": p.total_bytes if p else 0,
                        "first_point_seq": p.first_point_seq if p else None,
                    },
                }
            )
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": VERSION,
                "started_ns": self.started_ns,
                "gc": None if self.gc_policy is None else self.gc_policy.status(),
            },
            "groups": groups,
            "volumes": volumes,
            "alerts": alerts,
        }


def _journal_of(g: Group) -> Callable[[], Journal]:
    """The group's current journal (it is replaced when reopened after a failure)."""
    return lambda: g.journal


async def _first(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def run_daemon(
    config: Config, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> int:
    """Entry point for ``cdp daemon``: signals set the stop event; returns the exit code."""
    return run_until_signal(
        config, lambda stop: Daemon(config, gc_policy=GcPolicy()).run(stop), loop_factory
    )


def run_until_signal(
    config: Config,
    serve: Callable[[asyncio.Event], Awaitable[None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Run a service on the configured event loop until SIGTERM or SIGINT (both sites)."""
    if loop_factory is None and config.daemon.event_loop == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # uvloop is optional at run time
            loop_factory = None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    t0 = time.monotonic()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    log.info("exiting", extra={"uptime_s": round(time.monotonic() - t0, 3)})
    return 0
