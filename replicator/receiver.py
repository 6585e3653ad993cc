"""The DR-site receiver: authenticated HTTP endpoints that append to replica journals.

Each consistency group the primary ships becomes a replica journal under
``<state_dir>/groups/<group>/journal`` with the primary's seqs and times, so every point the
primary had (checkpoints, ``seq:N``, times) names the same content here. ``replica.meta``
binds the replica to one primary journal (its uuid), the highest epoch seen and the chunk
size. The protocol is append-only: no endpoint deletes or prunes history; retention at the
DR site is the DR site's own policy.

Acknowledgements are durable: a batch is answered 200 only after its blocks and records are
fsynced. A batch the replica already holds is answered 200 with the durable position
(idempotent: a lost ack never wedges the sender); a gap is 409 with the expected seq; a
stale epoch or another primary's journal is 409 too, with a ``code`` saying which. Anything
malformed, forged or oversized is a 4xx that changes nothing. Spec: docs/design/replication.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from journal import (
    BlocksNeeded,
    Journal,
    JournalError,
    JournalOptions,
    NoSuchVolume,
    OsStorage,
    OutOfOrder,
    wall_clock,
)
from journal.clock import Clock
from journal.codec import pack_obj, unpack_obj
from journal.storage import write_atomic

from . import wire
from .digest import chunk_digests

log = logging.getLogger(__name__)

GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A request the receiver answers with a 4xx; ``code`` is stable for senders and tests."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass(slots=True)
class ReplicaMeta:
    journal: bytes
    epoch: int
    chunk_size: int
    # (first, last) seqs written by a changed-block resync: a mix of two points, never
    # offered as recovery points; the point before (first - 1) was pinned when it started
    resyncs: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class ReplicaGroup:
    name: str
    path: str
    journal: Journal
    meta: ReplicaMeta | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_batch_ns: int = 0
    batches: int = 0
    bytes_in: int = 0

    @property
    def durable_seq(self) -> int:
        return int(self.journal.window().last_seq)

    def not_a_point(self, seq: int) -> str | None:
        for a, b in self.meta.resyncs if self.meta else ():
            if a <= seq < b:
                return (
                    f"it lies inside the resync of seq {a}..{b}; seq {a - 1} (before it) and "
                    f"{b} (after it) are consistent"
                )
        return None


class TokenFile:
    """Bearer tokens, one per line, re-read when the file changes (rotation needs no restart).

    Compared in constant time over SHA-256 digests, so neither the token's content nor its
    length leaks through timing. The tokens never appear in logs.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._raw: bytes | None = None
        self._digests: list[bytes] = []
        self.reload()

    def reload(self) -> None:
        # compare the content, not (mtime, size): a same-length token swapped within one
        # timestamp tick (coarse file times) would otherwise stay unseen and the removed
        # token valid. The file is small; reading it per request is cheap.
        with open(self.path, "rb") as f:
            raw = f.read()
        if raw == self._raw:
            return
        lines = raw.decode("utf-8").splitlines()
        tokens = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
        self._raw = raw

    def check(self, presented: str) -> bool:
        try:
            self.reload()
        except OSError:
            log.warning("tokens file unreadable; keeping the tokens loaded before")
        # headers arrive surrogate-escaped: a token with non-UTF-8 bytes is wrong, not a crash
        d = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for t in self._digests:
            ok |= hmac.compare_digest(d, t)
        return ok and bool(self._digests)


