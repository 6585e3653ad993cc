"""Replication through a faulty network (drops, stalls, truncation, bit flips) and restarts.

A writer keeps appending to the primary journal (writes, zeroes, checkpoints, sealing)
while a Sender ships it through ``ChaosProxy`` to an in-process Receiver. Once the writer
is done and the sender has caught up through the faults, they are turned off and the
stream must converge: every checkpoint and the latest point reconstruct bit-exactly at the
DR site, the checkpoint lists are equal and nothing acknowledged is missing. The proxy's
counters prove each kind of fault really was injected. Restarts of the receiver (same
port, same state dir) and of the sender (a new Sender object on the same journal) happen
mid-stream. Deadlines here are hang guards only, never performance thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

import replicator.receiver as receiver_mod
from journal import Journal
from replicator import wire
from replicator.receiver import Receiver
from replicator.sender import Sender, Target

from .chaos_proxy import ChaosProxy, FaultPlan
from .conftest import Site, same_at, start_receiver, stop_receiver, target, until

KINDS = ("drop", "stall", "truncate", "flip_up", "flip_down")
# Per chunk (one read of up to 64 KiB) rates, per connection for drop. A batch of a few
# chunks gets through more often than not, so the stream converges while every kind of fault
# keeps happening; each fault costs a reconnect (or a stall), which is what the run time is.
# The writer goes on past its ops (boundedly) until every kind was injected at least once.
PLAN = FaultPlan(drop=0.25, stall=0.006, truncate=0.006, flip=0.012, drop_within=1 << 20)
LIGHT = FaultPlan(drop=0.1, stall=0.003, truncate=0.003, flip=0.006, drop_within=2 << 20)
VOLS = (("vm1-disk0", 8 << 20), ("vm1-disk1", 4 << 20))
MAX_LAG = 400  # records the writer may run ahead of the sender's acknowledgements
HANG = 120.0  # hang guard for any one phase, never a performance threshold


def chaos_target(url: str) -> Target:
    # small batches: a fault costs one short batch, not megabytes (records average ~10 KB;
    # read_durable's max_bytes is soft, up to a segment, so the record cap does the work);
    # short timeouts: a stall or a length header damaged in flight costs seconds, not a minute
    return target(
        url,
        request_timeout_s=5.0,
        max_batch_bytes=384 << 10,
        max_batch_records=16,
        idle_poll_s=0.01,
    )


def writer_ops(
    j: Journal,
    rng: random.Random,
    n: int,
    cps: list[int],
    lag: Callable[[], int] | None = None,
    abort: threading.Event | None = None,
    more: Callable[[], bool] | None = None,
) -> None:
    """``n`` operations: writes (random and repeated content), zeroes, trims, checkpoints,
    and now and then sealing of rolled segments while the sender reads them. With ``lag``
    (records not yet acknowledged) the writer waits while the sender is far behind, so
    writing, sealing and shipping really interleave (a pace set by progress, not by time).
    ``more``: keep going past ``n`` while it says so (at most ``3 n`` in all). ``abort``
    ends it early (a failing test must not leave the thread behind)."""
    abort = abort or threading.Event()
    k = -1
    while (k := k + 1) < n or (more is not None and more() and k < 3 * n):
        while lag is not None and lag() > MAX_LAG:
            if abort.wait(0.005):
                return
        if abort.is_set():
            return
        vol, size = rng.choice(VOLS)
        length = rng.choice([512, 4096, 4096, 8192, 16384, 24576])
        if rng.random() < 0.05:
            length = rng.choice([65536, 100_000])  # across chunk bounds, unaligned
        off = rng.randrange(0, size - length) // 512 * 512
        r = rng.random()
        if r < 0.02:
            cps.append(int(j.checkpoint(f"cp{k}")))
        elif r < 0.12:
            j.zero(vol, off, length, trim=rng.random() < 0.5)
        elif r < 0.3:
            j.write(vol, off, bytes([rng.randrange(4)]) * length)  # dedup material
        else:
            j.write(vol, off, rng.randbytes(length))
        if k % 200 == 199:
            j.seal_pending(2)


async def backlog(j: Journal, seed: int, n: int) -> list[int]:
    cps: list[int] = []
    await asyncio.to_thread(writer_ops, j, random.Random(seed), n, cps)
    return cps


@contextlib.asynccontextmanager
async def writing(
    j: Journal,
    seed: int,
    n: int,
    sender: Callable[[], Sender],
    more: Callable[[], bool] | None = None,
) -> AsyncIterator[asyncio.Future[list[int]]]:
    """A writer thread paced by ``sender()``'s acknowledgements; joined on exit."""
    cps: list[int] = []
    abort = threading.Event()

    def work() -> list[int]:
        lag = lambda: int(j.window().last_seq) - sender().acked_seq  # noqa: E731
        writer_ops(j, random.Random(seed), n, cps, lag, abort, more)
        return cps

    fut = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        yield fut
    finally:
        abort.set()
        await asyncio.wait([fut])


