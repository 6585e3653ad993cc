"""The primary-site sender: tails one group's journal and ships it to one replica target.

Position is the receiver's word: after any disconnect, crash or restart of either side the
sender asks the receiver for its durable seq and resumes right after it, so nothing the
receiver holds is sent twice and nothing is skipped. That position is also a ``replica``
hold on the primary journal, so retention never folds away what the replica still needs
(unless the journal's size cap forces the hold to go: then status says the replica must
resync).

Per batch: read durable records (``Journal.read_durable``), name every piece by its block id
(``source.prepare``), ask the receiver which ids it lacks (``/have``), send the records with
just those blocks in one zstd frame (``/batch``), paced by a token bucket when a bandwidth
cap is set. Spec: docs/design/replication.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import blake3

from journal import (
    BlockRef,
    CheckpointKind,
    CheckpointRecord,
    Journal,
    JournalError,
    PointNotRetained,
    Record,
    Seq,
    VolumeRecord,
    WriteRecord,
    ZeroRecord,
    wall_clock,
)
from journal.clock import Clock

from . import wire
from .digest import VerifyReport, chunk_digests, compare_digests
from .source import Prepared, prepare, split_at_checkpoints

log = logging.getLogger(__name__)

KNOWN_IDS = 200_000  # block ids remembered as held by the receiver (skips a /have round)


class SenderStopped(Exception):
    """The receiver refused the stream for a reason retrying cannot fix (auth, fencing)."""


class Retry(Exception):
    """A transient failure: reconnect, ask the position again, resume."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to ship. ``bandwidth`` is bytes per second (None: unlimited)."""

    name: str
    url: str
    token: str = field(repr=False)
    ssl: ssl.SSLContext | None = None
    bandwidth: int | None = None
    codec: int = wire.CODEC_ZSTD
    level: int = 3
    coalesce_ns: int = 0
    high_water: int | None = None
    max_batch_bytes: int = 8 << 20
    max_batch_records: int = 20_000
    idle_poll_s: float = 0.02
    request_timeout_s: float = 60.0


