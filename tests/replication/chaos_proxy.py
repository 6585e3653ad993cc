"""A loopback TCP proxy that injects network faults from a seeded plan (tests and benchmarks).

``ChaosProxy(target_host, target_port, plan, seed=...)`` listens on 127.0.0.1 (a free port)
and forwards every accepted connection to the target. Each connection gets its own
``random.Random`` drawn from the proxy's seeded one, and the plan is applied per connection
and per chunk (one ``read`` of up to ``chunk_size`` bytes, in either direction):

- ``drop``: per connection, the probability that it is cut at a random byte (uniform in
  ``1..drop_within`` bytes counted over both directions): both sides are aborted, the rest
  of that chunk is never forwarded.
- ``stall``: per chunk, pause that direction for ``stall_s`` (uniform, default 0.05-1.0 s).
- ``truncate``: per chunk, forward only a random prefix of it, then close both sides.
- ``flip``: per chunk, flip one random bit of it before forwarding.

A clean EOF is passed on as a half-close (the other direction goes on); a fault or an error
ends the connection both ways. ``faults_enabled`` turns every fault off (and back on) at any
time, so a test can let the stream converge at the end. With ``FaultPlan()`` (all zero, see
``ChaosProxy.counting``) the proxy only counts: ``bytes_up`` (client to target),
``bytes_down`` (target to client), ``chunks`` (reads per direction), and ``faults`` counts
each fault injected (``drop``, ``stall``, ``truncate``, ``flip_up``, ``flip_down``).
``close()`` stops the listener, aborts every connection and waits for every task the proxy
started: nothing outlives it. Only loopback addresses, both to listen on and to forward to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections import Counter
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    drop: float = 0.0  # per connection
    stall: float = 0.0  # per chunk
    truncate: float = 0.0  # per chunk
    flip: float = 0.0  # per chunk
    stall_s: tuple[float, float] = (0.05, 1.0)
    drop_within: int = 2 << 20  # a dropped connection dies within this many bytes

    @property
    def any(self) -> bool:
        return self.drop > 0 or self.stall > 0 or self.truncate > 0 or self.flip > 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Conn:
    """One proxied connection: two pumps sharing a fault plan and a fate."""

    def __init__(self, proxy: ChaosProxy, rng: random.Random) -> None:
        self.proxy = proxy
        self.rng = rng
        plan = proxy.plan
        self.drop_at = rng.randint(1, plan.drop_within) if rng.random() < plan.drop else None
        self.passed = 0  # bytes forwarded, both directions
        self.writers: list[asyncio.StreamWriter] = []
        self.dead = False

    def kill(self, *, abort: bool) -> None:
        self.dead = True
        for w in self.writers:
            with contextlib.suppress(Exception):
                if abort:
                    w.transport.abort()
                else:
                    w.close()

    async def pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        """Forward one direction until EOF (passed on as a half-close) or a fault/error
        (which ends the connection both ways)."""
        p, plan, rng = self.proxy, self.proxy.plan, self.rng
        try:
            while not self.dead:
                data = await src.read(p.chunk_size)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()  # a clean half-close: the other way may go on
                        return
                    break
                p.chunks[direction] += 1
                if p.faults_enabled and plan.any:
                    if rng.random() < plan.stall:
                        p.faults["stall"] += 1
                        await asyncio.sleep(rng.uniform(*plan.stall_s))
                        if self.dead:
                            break
                    if self.drop_at is not None and self.passed + len(data) >= self.drop_at:
                        p.faults["drop"] += 1
                        self._forward(dst, data[: max(0, self.drop_at - self.passed)], direction)
                        self.kill(abort=True)
                        return
                    if rng.random() < plan.flip:
                        buf = bytearray(data)
                        bit = rng.randrange(len(buf) * 8)
                        buf[bit // 8] ^= 1 << (bit % 8)
                        data = bytes(buf)
                        p.faults[f"flip_{direction}"] += 1
                    if rng.random() < plan.truncate:
                        p.faults["truncate"] += 1
                        self._forward(dst, data[: rng.randrange(len(data))], direction)
                        with contextlib.suppress(ConnectionError, OSError):
                            await dst.drain()
                        break
                self._forward(dst, data, direction)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        self.kill(abort=False)  # a fault, an error or a peer gone: over for both

    def _forward(self, dst: asyncio.StreamWriter, data: bytes, direction: str) -> None:
        if not data:
            return
        dst.write(data)
        self.passed += len(data)
        if direction == "up":
            self.proxy.bytes_up += len(data)
        else:
            self.proxy.bytes_down += len(data)


class ChaosProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        plan: FaultPlan | None = None,
        *,
        seed: int = 0,
        chunk_size: int = 64 * 1024,
    ) -> None:
        if not _loopback(target_host):
            raise ValueError(f"chaos proxy forwards to loopback only, not {target_host!r}")
        self.target = (target_host, target_port)
        self.plan = plan or FaultPlan()
        self.rng = random.Random(seed)
        self.chunk_size = chunk_size
        self.faults_enabled = self.plan.any
        self.faults: Counter[str] = Counter()
        self.chunks: Counter[str] = Counter()  # reads forwarded (or faulted), "up"/"down"
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.connect_failures = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()

    @classmethod
    def counting(cls, target_host: str, target_port: int) -> ChaosProxy:
        """A proxy that injects nothing and only counts bytes (for benchmarks)."""
        return cls(target_host, target_port, FaultPlan())

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> ChaosProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def drop_all(self) -> None:
        """Abort every open connection now (a network blip); new ones are accepted."""
        for c in list(self._conns):
            c.kill(abort=True)

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(self, random.Random(self.rng.getrandbits(64)))
        conn.writers.append(cw)
        self._conns.add(conn)
        self.connections += 1
        try:
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 5.0)
            except (OSError, TimeoutError):
                self.connect_failures += 1
                return
            conn.writers.append(uw)
            if not conn.dead:
                await asyncio.gather(conn.pump(cr, uw, "up"), conn.pump(ur, cw, "down"))
        except asyncio.CancelledError:
            pass  # close(): this connection ends with the proxy
        finally:
            conn.kill(abort=False)
            self._conns.discard(conn)
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.faults_enabled = False
        self.drop_all()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    def summary(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "connect_failures": self.connect_failures,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "chunks": dict(self.chunks),
            "faults": dict(self.faults),
        }