@contextlib.asynccontextmanager
async def shipping(s: Sender) -> AsyncIterator[asyncio.Task[None]]:
    """Run the sender; yield its task so waits can fail fast if it died."""
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until_alive(cond: Callable[[], bool], what: str, *tasks: asyncio.Future[Any]) -> None:
    """``until`` that also fails at once when a task it relies on ended (with its error)."""

    def check() -> bool:
        for t in tasks:
            if t.done() and not cond():
                t.result()  # raises what killed it
                raise AssertionError(f"{t!r} ended while waiting for {what}")
        return cond()

    await until(check, what, HANG)


async def converge(
    proxy: ChaosProxy, primary: Journal, s: Sender, task: asyncio.Task[None]
) -> None:
    """Let the sender catch up through the faults, then turn them off and wait for it."""
    last = int(primary.window().last_seq)
    await until_alive(lambda: s.acked_seq >= last, f"acked {last} through faults", task)
    proxy.faults_enabled = False
    last = int(primary.window().last_seq)
    await until_alive(lambda: s.acked_seq == last, f"acked {last}", task)


async def check_replica(primary: Journal, rj: Journal, cps: list[int]) -> None:
    pw, rw = primary.window(), rj.window()
    assert rw.last_seq == pw.last_seq, "an acknowledged record is missing at the DR site"
    assert rj.checkpoints() == primary.checkpoints()
    assert [c.seq for c in primary.checkpoints()] == cps
    for seq in [*cps, int(pw.last_seq)]:
        await asyncio.to_thread(same_at, primary, rj, seq)


def assert_all_faults(proxy: ChaosProxy) -> None:
    seen = proxy.summary()
    for k in KINDS:
        assert proxy.faults[k] > 0, f"the proxy injected no {k!r} fault: {seen}"


