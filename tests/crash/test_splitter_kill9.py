"""kill -9 of the daemon under a pipelining writer that logs every acknowledgement (C1).

Every acknowledged write must be present after a restart (the block holds the last acked
version or a version submitted after it), and the image must equal the journal's
reconstruction of its latest point. Our own NBD client logs acks exactly; qemu-io and fio
cover the real-client side in tests/nbd.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from cdp.nbd.client import NbdClient

from .daemon_proc import DaemonProc, make_daemon

BLOCK = 4096
SIZE = 16 << 20


async def _writer(
    d: DaemonProc,
    rng: random.Random,
    versions: dict[int, list[bytes]],
    acked: dict[int, int],
    stop: asyncio.Event,
) -> None:
    """Pipeline up to 16 writes; record each block's versions in submission order."""
    c = await NbdClient.connect_unix(d.nbd(), "disk0")
    inflight: set[asyncio.Task[None]] = set()
    n = 0
    try:
        while not stop.is_set():
            nblocks = rng.choice([1, 1, 2, 4, 16])
            b0 = rng.randrange(0, SIZE // BLOCK - nblocks)
            parts = []
            idx = []
            for b in range(b0, b0 + nblocks):
                v = len(versions.setdefault(b, [bytes(BLOCK)]))
                data = (f"blk{b}v{v}".encode() * BLOCK)[:BLOCK]
                versions[b].append(data)
                parts.append(data)
                idx.append((b, v))
            n += 1
            fua = rng.random() < 0.1

            async def one(off: int, data: bytes, idx: list[tuple[int, int]], fua: bool) -> None:
                await c.write(off, data, fua=fua)
                for b, v in idx:
                    acked[b] = max(acked.get(b, 0), v)

            t = asyncio.ensure_future(one(b0 * BLOCK, b"".join(parts), idx, fua))
            inflight.add(t)
            t.add_done_callback(inflight.discard)
            if n % 50 == 0:
                ft = asyncio.ensure_future(c.flush())
                inflight.add(ft)
                ft.add_done_callback(inflight.discard)
            while len(inflight) >= 16:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
    except ConnectionError:
        pass
    finally:
        for t in inflight:
            t.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)


async def _iteration(
    d: DaemonProc, rng: random.Random, versions: dict[int, list[bytes]], run_s: float
) -> dict[int, int]:
    acked: dict[int, int] = {}
    stop = asyncio.Event()
    task = asyncio.ensure_future(_writer(d, rng, versions, acked, stop))
    await asyncio.sleep(run_s)
    await asyncio.to_thread(d.kill9)  # mid-stream, with writes in flight
    stop.set()
    await task
    return acked


def _check(image: bytes, versions: dict[int, list[bytes]], acked: dict[int, int]) -> None:
    for b, vs in versions.items():
        got = image[b * BLOCK : (b + 1) * BLOCK]
        lo = acked.get(b, 0)
        ok = [v for v in range(lo, len(vs)) if vs[v] == got]
        assert ok, f"block {b}: holds none of versions {lo}..{len(vs) - 1} (last acked {lo})"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_loses_no_acknowledged_write(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    d = make_daemon(tmp_path)
    versions: dict[int, list[bytes]] = {}
    try:
        for _ in range(3):
            d.start()
            acked = asyncio.run(_iteration(d, rng, versions, rng.uniform(0.2, 1.2)))
            assert acked, "the writer got no acknowledgement before the kill"
            d.start()  # recovery: torn tail truncated, image compared with the journal
            image = (tmp_path / "disk0.raw").read_bytes()
            _check(image, versions, acked)
            # The journal alone, as it survived the kill (before the restart's onboarding
            # scan repaired anything), must hold every acknowledged write too.
            _check(d.journal_image(recovered=True), versions, acked)
            assert d.journal_image() == image, "journal latest differs from the image"
            # what landed is now the truth for the next round
            for b in versions:
                versions[b] = [image[b * BLOCK : (b + 1) * BLOCK]]
            d.kill9()
    finally:
        d.stop()
