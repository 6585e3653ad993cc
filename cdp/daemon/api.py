"""The control API (docs/design/api.md): aiohttp on a unix socket or a loopback port.

Handlers validate their input and answer ``{"error", "hint"}`` with a status the CLI maps to
an exit code; journal work runs in threads so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import ClientConnectionResetError, web

from cdp.daemon.site import Site, SiteGroup
from cdp.sockpath import prepare_socket_path, remove_socket
from cdp.units import Address
from journal import (
    CheckpointKind,
    Journal,
    JournalError,
    NoSuchSnapshot,
    PointNotRetained,
    Snapshot,
    SnapshotLocked,
)

log = logging.getLogger(__name__)

DAEMON_KEY = web.AppKey("daemon", Site)
STREAM_CHUNK = 1 << 20
# Name prefix of the export holds image downloads take; holds are saved with the journal,
# so a daemon killed mid-download leaves one behind, which ApiServer.start releases.
IMAGE_HOLD_PREFIX = "api-image:"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.extra = status, message, hint, extra


def _reply(status: int, doc: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc), content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        doc: dict[str, Any] = {"error": e.message, **e.extra}
        if e.hint:
            doc["hint"] = e.hint
        return _reply(e.status, doc)
    except PointNotRetained as e:
        return _reply(
            409,
            {
                "error": str(e),
                "hint": e.hint,
                "window": {
                    "first_seq": e.first_seq,
                    "last_seq": e.last_seq,
                    "first_ts_ns": e.first_ts,
                    "last_ts_ns": e.last_ts,
                },
            },
        )
    except NoSuchSnapshot as e:
        return _reply(404, {"error": str(e), "hint": e.hint})
    except SnapshotLocked as e:  # the journal refuses it, whoever asks
        return _reply(409, {"error": str(e), "hint": e.hint, "locked_until_ns": e.until_ns})
    except JournalError as e:
        log.error("request failed", extra={"path": request.path, "err": str(e)})
        return _reply(500, {"error": str(e), **({"hint": e.hint} if e.hint else {})})
    except web.HTTPException:
        raise
    except Exception as e:  # never take the daemon down for one request
        log.exception("request crashed", extra={"path": request.path})
        return _reply(500, {"error": f"internal error: {type(e).__name__}: {e}"})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object")
    return doc


def _str(doc: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    v = doc.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"{key}: expected a non-empty string")
    return v


def _target(d: Site, doc: dict[str, Any]) -> SiteGroup:
    vol, grp = doc.get("volume"), doc.get("group")
    if (vol is None) == (grp is None):
        raise ApiError(400, "name exactly one of volume or group")
    if vol is not None:
        name = _str(doc, "volume")
        assert name is not None
        if name not in d.volumes:
            raise ApiError(404, f"no volume named {name!r}", hint="see `cdp status`")
        return d.volumes[name].group
    name = _str(doc, "group")
    assert name is not None
    if name not in d.groups:
        raise ApiError(404, f"no group named {name!r}", hint="see `cdp status`")
    return d.groups[name]


def resolve_when(g: SiteGroup, when: object) -> int:
    """Map a ``when`` object (docs/design/api.md) to a seq of the group's journal.

    A seq inside a resync at the DR site is refused: it is a mix of two points (half
    shipped), never a recovery point.
    """
    seq = _resolve_when(g, when)
    why = g.not_a_point(seq)
    if why is not None:
        raise ApiError(409, f"seq {seq} is not a recovery point: {why}")
    return seq


def _resolve_when(g: SiteGroup, when: object) -> int:
    if not isinstance(when, dict):
        raise ApiError(400, "when: expected an object with a kind")
    kind = when.get("kind")
    j = g.journal
    if kind == "latest":
        return int(j.window().last_seq)
    if kind == "seq":
        seq = when.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ApiError(400, "when.seq: expected a non-negative integer")
        w = j.window()
        if not w.first_seq <= seq <= w.last_seq:
            raise PointNotRetained(f"seq {seq}", w.first_seq, w.last_seq, w.first_ts, w.last_ts)
        return seq
    if kind == "time":
        t = when.get("t_ns")
        if not isinstance(t, int) or isinstance(t, bool):
            raise ApiError(400, "when.t_ns: expected an integer")
        return int(j.seq_at_time(t))
    if kind == "checkpoint":
        name = when.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "when.name: expected a checkpoint name")
        cp = j.find_checkpoint(name)
        if cp is None:
            raise ApiError(
                404,
                f"no retained checkpoint named {name!r}",
                hint="list them with `cdp status --json`",
            )
        return int(cp.seq)
    if kind == "snapshot":
        sid = when.get("id")
        if not isinstance(sid, str) or not sid:
            raise ApiError(400, "when.id: expected a snapshot id")
        try:
            return int(j.find_snapshot(sid).seq)
        except NoSuchSnapshot as e:
            raise ApiError(404, str(e), hint="list them with `cdp snapshot list VOLUME`") from e
    raise ApiError(400, f"when.kind: unknown kind {kind!r}")


async def status(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    return _reply(200, await asyncio.to_thread(d.status))


async def checkpoint(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    g = _target(d, doc)
    if d.read_only:
        raise ApiError(
            409,
            "this is a DR site: its journals are written by replication only",
            hint="take the checkpoint on the primary; it replicates here",
        )
    name = _str(doc, "name", required=False) or f"cp-{d.clock() // 10**9}"
    if len(name) > 200:
        raise ApiError(400, "name: at most 200 characters")
    want_consistent = doc.get("consistent", False)
    if not isinstance(want_consistent, bool):
        raise ApiError(400, "consistent: expected true or false")
    if want_consistent and "kind" in doc:
        raise ApiError(400, "kind: not with consistent (the freeze decides: app, else crash)")
    kind_s = doc.get("kind", "crash")
    try:
        kind = CheckpointKind(kind_s)
    except ValueError as e:
        raise ApiError(
            400, f"kind: expected one of crash, app, user, anomaly (got {kind_s!r})"
        ) from e

    def do(kind: CheckpointKind) -> tuple[int, int]:
        seq = g.journal.checkpoint(name, kind)
        g.journal.sync()
        cp = g.journal.find_checkpoint(name)
        return seq, cp.ts if cp else 0

    extra: dict[str, Any] = {}
    if want_consistent:  # issue 6: [hooks] pre_freeze, checkpoint, post_thaw (always)
        from cdp.daemon import hooks

        hooks_config = getattr(getattr(d, "config", None), "hooks", None)
        if hooks_config is None:
            raise ApiError(
                409,
                "the daemon's config has no [hooks] table, so it cannot freeze the guest",
                hint="add [hooks] pre_freeze and post_thaw (docs/config.md), restart the daemon",
            )
        members = {n: v for n, v in d.volumes.items() if v.group is g}
        env = hooks.hook_env(g.name, list(members), name)

        async def take(k: CheckpointKind) -> tuple[int, int]:
            return await asyncio.to_thread(do, k)

        async with hooks.group_lock(g.name):
            res = await hooks.consistent(
                take,
                hooks_config,
                env,
                catch_up=lambda timeout_s: hooks.scans_caught_up(members, timeout_s),
            )
        (seq, ts), kind = res.value, res.kind
        extra = {"consistent": res.consistent}
        if res.reason is not None:
            extra["reason"] = res.reason
        if not res.thaw.ok:
            extra["thaw_error"] = res.thaw.reason
    else:
        seq, ts = await asyncio.to_thread(do, kind)
    log.info(
        "checkpoint",
        extra={"group": g.name, "seq": seq, "checkpoint": name, "kind": str(kind), **extra},
    )
    return _reply(
        200,
        {"group": g.name, "seq": seq, "ts_ns": ts, "name": name, "kind": str(kind), **extra},
    )


async def resolve(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    if "volume" not in doc:
        raise ApiError(400, "volume: required")
    g = _target(d, {"volume": doc["volume"]})
    seq = await asyncio.to_thread(resolve_when, g, doc.get("when"))
    vol = doc["volume"]
    snap = _materialized_at(g.journal, seq)
    if snap is not None:  # a snapshot older than the journal window
        ts, size = snap.ts, g.journal.snapshot_volume_size(snap.name, vol)
    else:
        ts, size = await asyncio.to_thread(_ts_of, g, seq), g.journal.volume_size(vol)
    doc_out: dict[str, Any] = {
        "group": g.name,
        "volume": vol,
        "seq": seq,
        "ts_ns": ts,
        "size": size,
    }
    if snap is not None:
        doc_out["snapshot"] = snap.name
    return _reply(200, doc_out)


def _materialized_at(j: Journal, seq: int) -> Snapshot | None:
    """The snapshot that alone still holds ``seq`` (folded out of the journal window)."""
    if seq >= j.window().first_seq:
        return None
    return next((s for s in j.snapshots() if s.seq == seq and s.materialized), None)


def _ts_of(g: SiteGroup, seq: int) -> int:
    return g.journal.ts_of(seq)


async def image(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    vol = request.match_info["name"]
    if vol not in d.volumes:
        raise ApiError(404, f"no volume named {vol!r}")
    g = d.volumes[vol].group
    try:
        seq = int(request.query.get("seq", ""))
    except ValueError as e:
        raise ApiError(400, "seq: expected an integer query parameter") from e
    j = g.journal
    snap = _materialized_at(j, seq)
    if snap is not None:
        return await _snapshot_image(request, j, snap, vol)
    resolve_when(g, {"kind": "seq", "seq": seq})
    size = j.volume_size(vol)
    hold = f"{IMAGE_HOLD_PREFIX}{vol}:{id(request)}"
    await asyncio.to_thread(j.set_hold, "export", hold, seq)  # retention must not fold it away
    try:
        resp = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "X-Cdp-Seq": str(seq)}
        )
        resp.content_length = size
        await resp.prepare(request)
        cache = j.new_cache()
        try:
            for off in range(0, size, STREAM_CHUNK):
                n = min(STREAM_CHUNK, size - off)
                buf = bytearray(n)
                await asyncio.to_thread(j.read_into, vol, off, memoryview(buf), seq, cache)
                await resp.write(bytes(buf))
            await resp.write_eof()
        except (ConnectionResetError, ClientConnectionResetError):
            log.info("image download abandoned by the reader", extra={"volume": vol, "seq": seq})
        return resp
    finally:
        await asyncio.to_thread(j.release_hold, "export", hold)


async def _snapshot_image(
    request: web.Request, j: Journal, snap: Snapshot, vol: str
) -> web.StreamResponse:
    """Stream a volume from a snapshot's manifest (its blocks stay live while it exists)."""
    size = j.snapshot_volume_size(snap.name, vol)
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Cdp-Seq": str(snap.seq)}
    )
    resp.content_length = size
    await resp.prepare(request)
    cache = j.new_cache()
    try:
        for off in range(0, size, STREAM_CHUNK):
            n = min(STREAM_CHUNK, size - off)
            buf = bytearray(n)
            await asyncio.to_thread(
                j.read_snapshot_into, snap.name, vol, off, memoryview(buf), cache
            )
            await resp.write(bytes(buf))
        await resp.write_eof()
    except (ConnectionResetError, ClientConnectionResetError):
        log.info("image download abandoned by the reader", extra={"volume": vol})
    return resp