@dataclass
class Seen:
    """What the receiver(s) saw: every batch decoded, and duplicate answers."""

    decoded: list[tuple[int, int]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # durable_seq of each position answer
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """Instrument the receiver class (every instance, also ones started after a restart)."""
    log = Seen()
    decode = wire.decode_batch

    def decode_batch(body: bytes) -> wire.Batch:
        b = decode(body)
        with log.lock:
            log.decoded.append((b.first_seq, b.last_seq))
        return b

    orig_batch, orig_position = Receiver.h_batch, Receiver.h_position

    async def h_batch(self: Receiver, request: web.Request) -> web.Response:
        resp = await orig_batch(self, request)
        if resp.status == 200 and json.loads(resp.text or "{}").get("duplicate"):
            log.duplicates += 1
        return resp

    async def h_position(self: Receiver, request: web.Request) -> web.Response:
        resp = await orig_position(self, request)
        log.positions.append(int(json.loads(resp.text or "{}")["durable_seq"]))
        return resp

    monkeypatch.setattr(receiver_mod.wire, "decode_batch", decode_batch)
    monkeypatch.setattr(Receiver, "h_batch", h_batch)
    monkeypatch.setattr(Receiver, "h_position", h_position)
    return log


@contextlib.asynccontextmanager
async def dr_site(state_dir: Path, tokens: Path) -> AsyncIterator[Callable[[], Site]]:
    """A receiver whose current Site the test can replace (restart); stopped at the end."""
    box = [await start_receiver(state_dir, tokens)]
    try:
        yield lambda: box[0]
    finally:
        with contextlib.suppress(Exception):
            await stop_receiver(box[0])


def port_of(url: str) -> int:
    p = urlsplit(url).port
    assert p is not None
    return p


# ---------------------------------------------------------------------- the proxy itself


async def test_proxy_counting_mode_is_transparent_and_loopback_only() -> None:
    got: list[bytes] = []

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # up to the client's half-close
        got.append(data)
        w.write(data[::-1])
        await w.drain()
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        payload = random.Random(0).randbytes(1 << 20)
        async with ChaosProxy.counting("127.0.0.1", port) as proxy:
            assert not proxy.faults_enabled
            for _ in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
                w.write(payload)
                w.write_eof()
                assert await asyncio.wait_for(r.read(), HANG) == payload[::-1]
                w.close()
            assert got == [payload] * 3
            assert proxy.bytes_up == proxy.bytes_down == 3 * len(payload)
            assert not proxy.faults and proxy.connections == 3
    finally:
        srv.close()
        await srv.wait_closed()
    with pytest.raises(ValueError, match="loopback"):
        ChaosProxy("192.0.2.1", 80)


# ---------------------------------------------------------------------- (a) faults


async def chaos_run(tmp_path: Path, tokens: Path, primary: Journal, seed: int, ops: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(dr_site(tmp_path / "dr", tokens))
        proxy = await stack.enter_async_context(
            ChaosProxy("127.0.0.1", port_of(site().url), PLAN, seed=seed)
        )
        s = Sender(chaos_target(proxy.url), "g1", lambda: primary)
        short = lambda: not all(proxy.faults[k] for k in KINDS)  # noqa: E731
        async with shipping(s) as task, writing(primary, seed, ops, lambda: s, short) as w:
            await until_alive(w.done, "writer done", task)
            cps = w.result()
            await converge(proxy, primary, s, task)
        rcv = site().receiver
        await check_replica(primary, rcv.groups["g1"].journal, cps)
        assert_all_faults(proxy)
        # a damaged body is refused (400) and re-sent: the retry path really ran
        assert rcv.refused["bad-frame"] > 0, rcv.refused
        assert s.stats.reconnects > 0
        print(f"seed {seed}: {proxy.summary()} refused={dict(rcv.refused)} stats={s.stats}")


@pytest.mark.parametrize("seed", [1, 2])
async def test_chaos_stream_converges(
    tmp_path: Path, tokens: Path, primary: Journal, seed: int
) -> None:
    await chaos_run(tmp_path, tokens, primary, seed, 1500)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 20))
async def test_chaos_stream_converges_long(
    tmp_path: Path, tokens: Path, primary: Journal, seed: int
) -> None:
    await chaos_run(tmp_path, tokens, primary, seed, 6000)


# ---------------------------------------------------------------------- (b) receiver restart


async def test_receiver_restart_mid_stream(
    tmp_path: Path, tokens: Path, primary: Journal, seen: Seen
) -> None:
    cps = await backlog(primary, 6, 400)  # restarts surely fall mid-stream
    state = tmp_path / "dr"
    box = [await start_receiver(state, tokens)]
    port = port_of(box[0].url)
    try:
        async with ChaosProxy("127.0.0.1", port, LIGHT, seed=7) as proxy:
            s = Sender(chaos_target(proxy.url), "g1", lambda: primary)
            async with shipping(s) as task, writing(primary, 7, 600, lambda: s) as w:
                for k in range(2):
                    before = s.stats.batches
                    await until_alive(
                        lambda b=before: s.stats.batches >= b + 5, "batches flowing", task
                    )
                    await stop_receiver(box[0])
                    await asyncio.sleep(0.3)  # the sender keeps running against a dead port
                    held = len(seen.decoded)
                    box[0] = await start_receiver(state, tokens, port)
                    assert port_of(box[0].url) == port
                    rcv = box[0].receiver
                    assert rcv.groups["g1"].durable_seq < primary.window().last_seq
                    # the sender resumes against the restarted receiver
                    await until_alive(lambda r=rcv: r.accepted > 0, f"resumed ({k})", task)
                    assert len(seen.decoded) > held
                await until_alive(w.done, "writer done", task)
                cps += w.result()
                await converge(proxy, primary, s, task)
            await check_replica(primary, box[0].receiver.groups["g1"].journal, cps)
            assert s.stats.reconnects >= 2
            # the sender asks the receiver's position on every reconnect, so a batch the
            # receiver already held is rare (only a position damaged in flight causes one)
            assert seen.duplicates <= max(3, s.stats.reconnects // 4), (
                seen.duplicates,
                s.stats.reconnects,
            )
            print(f"receiver restart: {proxy.summary()} dup={seen.duplicates} stats={s.stats}")
    finally:
        with contextlib.suppress(Exception):
            await stop_receiver(box[0])


