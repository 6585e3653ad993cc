"""Recovery endpoints of the control API: snapshots (and, with them, their locks and plan).

Kept apart from ``api.py`` so each file reads as one concern; the routes are added by
``api.make_app``. A snapshot belongs to a consistency group (it names one seq of the group's
journal), so the requests name a volume or a group like the checkpoint request does.
Locks are enforced by the journal itself (``Journal.delete_snapshot``), so no path here, or
anywhere else, can delete a locked snapshot early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientConnectionResetError, web

from cdp.daemon.api import DAEMON_KEY, ApiError, _body, _reply, _str, _target, resolve_when
from cdp.daemon.rollback import apply_volume, mark, plan
from cdp.daemon.site import SiteGroup
from cdp.nbd.export import Export, ExportSet
from cdp.nbd.point import PointExport
from cdp.nbd.server import NbdServer
from cdp.snapshot_plan import SnapshotInfo, plan_retention
from cdp.units import Address, parse_address
from journal import Journal, JournalError, Snapshot, SnapshotLocked

log = logging.getLogger(__name__)


def snapshot_doc(group: str, s: Snapshot) -> dict[str, Any]:
    return {
        "group": group,
        "name": s.name,
        "seq": s.seq,
        "ts_ns": s.ts,
        "created_ns": s.created_ts,
        "locked_until_ns": s.locked_until,
        "kind": s.kind,
        "materialized": s.materialized,
    }


def _int(doc: dict[str, Any], key: str, *, required: bool = False) -> int | None:
    v = doc.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
        raise ApiError(400, f"{key}: expected a non-negative integer below 2**62")
    return v


def _flag(doc: dict[str, Any], key: str) -> bool:
    v = doc.get(key, False)
    if not isinstance(v, bool):
        raise ApiError(400, f"{key}: expected true or false")
    return v


async def list_snapshots(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    q = {k: v for k, v in request.query.items() if k in ("volume", "group")}
    groups = [_target(d, q)] if q else list(d.groups.values())
    out = [snapshot_doc(g.name, s) for g in groups for s in g.journal.snapshots()]
    return _reply(200, {"snapshots": out})


async def create_snapshot(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    seq = None
    if doc.get("when") is not None:
        seq = await asyncio.to_thread(resolve_when, g, doc["when"])
    now = d.clock()
    name = _str(doc, "name", required=False) or f"snap-{now // 10**9}"
    lock_for = _int(doc, "lock_ns")
    until = now + lock_for if lock_for else 0
    try:
        s = await asyncio.to_thread(
            g.journal.create_snapshot, name, seq, kind="manual", locked_until=until
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    log.info("snapshot created", extra={"group": g.name, "snapshot": name, "seq": s.seq})
    return _reply(200, snapshot_doc(g.name, s))


async def delete_snapshot(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    name = _str(doc, "name")
    assert name is not None
    await asyncio.to_thread(g.journal.delete_snapshot, name)
    log.info("snapshot deleted", extra={"group": g.name, "snapshot": name})
    return _reply(200, {"group": g.name, "name": name, "deleted": True})


async def lock_snapshot(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    name = _str(doc, "name")
    assert name is not None
    until = _int(doc, "until_ns")
    lock_for = _int(doc, "lock_ns")
    if (until is None) == (lock_for is None):
        raise ApiError(400, "name exactly one of until_ns or lock_ns")
    until = until if until is not None else d.clock() + (lock_for or 0)
    try:
        s = await asyncio.to_thread(g.journal.lock_snapshot, name, until)
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    log.info("snapshot locked", extra={"group": g.name, "snapshot": name, "until": s.locked_until})
    return _reply(200, snapshot_doc(g.name, s))


async def prune_snapshots(request: web.Request) -> web.Response:
    """Apply the retention plan (``dry_run``: only show it). Locked snapshots always stay."""
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    dry = _flag(doc, "dry_run")
    grid = d.config.retention.snapshots
    now = d.clock()
    snaps = g.journal.snapshots()
    plan = plan_retention(
        [SnapshotInfo(s.name, s.created_ts, s.kind, s.locked_until) for s in snaps], grid, now
    )
    deleted, refused = [], []
    if not dry:
        for name in plan.deletes():
            try:
                await asyncio.to_thread(g.journal.delete_snapshot, name, now_ns=now)
                deleted.append(name)
            except SnapshotLocked:
                refused.append(name)  # never: the plan keeps locked ones; the journal agrees
    return _reply(
        200,
        {
            "group": g.name,
            "dry_run": dry,
            "plan": [
                {"name": e.name, "action": e.action, "reason": e.reason} for e in plan.entries
            ],
            "deleted": deleted,
            "refused": refused,
        },
    )


def _beyond_window(j: Journal, when: object) -> str | None:
    """The snapshot named by ``when`` if only its manifest still holds it (else None)."""
    if isinstance(when, dict) and when.get("kind") == "snapshot":
        s = j.find_snapshot(str(when.get("id")))
        return s.name if s.materialized else None
    return None


def _nearest(j: Journal, seq: int) -> dict[str, Any]:
    """The checkpoints and snapshots just before and after a point, to check the choice."""
    cps = j.checkpoints()
    snaps = j.snapshots()

    def cp(c: Any) -> dict[str, Any] | None:
        return (
            None
            if c is None
            else {"name": c.name, "seq": c.seq, "ts_ns": c.ts, "kind": str(c.kind)}
        )

    def sp(s: Any) -> dict[str, Any] | None:
        return None if s is None else {"name": s.name, "seq": s.seq, "ts_ns": s.ts}

    return {
        "checkpoint_before": cp(next((c for c in reversed(cps) if c.seq <= seq), None)),
        "checkpoint_after": cp(next((c for c in cps if c.seq > seq), None)),
        "snapshot_before": sp(next((x for x in reversed(snaps) if x.seq <= seq), None)),
        "snapshot_after": sp(next((x for x in snaps if x.seq > seq), None)),
    }


async def rollback(request: web.Request) -> web.Response:
    """Revert the live volumes of a group to a point (``dry_run``: only say what it would do)."""
    from cdp.daemon.service import Daemon

    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    if not isinstance(d, Daemon):
        raise ApiError(
            409,
            "the DR site has no live volume to roll back",
            hint="restore or export the point here (cdp restore / cdp export), or fail over",
        )
    when = doc.get("when")
    seq = await asyncio.to_thread(resolve_when, g, when)
    j = g.journal
    snapshot = _beyond_window(j, when)
    vols = [v for v in d.volumes.values() if v.group is g]
    not_nbd = [v.config.name for v in vols if v.export is None]
    if not_nbd:
        raise ApiError(
            409,
            f'rollback needs volumes served by cdp (source = "nbd"): {", ".join(not_nbd)}',
            hint="restore the point to a file instead (cdp restore)",
        )
    p = await asyncio.to_thread(plan, j, g.name, [v.config.name for v in vols], seq, snapshot)
    connected = {v.config.name: len(v.export.connections) for v in vols if v.export is not None}
    out: dict[str, Any] = {**p.doc(), "connected": connected, "nearest": _nearest(j, seq)}
    if _flag(doc, "dry_run"):
        return _reply(200, {**out, "dry_run": True})
    busy = {k: n for k, n in connected.items() if n}
    if busy and not _flag(doc, "force"):
        raise ApiError(
            409,
            "NBD clients are connected to "
            + ", ".join(f"{k} ({n})" for k, n in busy.items())
            + ": rolling a disk back under a running guest corrupts it",
            hint="shut the VM down first, or --force to disconnect it (then restart the VM)",
        )
    hidden: list[tuple[Any, str, Export]] = []
    t = d.clock() // 10**6  # ms: two rollbacks in one second get their own checkpoints
    hold = f"point-export:rollback-{t}"
    if snapshot is None:  # retention must not fold the point away while it is read
        await asyncio.to_thread(j.set_hold, "export", hold, seq)
    try:
        for v in vols:
            ex = v.export
            assert ex is not None
            for srv in d.nbd_servers:  # no new client until the rollback is done
                if srv.exports.exports.get(ex.name) is ex:
                    del srv.exports.exports[ex.name]
                    hidden.append((srv.exports, ex.name, ex))
            for c in list(ex.connections):
                c._close()  # type: ignore[attr-defined]
        pre = await asyncio.to_thread(mark, j, f"pre-rollback-{t}")
        for v, vp in zip(vols, p.volumes, strict=True):
            assert v.export is not None
            await asyncio.to_thread(apply_volume, j, p, vp, v.export)
            await v.export.flush()
        post = await asyncio.to_thread(mark, j, f"rolled-back-{t}")
    finally:
        for es, name, ex in hidden:
            es.exports[name] = ex
        if snapshot is None:
            with contextlib.suppress(JournalError):
                await asyncio.to_thread(j.release_hold, "export", hold)
    log.warning(
        "volumes rolled back",
        extra={"group": g.name, "to_seq": seq, "bytes": p.changed_bytes, "pre_seq": pre},
    )
    return _reply(
        200,
        {
            **out,
            "dry_run": False,
            "pre_checkpoint": f"pre-rollback-{t}",
            "pre_seq": pre,
            "post_checkpoint": f"rolled-back-{t}",
            "post_seq": post,
            "disconnected": busy,
        },
    )


@dataclass(slots=True)
class PointExportRun:
    """One ``cdp export``: an NBD listener serving a past point of one or more volumes."""

    id: str
    group: SiteGroup
    seq: int
    snapshot: str | None
    address: Address
    server: NbdServer
    exports: list[PointExport]
    hold: str | None
    writable: bool

    def doc(self) -> dict[str, Any]:
        a = self.address
        uris = {
            e.name: f"nbd+unix:///{e.name}?socket={a.path}"
            if a.kind == "unix"
            else f"nbd://{a.host}:{a.port}/{e.name}"
            for e in self.exports
        }
        return {
            "id": self.id,
            "group": self.group.name,
            "seq": self.seq,
            "snapshot": self.snapshot,
            "listen": str(a),
            "writable": self.writable,
            "uris": uris,
            "connections": sum(len(e.connections) for e in self.exports),
        }


EXPORTS_KEY = web.AppKey("point_exports", dict)


def _exports(request: web.Request) -> dict[str, PointExportRun]:
    runs: dict[str, PointExportRun] = request.app[EXPORTS_KEY]
    return runs


def _export_dir(d: Any) -> str:
    rc = d.config.receiver
    api: Address = rc.api if d.read_only and rc is not None else d.config.daemon.api
    if api.kind == "unix" and api.path:
        return os.path.dirname(os.path.abspath(api.path))
    return str(rc.state_dir if d.read_only and rc is not None else d.config.daemon.state_dir)


def cleanup_stale_exports(d: Any) -> None:
    """Overlays and sockets of exports an earlier process left behind (a crash, kill -9)."""
    folder = _export_dir(d)
    with contextlib.suppress(OSError):
        for n in os.listdir(folder):
            p = os.path.join(folder, n)
            if n.startswith("export-") and n.endswith(".overlay") and os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
                log.warning("removed a stale export overlay", extra={"path": p})
            elif n.startswith("export-") and n.endswith(".sock"):
                with contextlib.suppress(OSError):
                    os.unlink(p)


async def create_export(request: web.Request) -> web.Response:
    """Serve a past point over NBD now (reads from the journal; writes to a throwaway overlay)."""
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    when = doc.get("when")
    seq = await asyncio.to_thread(resolve_when, g, when)
    j = g.journal
    snapshot = _beyond_window(j, when)
    writable = _flag(doc, "writable")
    eid = secrets.token_hex(4)
    listen = doc.get("listen")
    try:
        addr = (
            parse_address(listen)
            if isinstance(listen, str)
            else Address.unix(os.path.join(_export_dir(d), f"export-{eid}.sock"))
        )
    except ValueError as e:
        raise ApiError(400, f"listen: {e}") from e
    if addr.kind == "tcp" and not addr.is_loopback() and not _flag(doc, "public"):
        raise ApiError(
            400, "listen: an export on a non-loopback address serves data unauthenticated",
            hint="use a unix socket or 127.0.0.1 (then ssh -L), or pass --public",
        )  # fmt: skip
    vols = doc.get("volumes")
    names = [str(doc["volume"])] if doc.get("volume") else sorted(j.status().volumes)
    if isinstance(vols, list):
        names = [str(v) for v in vols]
    overlay_dir = os.path.join(_export_dir(d), f"export-{eid}.overlay")
    exports: list[PointExport] = []

    def journal_of() -> Journal:
        return g.journal  # the group's current journal, even if it is reopened meanwhile

    for name in names:
        size = j.snapshot_volume_size(snapshot, name) if snapshot else j.volume_size(name)
        if writable:
            os.makedirs(overlay_dir, mode=0o700, exist_ok=True)
        exports.append(
            PointExport(
                name,
                size,
                journal_of,
                seq=seq,
                snapshot=snapshot,
                overlay=os.path.join(overlay_dir, f"{len(exports)}.overlay"),
                writable=writable,
                chunk_size=j.opts.chunk_size,
            )
        )
    hold = None
    if snapshot is None:
        hold = f"point-export:{eid}"
        await asyncio.to_thread(j.set_hold, "export", hold, seq)  # the point stays readable
    es = ExportSet({x.name: x for x in exports})
    server = NbdServer(es)
    try:
        for x in exports:
            await asyncio.to_thread(x.open)
        if addr.kind == "unix":
            assert addr.path is not None
            await server.start_unix(addr.path)
        else:
            assert addr.host is not None and addr.port is not None
            await server.start_tcp(addr.host, addr.port)
    except OSError as e:
        for x in exports:
            x.close()
        if hold:
            await asyncio.to_thread(j.release_hold, "export", hold)
        raise ApiError(409, f"cannot listen on {addr}: {e.strerror or e}") from e
    run = PointExportRun(eid, g, seq, snapshot, addr, server, exports, hold, writable)
    _exports(request)[eid] = run
    log.info("point exported", extra={**run.doc(), "uris": None})
    return _reply(200, run.doc())


async def stop_export(run: PointExportRun) -> None:
    await run.server.stop()
    for e in run.exports:
        await asyncio.to_thread(e.close)
    if run.exports and run.writable:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(run.exports[0].image))
    if run.hold:
        with contextlib.suppress(JournalError):
            await asyncio.to_thread(run.group.journal.release_hold, "export", run.hold)
    log.info("point export stopped", extra={"id": run.id})


async def delete_export(request: web.Request) -> web.Response:
    run = _exports(request).pop(request.match_info["id"], None)
    if run is None:
        raise ApiError(404, "no such export")
    await stop_export(run)
    return _reply(200, {"id": run.id, "stopped": True})


async def list_exports(request: web.Request) -> web.Response:
    return _reply(200, {"exports": [r.doc() for r in _exports(request).values()]})


async def attach_export(request: web.Request) -> web.StreamResponse:
    """Held open by ``cdp export``: when the command ends (even by kill -9), so does the export."""
    eid = request.match_info["id"]
    if eid not in _exports(request):
        raise ApiError(404, "no such export")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    try:
        while eid in _exports(request):
            await resp.write(b".")
            await asyncio.sleep(1.0)
    except (ConnectionResetError, ClientConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        run = _exports(request).pop(eid, None)
        if run is not None:
            await stop_export(run)
    return resp


async def _close_exports(app: web.Application) -> None:
    for run in list(app[EXPORTS_KEY].values()):
        await stop_export(run)
    app[EXPORTS_KEY].clear()


async def timeline(request: web.Request) -> web.Response:
    """Checkpoints, snapshots, locks, holds, gaps and a write-rate series since a time."""
    d = request.app[DAEMON_KEY]
    vol = request.query.get("volume", "")
    g = _target(d, {"volume": vol})
    try:
        since = int(request.query.get("since_ns", "0"))
        bucket = max(10**9, int(request.query.get("bucket_ns", str(60 * 10**9))))
    except ValueError as e:
        raise ApiError(400, "since_ns, bucket_ns: integers") from e
    j = g.journal
    rate = await asyncio.to_thread(j.write_rate, since, bucket, vol)
    w = j.window()
    gaps: list[dict[str, Any]] = []
    v = d.volumes.get(vol)
    ex = getattr(v, "export", None)
    for gp in getattr(ex, "gaps", []):
        if gp.ended_ns is None or gp.ended_ns >= since:
            gaps.append(
                {
                    "started_ns": gp.started_ns,
                    "ended_ns": gp.ended_ns,
                    "resumed_seq": gp.resumed_seq,
                    "reason": gp.reason,
                }
            )
    cps = [
        {"name": c.name, "seq": c.seq, "ts_ns": c.ts, "kind": str(c.kind)}
        for c in j.checkpoints()
        if c.ts >= since
    ]
    return _reply(
        200,
        {
            "group": g.name,
            "volume": vol,
            "since_ns": since,
            "bucket_ns": bucket,
            "window": {
                "first_seq": w.first_seq,
                "last_seq": w.last_seq,
                "first_ts_ns": w.first_ts,
                "last_ts_ns": w.last_ts,
            },
            "checkpoints": cps,
            "snapshots": [snapshot_doc(g.name, s) for s in j.snapshots()],
            "holds": [{"kind": h.kind, "name": h.name, "seq": h.seq} for h in j.holds.values()],
            "gaps": gaps,
            "rate": [{"start_ns": b, "writes": n, "bytes": nb} for b, n, nb in rate],
            "now_ns": d.clock(),
        },
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/timeline", timeline)
    app[EXPORTS_KEY] = {}
    app.on_cleanup.append(_close_exports)
    app.router.add_post("/v1/exports", create_export)
    app.router.add_get("/v1/exports", list_exports)
    app.router.add_delete("/v1/exports/{id}", delete_export)
    app.router.add_get("/v1/exports/{id}/attach", attach_export)
    app.router.add_post("/v1/rollback", rollback)
    app.router.add_get("/v1/snapshots", list_snapshots)
    app.router.add_post("/v1/snapshots", create_snapshot)
    app.router.add_post("/v1/snapshots/delete", delete_snapshot)
    app.router.add_post("/v1/snapshots/lock", lock_snapshot)
    app.router.add_post("/v1/snapshots/prune", prune_snapshots)
