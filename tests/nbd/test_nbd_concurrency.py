"""B4: many requests in flight on one connection (the nbd-tester-client model).

- 64 stamped 4 KiB writes to overlapping offsets, pipelined (one send, or split at random
  boundaries), some with FUA: every reply cookie matches exactly one outstanding request,
  none is duplicated or orphaned; the final content equals the writes applied in the order
  they were sent (the server processes requests in arrival order).
- A sliding window of 64 in-flight requests (writes, reads, flushes, zeroes, trims) over
  512-byte stamped blocks: every read returns, block by block, the last write sent before
  it (this server's documented order; the spec would also allow a concurrent write's stamp).

After each, the journal's latest point equals the image and the export.
"""

from __future__ import annotations

import os
import queue
import random
import struct
import threading
from collections.abc import Iterator

import nbdraw as n
import pytest
from conftest import CdpDaemon, Volume, need_tools, running_daemon
from nbdraw import RawNbd

pytestmark = pytest.mark.integration

NAME = "conc0"
SIZE = 16 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdpDaemon]:
    need_tools("qemu-img")
    root = tmp_path_factory.mktemp("concurrency")
    with running_daemon(root, [Volume(NAME, SIZE)]) as d:
        yield d
        d.assert_log_clean()


def stamp(seq: int, offset: int, length: int) -> bytes:
    unit = struct.pack(">QQ", seq, offset)
    return (unit * (length // 16 + 1))[:length]


def split_random(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        k = rng.choice([1, 3, 27, 28, 29, 500, 4096, 5000])
        out.append(data[i : i + k])
        i += k
    return out


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("sending", ["one-send", "random-split"])
def test_pipelined_overlapping_writes(daemon: CdpDaemon, structured: bool, sending: str) -> None:
    rng = random.Random(f"pipelined:{structured}:{sending}")
    base = 2 << 20
    region = 64 * 1024
    model = bytearray(region)
    with RawNbd.connect_export(daemon.sock(NAME), NAME, structured=structured) as c:
        # start from known content
        assert c.pwrite(base, bytes(region)).error == 0
        frames = b""
        cookies = []
        for seq in range(64):
            off = rng.randrange(0, (region - 4096) // 512 + 1) * 512  # overlapping
            data = stamp(seq, base + off, 4096)
            flags = n.CMD_FLAG_FUA if rng.random() < 0.25 else 0
            cookie = rng.getrandbits(64)  # cookies are opaque: any 64-bit value
            cookie, frame = c.submit(
                n.CMD_WRITE, base + off, payload=data, flags=flags, cookie=cookie, send=False
            )
            cookies.append(cookie)
            frames += frame
            model[off : off + 4096] = data
        if sending == "one-send":
            c.send(frames)
        else:
            for part in split_random(rng, frames):
                c.send(part)
        seen = []
        for _ in range(64):
            r = c.reply()  # raises on a cookie that is not outstanding
            assert r.error == 0
            seen.append(r.cookie)
        assert sorted(seen) == sorted(cookies), "a reply is missing or duplicated"
        assert not c.pending
        # now many reads in flight, plus a flush, then check against the model
        frames = b""
        reads = {}
        for i in range(16):
            cookie, frame = c.submit(n.CMD_READ, base + i * 4096, 4096, send=False)
            reads[cookie] = i
            frames += frame
        flush_cookie, frame = c.submit(n.CMD_FLUSH, send=False)
        c.send(frames + frame)
        got = {}
        for _ in range(17):
            r = c.reply()
            assert r.error == 0
            if r.cookie != flush_cookie:
                got[reads[r.cookie]] = r.data
        assert not c.pending
        content = b"".join(got[i] for i in range(16))
        assert content == bytes(model), "final content is not the writes in send order"
        c.disconnect()
    with open(daemon.volumes[NAME].image, "rb") as f:  # type: ignore[arg-type]
        f.seek(base)
        assert f.read(region) == bytes(model)
    daemon.assert_consistent(NAME)


BLOCK = 512
REGION_BLOCKS = 2048  # 1 MiB of heavily overlapping traffic
UNKNOWN = -1  # a trimmed block: the spec leaves its content open


def sliding_window(daemon: CdpDaemon, ops: int, depth: int, seed: int, structured: bool) -> None:
    rng = random.Random(seed)
    base = 8 << 20
    # the model: per block, the stamp seq (0 = zeros, UNKNOWN after a trim)
    model = [0] * REGION_BLOCKS
    c = RawNbd.connect_export(daemon.sock(NAME), NAME, structured=structured, timeout=30)
    replies: queue.Queue[n.Reply | BaseException] = queue.Queue()

    def reader() -> None:
        try:
            while True:
                replies.put(c.reply())
        except BaseException as e:
            replies.put(e)

    expected: dict[int, tuple[str, int, int, list[int]]] = {}
    stats = {"read": 0, "write": 0, "flush": 0, "zero": 0, "trim": 0, "mismatch": 0}
    mismatches: list[str] = []

    def take_one() -> None:
        r = replies.get(timeout=30)
        if isinstance(r, BaseException):
            raise r
        kind, first, count, snap = expected.pop(r.cookie)  # KeyError: orphan reply
        assert r.error == 0, f"{kind} at block {first} failed with {r.error}"
        if kind == "read":
            for k in range(count):
                want_seq = snap[k]
                if want_seq == UNKNOWN:
                    continue
                blk = first + k
                want = bytes(BLOCK) if want_seq == 0 else stamp(want_seq, blk, BLOCK)
                if r.data[k * BLOCK : (k + 1) * BLOCK] != want:
                    stats["mismatch"] += 1
                    if len(mismatches) < 5:
                        got = r.data[k * BLOCK : k * BLOCK + 16].hex()
                        mismatches.append(f"block {blk}: want seq {want_seq}, got {got}")

    try:
        # known content first, so reads are checkable from the start
        assert c.pwrite(base, bytes(REGION_BLOCKS * BLOCK)).error == 0
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        for seq in range(1, ops + 1):
            while len(expected) >= depth:
                take_one()
            first = rng.randrange(REGION_BLOCKS)
            count = min(rng.choice([1, 1, 2, 4, 8, 16]), REGION_BLOCKS - first)
            off, length = base + first * BLOCK, count * BLOCK
            r = rng.random()
            if r < 0.55:
                payload = b"".join(stamp(seq, first + k, BLOCK) for k in range(count))
                flags = n.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                cookie, _ = c.submit(n.CMD_WRITE, off, payload=payload, flags=flags)
                model[first : first + count] = [seq] * count
                expected[cookie] = ("write", first, count, [])
                stats["write"] += 1
            elif r < 0.88:
                cookie, _ = c.submit(n.CMD_READ, off, length)
                expected[cookie] = ("read", first, count, model[first : first + count])
                stats["read"] += 1
            elif r < 0.92:
                cookie, _ = c.submit(n.CMD_FLUSH)
                expected[cookie] = ("flush", 0, 0, [])
                stats["flush"] += 1
            elif r < 0.96:
                flags = n.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
                cookie, _ = c.submit(n.CMD_WRITE_ZEROES, off, length, flags=flags)
                model[first : first + count] = [0] * count
                expected[cookie] = ("zero", first, count, [])
                stats["zero"] += 1
            else:
                cookie, _ = c.submit(n.CMD_TRIM, off, length)
                model[first : first + count] = [UNKNOWN] * count
                expected[cookie] = ("trim", first, count, [])
                stats["trim"] += 1
        while expected:
            take_one()
        assert not c.pending, f"requests never answered: {sorted(c.pending)[:10]}"
        assert replies.empty()
        print(f"sliding window: seed={seed} depth={depth} {stats}")
        assert stats["mismatch"] == 0, f"{stats['mismatch']} stamp mismatches: {mismatches}"
        c.disconnect()
    finally:
        c.close()
    # the image holds the model, and the journal holds the image
    with open(daemon.volumes[NAME].image, "rb") as f:  # type: ignore[arg-type]
        f.seek(base)
        data = f.read(REGION_BLOCKS * BLOCK)
    for blk, seq in enumerate(model):
        if seq == UNKNOWN:
            continue
        want = bytes(BLOCK) if seq == 0 else stamp(seq, blk, BLOCK)
        assert data[blk * BLOCK : (blk + 1) * BLOCK] == want, f"image block {blk}"
    daemon.assert_consistent(NAME)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_sliding_window_64_in_flight(daemon: CdpDaemon, structured: bool) -> None:
    seed = int(os.environ.get("CDP_NBD_B4_SEED", 64))
    sliding_window(
        daemon,
        ops=int(os.environ.get("CDP_NBD_B4_OPS", 4000)),
        depth=64,
        seed=seed,
        structured=structured,
    )


@pytest.mark.slow
def test_sliding_window_long(daemon: CdpDaemon) -> None:
    seed = int(os.environ.get("CDP_NBD_B4_SEED", random.getrandbits(32)))
    sliding_window(daemon, ops=100_000, depth=64, seed=seed, structured=True)