async def rebuild_index(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    g = _target(d, await _body(request))
    await asyncio.to_thread(g.journal.rebuild_index)
    dump = await asyncio.to_thread(g.journal.index.dump)
    log.info("index rebuilt", extra={"group": g.name})
    return _reply(
        200, {"group": g.name, "segments": len(dump["segments"]), "blocks": len(dump["blocks"])}
    )


async def verify_replica(request: web.Request) -> web.Response:
    """Compare a replica's latest with this site's journal at the same seq (digests only)."""
    from replicator.sender import verify_replica as verify

    d = request.app[DAEMON_KEY]
    doc = await _body(request)
    vol = _str(doc, "volume")
    name = _str(doc, "replica")
    assert vol is not None and name is not None
    g = _target(d, {"volume": vol})
    senders = getattr(d, "senders", {})
    snd = senders.get((g.name, name))
    if snd is None:
        known = sorted({r for (_, r) in senders}) or ["none"]
        raise ApiError(404, f"no replica named {name!r}", hint=f"replicas: {', '.join(known)}")
    try:
        rep = await verify(snd.target, g.name, g.journal, vol)
    except (OSError, TimeoutError) as e:
        raise ApiError(503, f"replica {name} unreachable: {e}") from e
    except Exception as e:
        from replicator.sender import SenderStopped

        if isinstance(e, SenderStopped):
            raise ApiError(502, f"replica {name} refused: {e}") from e
        raise
    log.info(
        "replica verified",
        extra={"volume": vol, "replica": name, "seq": rep.seq, "mismatched": len(rep.mismatched)},
    )
    return _reply(
        200,
        {
            "volume": vol,
            "replica": name,
            "seq": rep.seq,
            "chunks": rep.chunks,
            "chunk_size": rep.chunk_size,
            "mismatched_chunks": list(rep.mismatched[:1000]),
            "mismatched": len(rep.mismatched),
            "ok": rep.ok,
        },
    )


def make_app(daemon: Site) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=1 << 20)
    app[DAEMON_KEY] = daemon
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/checkpoint", checkpoint)
    app.router.add_post("/v1/resolve", resolve)
    app.router.add_get("/v1/volumes/{name}/image", image)
    app.router.add_post("/v1/journal/rebuild-index", rebuild_index)
    app.router.add_post("/v1/replica/verify", verify_replica)
    from cdp.daemon import api_recover

    api_recover.add_routes(app)
    return app