class TokenBucket:
    """Bytes per second with a small burst; a large send waits until it has been paid for.

    The burst is at most a quarter second of the rate, so the average over any 10 s window
    stays within a few percent of the cap.
    """

    def __init__(self, rate: int, *, now: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(self.rate / 4, 64 * 1024)
        self._now = now
        self.tokens = self.burst
        self.t = now()

    def delay(self, n: int) -> float:
        """Charge ``n`` bytes; return how long to wait before sending them."""
        t = self._now()
        self.tokens = min(self.burst, self.tokens + (t - self.t) * self.rate)
        self.t = t
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    async def take(self, n: int) -> None:
        d = self.delay(n)
        if d > 0:
            await asyncio.sleep(d)


@dataclass(slots=True)
class SenderStats:
    batches: int = 0
    records: int = 0
    logical_bytes: int = 0
    wire_bytes_out: int = 0
    wire_bytes_in: int = 0
    blocks_sent: int = 0
    block_bytes_sent: int = 0
    blocks_deduped: int = 0
    coalesced_bytes: int = 0
    resends: int = 0
    reconnects: int = 0


class Sender:
    def __init__(
        self,
        target: Target,
        group: str,
        journal: Callable[[], Journal],
        *,
        epoch: int = 1,
        clock: Clock = wall_clock,
    ) -> None:
        self.target = target
        self.group = group
        self.journal = journal
        self.epoch = epoch
        self.clock = clock
        self.state = "starting"
        self.detail = ""
        self.acked_seq = 0
        self.stats = SenderStats()
        self.bucket = TokenBucket(target.bandwidth) if target.bandwidth else None
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._hold_set_at = 0.0
        self._hold_seq = -1
        self.initial_total = 0
        self.initial_done = 0
        self.initial_started = 0.0
        self.caught_up_once = False
        self.last_ack_ns = 0
        self._progress_logged = 0.0

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event) -> None:
        """Ship until ``stop``; never raises (a replica problem must not stop the daemon)."""
        backoff = 0.2
        refused_wait = 1.0
        timeout = aiohttp.ClientTimeout(total=self.target.request_timeout_s, connect=10)
        connector = aiohttp.TCPConnector(ssl=self.target.ssl if self.target.ssl else False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            shipped = self.stats.batches
            while not stop.is_set():
                if self.stats.batches != shipped:  # the last connection made progress:
                    backoff, shipped = 0.2, self.stats.batches  # its failure is a fresh one
                try:
                    await self._stream(http, stop)
                    backoff, refused_wait = 0.2, 1.0
                except SenderStopped as e:
                    # retried with a growing pause: a token being rotated, or a damaged
                    # request on a plain-HTTP link, must not stop replication for good
                    self.state, self.detail = "refused", str(e)
                    log.error(
                        "replica refused the stream",
                        extra={"replica": self.target.name, "group": self.group, "err": str(e)},
                    )
                    await _wait(stop, refused_wait)
                    refused_wait = min(refused_wait * 2, 30.0)
                except (Retry, aiohttp.ClientError, TimeoutError, ConnectionError, OSError) as e:
                    self.state, self.detail = "disconnected", f"{type(e).__name__}: {e}"
                    self.stats.reconnects += 1
                    log.warning(
                        "replication interrupted; resuming from the receiver's position",
                        extra={"replica": self.target.name, "group": self.group, "err": str(e)},
                    )
                    await _wait(stop, backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 5.0)
                except PointNotRetained:
                    # folded away while streaming (the size cap released our hold): the
                    # next connection finds the gap and resyncs the changed blocks
                    self.state = "resync-needed"
                    self.detail = f"the primary journal no longer holds seq {self.acked_seq + 1}"
                    log.error(
                        "replica fell behind the journal window; resyncing changed blocks",
                        extra={"replica": self.target.name, "group": self.group},
                    )
                    await _wait(stop, 0.5)
                except JournalError as e:
                    # the journal failed (ENOSPC, EIO) or is being reopened by the daemon's
                    # repair: capture goes on; ship again once it is back
                    self.state, self.detail = "journal-unavailable", str(e)
                    await _wait(stop, 1.0)
                except (ValueError, KeyError, TypeError) as e:
                    # an answer that is not what the protocol says (damaged on a plain-HTTP
                    # link, or a receiver bug): reconnect and ask for the position again
                    self.state, self.detail = "disconnected", f"bad answer: {e}"
                    self.stats.reconnects += 1
                    log.warning(
                        "receiver answered something unexpected; resuming",
                        extra={"replica": self.target.name, "group": self.group, "err": str(e)},
                    )
                    await _wait(stop, backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 5.0)
                except Exception:
                    self.state, self.detail = "error", "internal error (see the log)"
                    log.exception(
                        "replication failed unexpectedly; retrying",
                        extra={"replica": self.target.name, "group": self.group},
                    )
                    await _wait(stop, 5.0)
        with contextlib.suppress(JournalError):
            await asyncio.to_thread(self._save_hold, force=True)

    # ------------------------------------------------------------------ protocol
    def _url(self, what: str) -> str:
        return f"{self.target.url.rstrip('/')}/v1/groups/{self.group}/{what}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.target.token}"}

    async def _call(
        self, http: aiohttp.ClientSession, method: str, what: str, body: bytes | None = None
    ) -> tuple[int, Any]:
        data = body if body is not None else b""
        self.stats.wire_bytes_out += len(data) + 200  # request line and headers, about
        async with http.request(method, self._url(what), data=body, headers=self._headers()) as r:
            raw = await r.read()
            self.stats.wire_bytes_in += len(raw) + 150
            if r.content_type == "application/json":
                doc: Any = await r.json(content_type=None)
            else:
                doc = raw
            if r.status == 401:
                raise SenderStopped("the receiver refused our token (401)")
            if r.status >= 500:
                raise Retry(f"receiver answered {r.status}: {doc!r:.200}")
            return r.status, doc

    async def _stream(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        self.state = "connecting"
        status, pos = await self._call(http, "GET", "position")
        if status != 200:
            raise Retry(f"position: {status} {pos!r:.200}")
        j = self.journal()
        if pos["journal"] not in (None, j.uuid.hex()):
            raise SenderStopped(
                "the replica belongs to another primary journal; give this group a new "
                "replica (or resync it)"
            )
        acked = int(pos["durable_seq"])
        w = j.window()
        if acked > w.last_seq:  # more than we ever wrote: a damaged answer, ask again
            raise Retry(f"receiver claims seq {acked}, beyond this journal's {w.last_seq}")
        if acked < w.first_seq:
            if acked == 0 and w.first_seq > 0:
                await self._install_base(http, j)
                acked = int(w.first_seq)
            else:
                acked = await self._resync(http, j, acked)
        self.acked_seq = acked
        await asyncio.to_thread(self._save_hold, force=True)
        if not self.caught_up_once and self.initial_total == 0:
            self.initial_total = j.bytes_after(acked)
            self.initial_started = time.monotonic()
        self.state = "streaming"
        self.detail = ""
        cursor = None
        while not stop.is_set():
            j = self.journal()
            before = cursor
            recs, cursor = await asyncio.to_thread(
                j.read_durable,
                self.acked_seq + 1,
                max_bytes=self._batch_bytes(),
                max_records=self.target.max_batch_records,
                cursor=cursor,
            )
            if not recs:
                if not self.caught_up_once:
                    self.caught_up_once = True
                    log.info(
                        "replica caught up",
                        extra={
                            "replica": self.target.name,
                            "group": self.group,
                            "seq": self.acked_seq,
                        },
                    )
                self.state = "caught-up"
                await _wait(stop, self.target.idle_poll_s)
                continue
            self.state = "streaming"
            coalesce = self.target.coalesce_ns > 0
            if coalesce:
                n = split_at_checkpoints(recs)
                young = self.clock() - recs[0].ts < self.target.coalesce_ns
                full = len(recs) >= self.target.max_batch_records
                if n == len(recs) and young and not full:
                    cursor = before  # let the window fill: read the same records again
                    await _wait(stop, min(0.1, self.target.coalesce_ns / 1e9))
                    continue
                if n < len(recs):
                    recs, cursor = recs[:n], None
            p = await asyncio.to_thread(prepare, recs, j.opts.chunk_size, coalesce=coalesce)
            await self._ship(http, j, p)
            await asyncio.to_thread(self._save_hold)

    def _batch_bytes(self) -> int:
        b = self.target.max_batch_bytes
        if self.target.bandwidth:  # about half a second of link per batch keeps pacing smooth
            b = max(256 * 1024, min(b, self.target.bandwidth // 2))
        return b

    async def _ship(self, http: aiohttp.ClientSession, j: Journal, p: Prepared) -> None:
        recs = p.records
        ids = wire.refs_of(recs)
        ask = [b for b in ids if b not in self._known]
        missing: set[bytes] = set()
        if ask:
            status, doc = await self._call(http, "POST", "have", wire.encode_ids(ask))
            if status != 200:
                raise Retry(f"have: {status}")
            missing = set(wire.decode_ids(doc))
        self.stats.blocks_deduped += len(ids) - len(missing)
        stream = wire.StreamId(self.group, j.uuid, self.epoch, j.opts.chunk_size)
        for _attempt in range(4):
            blocks = await asyncio.to_thread(self._block_data, j, p, missing)
            batch = wire.Batch(stream, recs[0].seq, recs[-1].seq, tuple(recs), blocks)
            body = await asyncio.to_thread(
                wire.encode_batch, batch, codec=self.target.codec, level=self.target.level
            )
            if self.bucket is not None:
                await self.bucket.take(len(body) + 350)
            status, doc = await self._call(http, "POST", "batch", body)
            if status == 200:
                # durable there can only be what was sent: more is a damaged answer
                durable = min(int(doc["durable_seq"]), recs[-1].seq)
                self.acked_seq = max(self.acked_seq, durable)
                self.last_ack_ns = self.clock()
                self.stats.batches += 1
                self.stats.records += len(recs)
                self.stats.logical_bytes += p.logical_bytes
                self.stats.coalesced_bytes += p.coalesced_bytes
                self.stats.blocks_sent += len(blocks)
                self.stats.block_bytes_sent += sum(len(v) for v in blocks.values())
                if not self.caught_up_once:
                    self.initial_done += p.logical_bytes
                    self._log_progress()
                for b in ids:
                    self._remember(b)
                return
            code = doc.get("code") if isinstance(doc, dict) else None
            if status == 422 and code == "blocks-needed":
                self.stats.resends += 1
                for h in doc.get("missing", []):
                    missing.add(bytes.fromhex(h))
                    self._known.pop(bytes.fromhex(h), None)
                continue
            if status == 409 and code == "gap":
                self.acked_seq = int(doc["expected"]) - 1
                raise Retry(f"receiver expects seq {doc['expected']}")
            if status == 409:
                raise SenderStopped(f"{code}: {doc.get('error')}")
            raise Retry(f"batch: {status} {doc!r:.200}")
        raise Retry("receiver kept asking for blocks")

    def _block_data(self, j: Journal, p: Prepared, missing: set[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        need_store: list[BlockRef] = []
        for b in missing:
            data = p.inline.get(b)
            if data is not None:
                out[b] = bytes(data)
            elif b in p.stored:
                need_store.append(p.stored[b])
        if need_store:
            out.update(j.get_blocks(need_store))
        return out

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now - self._progress_logged < 5.0:
            return
        self._progress_logged = now
        init = self.status().get("initial_sync")
        if isinstance(init, dict):
            log.info(
                "initial sync",
                extra={"replica": self.target.name, "group": self.group, **init},
            )

    def _remember(self, b: bytes) -> None:
        self._known[b] = None
        self._known.move_to_end(b)
        if len(self._known) > KNOWN_IDS:
            self._known.popitem(last=False)

    async def _install_base(self, http: aiohttp.ClientSession, j: Journal) -> None:
        """Seed an empty replica with the primary's folded base (blocks first, then the map)."""
        self.state = "initial-sync"
        seq, ts, vols = await asyncio.to_thread(j.base_state)
        refs: dict[bytes, BlockRef] = {}
        for _, chunks in vols.values():
            for r in chunks.values():
                refs.setdefault(r.block_id, r)
        ids = list(refs)
        self.initial_total = sum(r.length for r in refs.values())
        self.initial_started = time.monotonic()
        for k in range(0, len(ids), 2048):
            part = ids[k : k + 2048]
            status, doc = await self._call(http, "POST", "have", wire.encode_ids(part))
            if status != 200:
                raise Retry(f"have: {status}")
            lack = wire.decode_ids(doc)
            send: list[bytes] = []
            size = 0
            for b in [*lack, b""]:
                if b:
                    send.append(b)
                    size += refs[b].length
                if send and (size >= self._batch_bytes() or not b):
                    data = await asyncio.to_thread(j.get_blocks, [refs[x] for x in send])
                    body = await asyncio.to_thread(
                        wire.encode_blocks, data, codec=self.target.codec, level=self.target.level
                    )
                    if self.bucket is not None:
                        await self.bucket.take(len(body) + 350)
                    status, doc = await self._call(http, "POST", "blocks", body)
                    if status != 200:
                        raise Retry(f"blocks: {status} {doc!r:.200}")
                    self.stats.blocks_sent += len(data)
                    self.stats.block_bytes_sent += sum(len(v) for v in data.values())
                    send, size = [], 0
            self.initial_done += sum(refs[b].length for b in part)
        base = wire.Base(
            wire.StreamId(self.group, j.uuid, self.epoch, j.opts.chunk_size),
            seq,
            ts,
            {
                n: (size, {c: r.block_id for c, r in chunks.items()})
                for n, (size, chunks) in vols.items()
            },
        )
        status, doc = await self._call(http, "POST", "base", wire.encode_base(base))
        if status != 200:
            code = doc.get("code") if isinstance(doc, dict) else None
            if status == 409 and code != "not-empty":
                raise SenderStopped(f"{code}: {doc.get('error')}")
            raise Retry(f"base: {status} {doc!r:.200}")
        log.info(
            "replica seeded from the primary's base",
            extra={"replica": self.target.name, "group": self.group, "seq": seq},
        )

    async def _resync(self, http: aiohttp.ClientSession, j: Journal, acked: int) -> int:
        """The replica holds seq ``acked``, which this journal folded away: ship what differs.

        Pins a point S (a replica hold at this journal's latest), compares chunk digests of
        the replica at ``acked`` with this journal at S (only digests cross the WAN), and
        writes seqs acked+1..S at the DR site: one record per run of changed chunks (data or
        zeroes), padded with no-op volume records, ending with a ``resync`` checkpoint.
        The receiver pins ``acked`` first and never offers the seqs in between as points.
        """
        self.state = "resyncing"
        for _ in range(4):
            await asyncio.to_thread(j.sync)
            s = int(j.window().last_seq)
            await asyncio.to_thread(j.set_hold, "replica", self.target.name, s)
            plan = await self._resync_plan(http, j, acked, s)
            need = len(plan) + 1
            if s - acked >= need:
                break
            # not enough seqs between the two points for one record per run: make room
            # with no-op records here, then plan again at the new latest
            vol = next(iter(j.volumes))
            for _ in range(need - (s - acked)):
                await asyncio.to_thread(j.add_volume, vol, j.volume_size(vol))
        else:
            raise Retry("could not plan the resync")
        ts = j.ts_of(s)
        recs: list[Record] = []
        seq = acked + 1
        for vol, kind, off, n in plan:
            if kind == "v":
                recs.append(VolumeRecord(Seq(seq), ts, vol, n))
            elif kind == "z":
                recs.append(ZeroRecord(Seq(seq), ts, vol, off, n))
            else:  # data is read when its batch is built, below
                recs.append(WriteRecord(Seq(seq), ts, vol, off, n, None))
            seq += 1
        pad = next(iter(j.volumes))
        while seq < s:
            recs.append(VolumeRecord(Seq(seq), ts, pad, j.volume_size(pad)))
            seq += 1
        recs.append(CheckpointRecord(Seq(s), ts, f"resync-{acked + 1}-{s}", CheckpointKind.CRASH))
        changed = sum(n for _, k, _, n in plan if k == "w")
        self.detail = f"changed blocks since seq {acked}: {changed} bytes to ship"
        body = wire.encode_resync(
            wire.Resync(
                wire.StreamId(self.group, j.uuid, self.epoch, j.opts.chunk_size), acked + 1, s
            )
        )
        status, doc = await self._call(http, "POST", "resync", body)
        if status != 200:
            raise Retry(f"resync: {status} {doc!r:.200}")
        log.warning(
            "resyncing the replica: changed blocks only",
            extra={
                "replica": self.target.name,
                "group": self.group,
                "from": acked,
                "to": s,
                "bytes": changed,
            },
        )
        self.acked_seq = acked
        k = 0
        while k < len(recs):
            batch: list[Record] = []
            size = 0
            while k < len(recs) and (
                not batch
                or (size < self._batch_bytes() and len(batch) < self.target.max_batch_records)
            ):
                r = recs[k]
                if isinstance(r, WriteRecord):
                    data = await asyncio.to_thread(j.read, r.volume, r.offset, r.length, s)
                    r = WriteRecord(r.seq, r.ts, r.volume, r.offset, r.length, data)
                    size += r.length
                batch.append(r)
                k += 1
            p = await asyncio.to_thread(prepare, batch, j.opts.chunk_size)
            await self._ship(http, j, p)
        self.detail = ""
        return s

    async def _resync_plan(
        self, http: aiohttp.ClientSession, j: Journal, acked: int, s: int
    ) -> list[tuple[str, str, int, int]]:
        """(volume, kind, offset, length): "v" a new size, "w" data, "z" zeroes, runs merged."""
        cs = j.opts.chunk_size
        plan: list[tuple[str, str, int, int]] = []
        step = 16384
        for vol in sorted(j.volumes):
            size = j.volume_size(vol)
            total = (size + cs - 1) // cs
            remote_size: int | None = None
            runs: list[tuple[str, int, int]] = []  # kind, first chunk, chunks
            for first in range(0, total, step):
                q = {"volume": vol, "seq": str(acked), "first": str(first), "count": str(step)}
                url = self._url("digest")
                async with http.get(url, params=q, headers=self._headers()) as r:
                    raw = await r.read()
                    self.stats.wire_bytes_in += len(raw) + 150
                    if r.status == 404:
                        raw = b""
                    elif r.status != 200:
                        raise Retry(f"digest: {r.status}")
                    else:
                        remote_size = int(r.headers.get("X-Cdp-Volume-Size", "0"))
                local = await asyncio.to_thread(chunk_digests, j, vol, s, first, step)
                zero = blake3.blake3(bytes(cs)).digest()
                for c in compare_digests(local, raw, first):
                    n = min(cs, size - c * cs)
                    is_zero = local[c - first] == (
                        zero if n == cs else blake3.blake3(bytes(n)).digest()
                    )
                    kind = "z" if is_zero else "w"
                    last = runs[-1] if runs else None
                    if last and last[0] == kind and last[1] + last[2] == c and last[2] < 64:
                        runs[-1] = (kind, last[1], last[2] + 1)
                    else:
                        runs.append((kind, c, 1))
            if remote_size != size:
                plan.append((vol, "v", 0, size))
            for kind, c, n in runs:
                off = c * cs
                plan.append((vol, kind, off, min(n * cs, size - off)))
        return plan

    def _save_hold(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.acked_seq == self._hold_seq or (not force and now - self._hold_set_at < 1.0):
            return
        j = self.journal()
        with contextlib.suppress(PointNotRetained):
            j.set_hold("replica", self.target.name, max(self.acked_seq, j.window().first_seq))
            self._hold_seq, self._hold_set_at = self.acked_seq, now

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        j = self.journal()
        w = j.window()
        last = int(w.last_seq)
        lag_ns = 0
        if last > self.acked_seq:
            try:
                lag_ns = max(0, self.clock() - j.ts_of(self.acked_seq + 1))
            except PointNotRetained:
                lag_ns = max(0, self.clock() - int(w.first_ts))
        pending = j.bytes_after(self.acked_seq) if last > self.acked_seq else 0
        s = self.stats
        doc: dict[str, Any] = {
            "name": self.target.name,
            "url": self.target.url,
            "state": self.state,
            "detail": self.detail,
            "acked_seq": self.acked_seq,
            "last_seq": last,
            "lag_s": round(lag_ns / 1e9, 3),
            "pending_records": max(0, last - self.acked_seq),
            "pending_bytes": pending,
            "high_water_bytes": self.target.high_water,
            "over_high_water": bool(self.target.high_water and pending > self.target.high_water),
            "batches": s.batches,
            "records": s.records,
            "logical_bytes": s.logical_bytes,
            "wire_bytes_out": s.wire_bytes_out,
            "wire_bytes_in": s.wire_bytes_in,
            "blocks_sent": s.blocks_sent,
            "block_bytes_sent": s.block_bytes_sent,
            "blocks_deduped": s.blocks_deduped,
            "coalesced_bytes": s.coalesced_bytes,
            "resends": s.resends,
            "reconnects": s.reconnects,
            "bandwidth_bps": self.target.bandwidth * 8 if self.target.bandwidth else None,
        }
        if not self.caught_up_once and self.initial_total:
            el = max(1e-3, time.monotonic() - self.initial_started)
            rate = self.initial_done / el
            left = max(0, self.initial_total - self.initial_done)
            doc["initial_sync"] = {
                "done_bytes": self.initial_done,
                "total_bytes": self.initial_total,
                "eta_s": round(left / rate, 1) if rate > 0 else None,
            }
        return doc


async def verify_replica(target: Target, group: str, j: Journal, volume: str) -> VerifyReport:
    """Compare the replica's latest with this journal at the same seq, chunk by chunk.

    Only digests (32 bytes per chunk) cross the WAN. Raises PointNotRetained when the
    replica's position is outside this journal's window (it cannot be compared here).
    """
    timeout = aiohttp.ClientTimeout(total=target.request_timeout_s * 4, connect=10)
    connector = aiohttp.TCPConnector(ssl=target.ssl if target.ssl else False)
    headers = {"Authorization": f"Bearer {target.token}"}
    base = f"{target.url.rstrip('/')}/v1/groups/{group}"
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        async with http.get(f"{base}/position", headers=headers) as r:
            if r.status != 200:
                raise SenderStopped(f"position: {r.status} {await r.text():.200}")
            pos = await r.json()
        seq = int(pos["durable_seq"])
        await asyncio.to_thread(j.ts_of, seq)  # PointNotRetained if outside our window
        cs = j.opts.chunk_size
        total = (j.volume_size(volume) + cs - 1) // cs
        bad: list[int] = []
        step = 16384
        for first in range(0, total, step):
            q = {"volume": volume, "seq": str(seq), "first": str(first), "count": str(step)}
            async with http.get(f"{base}/digest", params=q, headers=headers) as r:
                if r.status != 200:
                    raise SenderStopped(f"digest: {r.status} {await r.text():.200}")
                remote = await r.read()
            local = await asyncio.to_thread(chunk_digests, j, volume, seq, first, step)
            bad += compare_digests(local, remote, first)
        return VerifyReport(volume, seq, total, cs, tuple(bad))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