class Receiver:
    """All replica groups of one DR site and the replication HTTP app that feeds them."""

    def __init__(
        self,
        state_dir: str,
        tokens: TokenFile | None,
        *,
        journal_options: JournalOptions | None = None,
        clock: Clock = wall_clock,
        mtls: bool = False,
        client_names: tuple[str, ...] = (),
    ) -> None:
        """``tokens`` None means mutual TLS alone authenticates (``mtls`` must be True)."""
        if tokens is None and not mtls:
            raise ValueError("the receiver needs bearer tokens, mutual TLS, or both")
        self.state_dir = state_dir
        self.tokens = tokens
        self.mtls = mtls
        self.client_names = client_names
        self.journal_options = journal_options or JournalOptions()
        self.clock = clock
        self.groups: dict[str, ReplicaGroup] = {}
        # called (in a worker thread) with each applied batch's records: the DR site's own
        # reactions, e.g. pinning a clean point the primary's detector flagged
        self.on_applied: Callable[[ReplicaGroup, list[Any]], object] | None = None
        self.refused: Counter[str] = Counter()
        self.accepted = 0
        self._create_lock = asyncio.Lock()

    # ------------------------------------------------------------------ groups
    @property
    def groups_dir(self) -> str:
        return os.path.join(self.state_dir, "groups")

    def open(self) -> None:
        """Open every replica journal found under the state dir (blocking: run in a thread)."""
        os.makedirs(self.groups_dir, exist_ok=True)
        for name in sorted(os.listdir(self.groups_dir)):
            if GROUP_RE.match(name) and os.path.isdir(os.path.join(self.groups_dir, name)):
                self.groups[name] = self._open_group(name)

    def _open_group(self, name: str) -> ReplicaGroup:
        path = os.path.join(self.groups_dir, name)
        os.makedirs(path, exist_ok=True)
        meta = None
        mp = os.path.join(path, "replica.meta")
        opts = self.journal_options
        if os.path.exists(mp):
            with open(mp, "rb") as f:
                m = unpack_obj(f.read())
            meta = ReplicaMeta(
                bytes(m["journal"]),
                int(m["epoch"]),
                int(m["chunk_size"]),
                [(int(a), int(b)) for a, b in m.get("resyncs", [])],
            )
            opts = JournalOptions(
                segment_size=opts.segment_size,
                chunk_size=meta.chunk_size,
                pack_target=opts.pack_target,
                hash_workers=opts.hash_workers,
                zstd_level=opts.zstd_level,
            )
        j = Journal.open(os.path.join(path, "journal"), clock=self.clock, options=opts)
        return ReplicaGroup(name, path, j, meta)

    def _save_meta(self, g: ReplicaGroup, meta: ReplicaMeta) -> None:
        write_atomic(
            OsStorage(),
            os.path.join(g.path, "replica.meta"),
            pack_obj(
                {
                    "journal": meta.journal,
                    "epoch": meta.epoch,
                    "chunk_size": meta.chunk_size,
                    "resyncs": [list(r) for r in meta.resyncs],
                }
            ),
        )
        g.meta = meta

    async def _group(self, name: str, *, create: bool) -> ReplicaGroup:
        if not GROUP_RE.match(name):
            raise Refused(400, "bad-group", f"bad group name {name!r}")
        g = self.groups.get(name)
        if g is None:
            if not create:
                raise Refused(404, "no-group", f"no replica of group {name!r} here")
            async with self._create_lock:
                g = self.groups.get(name)
                if g is None:
                    g = await asyncio.to_thread(self._open_group, name)
                    self.groups[name] = g
        return g

    async def _bind(self, g: ReplicaGroup, s: wire.StreamId) -> ReplicaMeta | None:
        """Check which primary journal and epoch may append; nothing is saved here.

        Returns the binding to save (first contact, or a newer epoch), None when it is
        unchanged. A newer epoch is saved only once its request succeeded, so a refused
        request never fences the current primary; a first contact is saved just before its
        first records are written (after the framing, stream and seq checks).
        """
        if s.group != g.name:
            raise Refused(400, "bad-frame", "the stream names another group than the URL")
        m = g.meta
        if m is None:
            if g.journal.window().last_seq > 0:
                raise Refused(409, "other-primary", "replica has history but no binding")
            if s.chunk_size != g.journal.opts.chunk_size:
                # an empty replica adopts the primary's chunk size: reopen it with that size
                await asyncio.to_thread(g.journal.close)
                g.journal = await asyncio.to_thread(self._reopen_fresh, g, s.chunk_size)
            return ReplicaMeta(s.journal, s.epoch, s.chunk_size)
        if s.journal != m.journal:
            raise Refused(
                409,
                "other-primary",
                "this replica belongs to another primary journal",
                hint="a new primary needs a new group name, or a failback resync",
            )
        if s.chunk_size != m.chunk_size:
            raise Refused(409, "bad-chunk-size", f"replica chunk size is {m.chunk_size}")
        if s.epoch < m.epoch:
            raise Refused(
                409, "stale-epoch", f"epoch {s.epoch} is older than {m.epoch}", epoch=m.epoch
            )
        if s.epoch > m.epoch:
            return ReplicaMeta(m.journal, s.epoch, m.chunk_size, m.resyncs)
        return None

    async def _commit_bind(self, g: ReplicaGroup, meta: ReplicaMeta | None) -> None:
        if meta is None:
            return
        first = g.meta is None
        await asyncio.to_thread(self._save_meta, g, meta)
        log.info(
            "replica bound" if first else "replica epoch raised",
            extra={"group": g.name, "epoch": meta.epoch},
        )

    def _reopen_fresh(self, g: ReplicaGroup, chunk_size: int) -> Journal:
        import shutil

        jp = os.path.join(g.path, "journal")
        shutil.rmtree(jp)  # empty (no records): only its metadata, made with another chunk size
        o = self.journal_options
        return Journal.open(
            jp,
            clock=self.clock,
            options=JournalOptions(
                segment_size=o.segment_size,
                chunk_size=chunk_size,
                pack_target=o.pack_target,
                hash_workers=o.hash_workers,
                zstd_level=o.zstd_level,
            ),
        )

    def position(self, g: ReplicaGroup) -> dict[str, Any]:
        w = g.journal.window()
        return {
            "group": g.name,
            "journal": g.meta.journal.hex() if g.meta else None,
            "epoch": g.meta.epoch if g.meta else 0,
            "chunk_size": g.meta.chunk_size if g.meta else None,
            "durable_seq": int(w.last_seq),
            "first_seq": int(w.first_seq),
        }

    # ------------------------------------------------------------------ handlers
    async def h_position(self, request: web.Request) -> web.Response:
        g = await self._group(request.match_info["group"], create=True)
        async with g.lock:  # never while a batch is between its append and its fsync
            return _json(200, self.position(g))

    async def h_have(self, request: web.Request) -> web.Response:
        g = await self._group(request.match_info["group"], create=True)
        ids = wire.decode_ids(await _read(request))
        have = await asyncio.to_thread(g.journal.locate_blocks, ids)
        missing = [b for b in ids if b not in have]
        return web.Response(body=wire.encode_ids(missing), content_type="application/x-cdp")

    async def h_blocks(self, request: web.Request) -> web.Response:
        """Blocks for a base install: stored, not yet referenced (only into an empty replica)."""
        g = await self._group(request.match_info["group"], create=True)
        body = await _read(request)
        blocks = wire.decode_blocks(body)
        async with g.lock:
            if g.durable_seq > 0:
                raise Refused(409, "not-empty", "blocks without records go to empty replicas only")
            await asyncio.to_thread(_put_blocks, g.journal, blocks)
        g.bytes_in += len(body)
        return _json(200, {"stored": len(blocks)})

    async def h_base(self, request: web.Request) -> web.Response:
        g = await self._group(request.match_info["group"], create=True)
        base = wire.decode_base(await _read(request))
        async with g.lock:
            bound = await self._bind(g, base.stream)
            if g.durable_seq >= base.seq:
                return _json(200, {**self.position(g), "duplicate": True})
            if g.durable_seq > 0:
                raise Refused(409, "not-empty", "a base goes into an empty replica only")
            if g.meta is None:  # bind before the base lands (see h_batch)
                await self._commit_bind(g, bound)
                bound = None
            try:
                await asyncio.to_thread(g.journal.install_base, base.seq, base.ts, base.volumes)
                await self._commit_bind(g, bound)
            except BlocksNeeded as e:
                raise Refused(
                    422, "blocks-needed", str(e), missing=[b.hex() for b in e.block_ids]
                ) from e
            except ValueError as e:
                raise Refused(400, "bad-frame", str(e)) from e
        log.info("replica base installed", extra={"group": g.name, "seq": base.seq})
        return _json(200, self.position(g))

    async def h_batch(self, request: web.Request) -> web.Response:
        g = await self._group(request.match_info["group"], create=True)
        body = await _read(request)
        batch = await asyncio.to_thread(wire.decode_batch, body)
        async with g.lock:
            bound = await self._bind(g, batch.stream)
            durable = g.durable_seq
            if batch.last_seq <= durable:
                return _json(200, {**self.position(g), "duplicate": True})
            if batch.first_seq > durable + 1:
                raise Refused(
                    409, "gap", f"batch starts at {batch.first_seq}", expected=durable + 1
                )
            recs = [r for r in batch.records if r.seq > durable]
            if g.meta is None:
                # first contact: bind before the first record lands, so that a crash right
                # after it can never leave history without a binding (that would wedge)
                await self._commit_bind(g, bound)
                bound = None
            try:
                await asyncio.to_thread(_apply, g.journal, recs, batch.blocks)
            except BlocksNeeded as e:
                raise Refused(
                    422, "blocks-needed", str(e), missing=[b.hex() for b in e.block_ids]
                ) from e
            except OutOfOrder as e:
                raise Refused(409, "gap", str(e), expected=e.expected) from e
            except ValueError as e:
                raise Refused(400, "bad-frame", str(e)) from e
            await self._commit_bind(g, bound)
            if self.on_applied is not None:
                try:
                    await asyncio.to_thread(self.on_applied, g, recs)
                except Exception:  # a reaction never fails the (already durable) batch
                    log.exception("reaction to an applied batch failed", extra={"group": g.name})
        done = bool(g.meta and g.meta.resyncs and g.durable_seq >= g.meta.resyncs[-1][1])
        if done and ("snapshot", "resync-pin") in g.journal.holds:
            await asyncio.to_thread(g.journal.release_hold, "snapshot", "resync-pin")
            log.info("replica resync complete", extra={"group": g.name, "seq": g.durable_seq})
        g.last_batch_ns = time.time_ns()
        g.batches += 1
        g.bytes_in += len(body)
        self.accepted += 1
        return _json(200, self.position(g))

    async def h_resync(self, request: web.Request) -> web.Response:
        """Announce a changed-block resync of seqs first..last (the primary folded them).

        The replica's latest point (first - 1) is consistent: it is pinned (a snapshot hold)
        until the resync completes, and the seqs in between are recorded as not recovery
        points, so neither site ever offers the half-resynced state.
        """
        g = await self._group(request.match_info["group"], create=False)
        doc = wire.decode_resync(await _read(request))
        async with g.lock:
            bound = await self._bind(g, doc.stream) or g.meta
            durable = g.durable_seq
            if doc.first != durable + 1:
                raise Refused(409, "gap", f"resync starts at {doc.first}", expected=durable + 1)
            if bound is None or durable == 0:
                raise Refused(409, "not-bound", "a resync needs a replica with history")
            if (doc.first, doc.last) not in bound.resyncs:
                bound = ReplicaMeta(
                    bound.journal,
                    bound.epoch,
                    bound.chunk_size,
                    [*bound.resyncs, (doc.first, doc.last)],
                )
            if bound is not g.meta:
                await asyncio.to_thread(self._save_meta, g, bound)
            pinned = ("snapshot", "resync-pin") in g.journal.holds
            if not pinned and durable >= g.journal.window().first_seq:
                # the consistent point before the first resync; an interrupted resync that
                # starts again must not move the pin onto its half-written state
                await asyncio.to_thread(g.journal.set_hold, "snapshot", "resync-pin", durable)
        log.warning(
            "replica resync started: changed blocks only",
            extra={"group": g.name, "pinned_seq": durable, "last": doc.last},
        )
        return _json(200, self.position(g))

    async def h_digest(self, request: web.Request) -> web.Response:
        """Per-chunk BLAKE3 of a volume at a seq: for `verify` against the primary."""
        g = await self._group(request.match_info["group"], create=False)
        vol = request.query.get("volume", "")
        try:
            seq = int(request.query.get("seq", ""))
            first = int(request.query.get("first", "0"))
            count = min(int(request.query.get("count", "16384")), 65536)
        except ValueError as e:
            raise Refused(400, "bad-request", "seq, first, count: integers") from e
        try:
            digests = await asyncio.to_thread(chunk_digests, g.journal, vol, seq, first, count)
            size = g.journal.volume_size(vol)
        except NoSuchVolume as e:
            raise Refused(404, "no-volume", str(e)) from e
        except JournalError as e:
            raise Refused(409, "not-retained", str(e)) from e
        except ValueError as e:
            raise Refused(400, "bad-request", str(e)) from e
        return web.Response(
            body=b"".join(digests),
            content_type="application/octet-stream",
            headers={"X-Cdp-Volume-Size": str(size)},
        )

    # ------------------------------------------------------------------ app
    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._refusals, self._auth], client_max_size=wire.MAX_BODY
        )
        app.router.add_get("/v1/groups/{group}/position", self.h_position)
        app.router.add_post("/v1/groups/{group}/have", self.h_have)
        app.router.add_post("/v1/groups/{group}/blocks", self.h_blocks)
        app.router.add_post("/v1/groups/{group}/base", self.h_base)
        app.router.add_post("/v1/groups/{group}/batch", self.h_batch)
        app.router.add_get("/v1/groups/{group}/digest", self.h_digest)
        app.router.add_post("/v1/groups/{group}/resync", self.h_resync)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request: a valid bearer token and/or a verified client certificate.

        With mutual TLS the TLS layer already refused connections without a certificate
        signed by ``tls_client_ca``; ``client_names`` narrows that to named senders.
        """
        if self.mtls:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            if not peer:
                raise Refused(401, "unauthorized", "a client certificate is required")
            if self.client_names and not set(_cert_names(peer)) & set(self.client_names):
                raise Refused(401, "unauthorized", "client certificate not allowed here")
        if self.tokens is not None:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token or not self.tokens.check(token.strip()):
                raise Refused(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    @web.middleware
    async def _refusals(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as e:
            return self._refuse(request, e.status, e.code, e.message, e.extra)
        except wire.ProtocolError as e:
            return self._refuse(request, 400, "bad-frame", str(e), {})
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, 413, "too-large", "request body too large", {})
        except web.HTTPException:
            raise
        except JournalError as e:
            log.error("replica journal failed", extra={"path": request.path, "err": str(e)})
            return _json(500, {"error": str(e), "code": "journal"})
        except Exception as e:  # one request never takes the receiver down
            log.exception("request crashed", extra={"path": request.path})
            return _json(500, {"error": f"internal error: {type(e).__name__}", "code": "internal"})

    def _refuse(
        self, request: web.Request, status: int, code: str, message: str, extra: dict[str, Any]
    ) -> web.Response:
        self.refused[code] += 1
        log.warning(
            "replication request refused",
            extra={"path": request.path, "status": status, "code": code, "err": message},
        )
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return _json(status, {"error": message, "code": code, **extra}, headers)

    def status(self) -> dict[str, Any]:
        return {
            "accepted_batches": self.accepted,
            "refused": dict(self.refused),
            "groups": [
                {
                    **self.position(g),
                    "batches": g.batches,
                    "bytes_in": g.bytes_in,
                    "last_batch_ns": g.last_batch_ns,
                }
                for g in self.groups.values()
            ],
        }

    def close(self) -> None:
        for g in self.groups.values():
            g.journal.close()


def _cert_names(peer: Any) -> list[str]:
    """The common names and DNS/IP subject alternative names of a verified peer cert."""
    names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
    names += [v for k, v in peer.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    return names


def _apply(j: Journal, recs: list[Any], blocks: Mapping[bytes, bytes]) -> None:
    j.append_replicated(recs, blocks)
    j.sync()  # acknowledged means durable


def _put_blocks(j: Journal, blocks: dict[bytes, bytes]) -> None:
    from journal.blockstore import block_id

    for b, data in blocks.items():
        if block_id(data) != b:
            raise Refused(400, "bad-frame", f"block {b.hex()[:16]}: data does not match its id")
    j.store.put_many(list(blocks.values()))
    j.store.flush()


async def _read(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > wire.MAX_BODY:
        raise Refused(413, "too-large", f"body over {wire.MAX_BODY} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise Refused(413, "too-large", f"body over {wire.MAX_BODY} bytes") from e


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(doc), content_type="application/json", headers=headers
    )