def release_stale_image_holds(daemon: Site) -> None:
    """Drop image-download holds left by an earlier process: no download outlives its daemon.

    Otherwise such a hold pins history for good: retention never folds past a hold, and the
    size cap releases only replica holds.
    """
    for g in daemon.groups.values():
        for kind, name in list(g.journal.holds):
            if kind == "export" and name.startswith((IMAGE_HOLD_PREFIX, "point-export:")):
                g.journal.release_hold(kind, name)
                log.warning("released a stale image hold", extra={"group": g.name, "hold": name})


class ApiServer:
    def __init__(self, daemon: Site, address: Address) -> None:
        self.address = address
        self.daemon = daemon
        self.runner = web.AppRunner(make_app(daemon), access_log=None)

    async def start(self) -> None:
        from cdp.daemon.api_recover import cleanup_stale_exports

        await asyncio.to_thread(release_stale_image_holds, self.daemon)
        await asyncio.to_thread(cleanup_stale_exports, self.daemon)
        await self.runner.setup()
        a = self.address
        if a.kind == "unix":
            assert a.path is not None
            prepare_socket_path(a.path)
            site: web.BaseSite = web.UnixSite(self.runner, a.path)
            await site.start()
            os.chmod(a.path, 0o660)
        else:
            if not a.is_loopback():
                raise ValueError(f"the API listens on loopback only (got {a})")
            assert a.host is not None and a.port is not None
            site = web.TCPSite(self.runner, a.host, a.port)
            await site.start()
        log.info("api listening", extra={"address": str(a)})

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.address.kind == "unix" and self.address.path:
            remove_socket(self.address.path)
