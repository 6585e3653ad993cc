"""In-process DR receiver on loopback for replication tests (real HTTP, real journals)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from journal import Journal, JournalOptions
from replicator.receiver import Receiver, TokenFile
from replicator.sender import Sender, Target

TOKEN = "test-token-0123456789abcdef"
SMALL = JournalOptions(segment_size=1 << 20, chunk_size=64 * 1024, pack_target=4 << 20)


@dataclass
class Site:
    receiver: Receiver
    url: str
    runner: web.AppRunner
    state_dir: Path


async def start_receiver(state_dir: Path, tokens: Path, port: int = 0) -> Site:
    rcv = Receiver(str(state_dir), TokenFile(str(tokens)), journal_options=SMALL)
    await asyncio.to_thread(rcv.open)
    runner = web.AppRunner(rcv.make_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1]
    return Site(rcv, f"http://127.0.0.1:{port}", runner, state_dir)


async def stop_receiver(s: Site) -> None:
    await s.runner.cleanup()
    await asyncio.to_thread(s.receiver.close)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    p = tmp_path / "tokens"
    p.write_text(f"# rotated tokens\nold-token-aaaa\n{TOKEN}\n")
    return p


@pytest.fixture
async def dr(tmp_path: Path, tokens: Path) -> AsyncIterator[Site]:
    s = await start_receiver(tmp_path / "dr", tokens)
    try:
        yield s
    finally:
        await stop_receiver(s)


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(str(tmp_path / "primary"), options=SMALL)
    j.add_volume("vm1-disk0", 8 << 20)
    j.add_volume("vm1-disk1", 4 << 20)
    try:
        yield j
    finally:
        j.close()


def random_writes(
    j: Journal, rng: random.Random, n: int, *, checkpoint_every: int = 0
) -> list[int]:
    """Writes, zeroes and checkpoints of mixed sizes; returns the seqs of the checkpoints."""
    cps = []
    vols = [("vm1-disk0", 8 << 20), ("vm1-disk1", 4 << 20)]
    for k in range(n):
        vol, size = rng.choice(vols)
        kind = rng.random()
        length = rng.choice([512, 4096, 4096, 8192, 65536, 100_000, 300_000])
        off = rng.randrange(0, size - length) // 512 * 512
        if kind < 0.1:
            j.zero(vol, off, length, trim=rng.random() < 0.5)
        elif kind < 0.3:
            # repeated content: dedup material
            j.write(vol, off, bytes([rng.randrange(4)]) * length)
        else:
            j.write(vol, off, rng.randbytes(length))
        if checkpoint_every and k % checkpoint_every == checkpoint_every - 1:
            cps.append(j.checkpoint(f"cp{k}"))
    return cps


def same_at(a: Journal, b: Journal, seq: int) -> None:
    for vol in ("vm1-disk0", "vm1-disk1"):
        size = a.volume_size(vol)
        assert a.read(vol, 0, size, seq) == b.read(vol, 0, size, seq), f"{vol} differs at {seq}"


def target(url: str, name: str = "dr1", **kw: object) -> Target:
    from replicator.sender import Target as T

    return T(name=name, url=url, token=kw.pop("token", TOKEN), **kw)  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    end = asyncio.get_running_loop().time() + limit_s
    while not cond():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(sender: Sender) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


from collections.abc import Iterator  # noqa: E402

_ = os
