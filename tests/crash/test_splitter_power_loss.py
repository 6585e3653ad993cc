"""Power loss under the splitter (issue 4, crash test kind 2).

The NBD server and our client run in one event loop, the journal on FaultyStorage (a
volatile page cache). At random instants between events the storage is frozen; each crash
image of it (unsynced data dropped, kept in part, torn, reordered; directory entries lost)
must reopen to a journal holding every write acknowledged with FUA or before an acknowledged
FLUSH. Only the journal's storage is simulated: the image file is real (its durability is
the kernel's fdatasync, which no user-space test can cut).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from cdp.nbd.client import NbdClient
from cdp.nbd.export import Export, ExportSet
from cdp.nbd.server import NbdServer
from journal import Journal, JournalOptions

from ..journal.faulty_storage import FaultyStorage

BLOCK = 4096
SIZE = 2 << 20
OPTS = JournalOptions(
    segment_size=96 * 1024, chunk_size=16 * 1024, pack_target=256 * 1024, hash_workers=1
)
MODES = ("drop_all", "keep_some", "reorder", "dirents")


def _stamp(b: int, v: int) -> bytes:
    return (f"b{b}v{v}.".encode() * BLOCK)[:BLOCK]


async def _run(tmp: Path, seed: int) -> list[str]:
    rng = random.Random(seed)
    fs = FaultyStorage(str(tmp / "j"), strict_mkdir=False)
    j = Journal.open(fs.root, storage=fs, options=OPTS)
    j.add_volume("disk0", SIZE)
    j.sync()
    ex = Export("disk0", SIZE, str(tmp / "disk0.raw"), lambda: j, chunk_size=OPTS.chunk_size)
    ex.open()
    sock = tempfile.mkdtemp(prefix="cdp-pl-", dir="/tmp") + "/s"
    server = NbdServer(ExportSet({"disk0": ex}))
    await server.start_unix(sock)
    c = await NbdClient.connect_unix(sock, "disk0")
    versions: dict[int, int] = {}  # block -> last submitted version
    durable: dict[int, int] = {}  # block -> version known durable (FUA or before a FLUSH)
    acked: dict[int, int] = {}
    snaps = []
    try:
        for step in range(400):
            b = rng.randrange(0, SIZE // BLOCK)
            v = versions.get(b, 0) + 1
            versions[b] = v
            fua = rng.random() < 0.15
            pending = [asyncio.ensure_future(c.write(b * BLOCK, _stamp(b, v), fua=fua))]
            if rng.random() < 0.1:
                before = dict(acked)
                await asyncio.gather(*pending)
                acked[b] = max(acked.get(b, 0), v)
                await c.flush()
                for k, vv in before.items():
                    durable[k] = max(durable.get(k, 0), vv)
                durable[b] = max(durable.get(b, 0), v)
            else:
                await asyncio.gather(*pending)
                acked[b] = max(acked.get(b, 0), v)
                if fua:
                    durable[b] = max(durable.get(b, 0), v)
            if step % 7 == 0 and rng.random() < 0.5:
                await asyncio.to_thread(j.seal_pending, 4)
            if rng.random() < 0.08:  # freeze the storage between events
                snaps.append((fs.snapshot(), dict(durable), dict(versions)))
        snaps.append((fs.snapshot(), dict(durable), dict(versions)))
    finally:
        await c.close()
        await server.stop()
        ex.close()
        j.close()
    errors = []
    for snap, dur, vers in snaps:
        for mode in rng.sample(MODES, 2):
            img = snap.crash_image(mode, rng)
            try:
                j2 = Journal.open(img.root, storage=img, options=OPTS)
            except Exception as e:
                errors.append(f"{mode}: open failed: {e!r}")
                continue
            try:
                data = j2.read("disk0", 0, SIZE)
                for blk, v in dur.items():
                    got = data[blk * BLOCK : (blk + 1) * BLOCK]
                    if not any(got == _stamp(blk, x) for x in range(v, vers[blk] + 1)):
                        errors.append(f"{mode}: block {blk} lost durable version {v}")
                        break
            finally:
                j2.close()
                shutil.rmtree(img.root, ignore_errors=True)
    return errors


@pytest.mark.parametrize("seed", [1, 2])
def test_power_loss_keeps_every_durably_acknowledged_write(tmp_path: Path, seed: int) -> None:
    errors = asyncio.run(_run(tmp_path, seed))
    assert not errors, f"seed {seed}: " + "; ".join(errors[:5])