# ---------------------------------------------------------------------- (c) sender restart


async def test_sender_restart_resumes_from_receiver_position(
    tmp_path: Path, tokens: Path, primary: Journal, seen: Seen
) -> None:
    cps = await backlog(primary, 3, 400)  # the restart surely falls mid-stream
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(dr_site(tmp_path / "dr", tokens))
        proxy = await stack.enter_async_context(
            ChaosProxy("127.0.0.1", port_of(site().url), LIGHT, seed=3)
        )
        s1 = Sender(chaos_target(proxy.url), "g1", lambda: primary)
        current = [s1]
        w = await stack.enter_async_context(writing(primary, 4, 600, lambda: current[0]))
        async with shipping(s1) as task:
            await until_alive(lambda: s1.stats.batches >= 5, "first sender streaming", task)
        # s1 is stopped; cut whatever it left in flight and let the receiver settle
        proxy.faults_enabled = False
        proxy.drop_all()
        g = site().receiver.groups["g1"]
        await asyncio.sleep(0.2)
        await until(lambda: not g.lock.locked(), "receiver idle", HANG)
        durable = g.durable_seq
        assert durable < primary.window().last_seq, "the restart should fall mid-stream"
        mark, pmark = len(seen.decoded), len(seen.positions)
        s2 = Sender(chaos_target(proxy.url), "g1", lambda: primary)
        current[0] = s2
        async with shipping(s2) as task:
            await until_alive(lambda: len(seen.decoded) > mark, "second sender's batch", task)
            first, _ = seen.decoded[mark]
            # the new sender asked the receiver where it stands and resumed right after it
            told = seen.positions[pmark:]
            assert told, "the new sender never asked the receiver's position"
            assert told[-1] >= durable
            assert first == told[-1] + 1, (first, told, durable)
            proxy.faults_enabled = True
            await until_alive(w.done, "writer done", task)
            cps += w.result()
            await converge(proxy, primary, s2, task)
        await check_replica(primary, g.journal, cps)
        print(f"sender restart at {durable}: {proxy.summary()} dup={seen.duplicates}")


# ---------------------------------------------------------------------- damaged answers


@pytest.mark.parametrize("endpoint", ["h_batch", "h_position"])
async def test_damaged_durable_seq_in_an_answer_is_not_believed(
    tmp_path: Path,
    tokens: Path,
    primary: Journal,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
) -> None:
    """A bit flip on a plain-HTTP link can turn the receiver's ``durable_seq`` into another
    well-formed number (a digit '1' is one bit from '9'). The sender must not take a seq it
    never sent (or that its journal does not even have) as acknowledged: it would idle as
    caught-up while the replica misses records, and set its hold past them."""
    cps = await backlog(primary, 5, 200)
    orig = getattr(Receiver, endpoint)
    damaged = [0]

    async def lying(self: Receiver, request: web.Request) -> web.Response:
        resp = await orig(self, request)
        doc = json.loads(resp.text or "{}")
        if resp.status == 200 and not damaged[0]:
            damaged[0] += 1
            doc["durable_seq"] = int(doc["durable_seq"]) + 900_000
            return web.json_response(doc)
        return resp

    monkeypatch.setattr(Receiver, endpoint, lying)
    async with dr_site(tmp_path / "dr", tokens) as site:
        s = Sender(chaos_target(site().url), "g1", lambda: primary)
        async with shipping(s) as task:
            last = int(primary.window().last_seq)
            await until_alive(lambda: s.acked_seq == last, f"acked {last}", task)
        assert damaged[0] == 1
        await check_replica(primary, site().receiver.groups["g1"].journal, cps)
