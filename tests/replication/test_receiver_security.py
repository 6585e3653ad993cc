"""The DR receiver against hostile or broken input, over real HTTP on loopback.

Every refusal must come with the status and ``code`` of the protocol table
(docs/design/replication.md) and leave the replica exactly as it was: same durable seq,
same records, same content, same binding, no new blocks. Valid batches are built with the
real sender pieces (``Journal.read_durable`` -> ``source.prepare`` -> ``wire.encode_batch``)
and then damaged or forged. After the abuse, a well-behaved Sender still replicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zstandard

from journal import (
    BlockRef,
    Journal,
    Record,
    Seq,
    WriteRecord,
    ZeroRecord,
)
from journal.blockstore import block_id
from journal.types import BlockId
from replicator import wire
from replicator.sender import Sender
from replicator.source import prepare

from .conftest import SMALL, TOKEN, Site, random_writes, running, same_at, target, until

CS = SMALL.chunk_size
VOLS = {"vm1-disk0": 8 << 20, "vm1-disk1": 4 << 20}


# ------------------------------------------------------------------ the primary's stream
@dataclass
class Src:
    """The primary's records in wire form (refs), and the data of every block they name."""

    journal: Journal
    records: list[Record]  # records[k].seq == k + 1
    blocks: dict[bytes, bytes]

    def recs(self, first: int, last: int) -> list[Record]:
        out = self.records[first - 1 : last]
        assert [r.seq for r in out] == list(range(first, last + 1))
        return out

    def stream(
        self, *, epoch: int = 1, journal: bytes | None = None, group: str = "g1"
    ) -> wire.StreamId:
        return wire.StreamId(group, journal or self.journal.uuid, epoch, CS)

    def batch(
        self,
        first: int,
        last: int,
        *,
        records: Sequence[Record] | None = None,
        blocks: dict[bytes, bytes] | None = None,
        codec: int = wire.CODEC_ZSTD,
        **stream: Any,
    ) -> bytes:
        recs = list(records) if records is not None else self.recs(first, last)
        if blocks is None:
            blocks = {b: self.blocks[b] for b in wire.refs_of(recs)}
        b = wire.Batch(self.stream(**stream), recs[0].seq, recs[-1].seq, tuple(recs), blocks)
        return wire.encode_batch(b, codec=codec)

    def ids(self, first: int, last: int) -> list[bytes]:
        return list(wire.refs_of(self.recs(first, last)))


def read_source(j: Journal) -> Src:
    recs, _ = j.read_durable(1, max_records=100_000, max_bytes=1 << 30)
    p = prepare(recs, j.opts.chunk_size)
    blocks = {k: bytes(v) for k, v in p.inline.items()}
    if p.stored:
        blocks.update(j.get_blocks(list(p.stored.values())))
    assert [r.seq for r in p.records] == list(range(1, len(p.records) + 1))
    return Src(j, p.records, blocks)


@pytest.fixture
def src(primary: Journal) -> Src:
    random_writes(primary, random.Random(7), 60, checkpoint_every=12)
    s = read_source(primary)
    assert len(s.records) >= 60
    return s


# ------------------------------------------------------------------ HTTP
@dataclass
class Answer:
    status: int
    doc: Any
    headers: Any

    @property
    def code(self) -> str | None:
        return self.doc.get("code") if isinstance(self.doc, dict) else None


class Client:
    def __init__(self, site: Site, http: aiohttp.ClientSession) -> None:
        self.site, self.http = site, http

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        h = {} if token is None else {"Authorization": f"Bearer {token}"}
        h.update(headers or {})
        async with self.http.request(method, self.site.url + path, data=body, headers=h) as r:
            raw = await r.read()
            doc: Any = json.loads(raw) if r.content_type == "application/json" else raw
            return Answer(r.status, doc, r.headers)

    async def batch(self, body: bytes, group: str = "g1", **kw: Any) -> Answer:
        return await self.call("POST", f"/v1/groups/{group}/batch", body, **kw)

    async def ok(self, body: bytes, group: str = "g1") -> dict[str, Any]:
        a = await self.batch(body, group)
        assert a.status == 200, a.doc
        assert isinstance(a.doc, dict)
        return a.doc


@pytest.fixture
async def client(dr: Site) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http:
        yield Client(dr, http)


def refused(a: Answer, status: int, code: str) -> None:
    assert (a.status, a.code) == (status, code), a.doc
    assert isinstance(a.doc.get("error"), str) and a.doc["error"]


# ------------------------------------------------------------------ replica state
def _norm(r: Record) -> Any:
    if isinstance(r, WriteRecord):
        assert r.data is None
        refs = tuple((x.block_id, x.length) for x in r.refs)
        return ("write", r.seq, r.ts, r.wall, r.volume, r.offset, r.length, refs)
    return r


def _files(d: Path) -> list[tuple[str, int]]:
    if not d.exists():
        return []
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*") if p.is_file())


def snapshot(site: Site, group: str = "g1") -> dict[str, Any]:
    """Everything a refused request must not change about one replica group."""
    gdir = site.state_dir / "groups" / group
    g = site.receiver.groups.get(group)
    if g is None:
        return {"exists": False, "files": _files(gdir)}
    j = g.journal
    w = j.window()
    content = {}
    if w.last_seq:
        for vol in sorted(j.volumes):
            data = j.read(vol, 0, j.volume_size(vol), w.last_seq)
            content[vol] = hashlib.blake2b(data).hexdigest()
    meta = g.meta
    return {
        "exists": True,
        "position": site.receiver.position(g),
        "meta": None if meta is None else (meta.journal, meta.epoch, meta.chunk_size),
        "records": [_norm(r) for r in j.records(1)],
        "content": content,
        "files": _files(gdir),
    }


def holds_none(site: Site, group: str, ids: Sequence[bytes]) -> None:
    """The group either does not exist or has no records and none of these blocks."""
    g = site.receiver.groups.get(group)
    if g is None:
        assert not (site.state_dir / "groups" / group).exists()
        return
    assert g.durable_seq == 0
    assert list(g.journal.records(1)) == []
    assert g.journal.locate_blocks(list(ids)) == set()


def replica(site: Site, group: str = "g1") -> Journal:
    return site.receiver.groups[group].journal


async def replicate_rest(site: Site, src: Src, *, epoch: int = 1, group: str = "g1") -> None:
    """A well-behaved Sender catches the replica up; every point matches the primary."""
    primary = src.journal
    s = Sender(target(site.url), group, lambda: primary, epoch=epoch)
    last = int(primary.window().last_seq)
    async with running(s):
        await until(lambda: s.acked_seq >= last, "replica caught up")
    assert s.state != "refused", s.detail
    rj = replica(site, group)
    assert int(rj.window().last_seq) == last
    got = [_norm(r) for r in rj.records(1)]
    want = [_norm(r) for r in read_source(primary).records]
    assert got == want
    for seq in sorted({2, 3, last // 3, last // 2, last - 1, last}):
        await asyncio.to_thread(same_at, primary, rj, seq)
    assert [c.name for c in rj.checkpoints()] == [c.name for c in primary.checkpoints()]


def write_rec(seq: int, ts: int, volume: str, offset: int, pieces: Sequence[bytes]) -> WriteRecord:
    refs = tuple(BlockRef(BlockId(block_id(p)), len(p), 0, 0) for p in pieces)
    return WriteRecord(Seq(seq), ts, volume, offset, sum(map(len, pieces)), None, refs)


# ------------------------------------------------------------------ authentication
ENDPOINTS = [
    ("GET", "position"),
    ("POST", "have"),
    ("POST", "blocks"),
    ("POST", "base"),
    ("POST", "batch"),
    ("GET", "digest?volume=vm1-disk0&seq=2&first=0&count=1"),
]


async def test_no_authorization_is_401_and_creates_nothing(client: Client, src: Src) -> None:
    body = src.batch(1, 10)
    for method, what in ENDPOINTS:
        a = await client.call(method, f"/v1/groups/g1/{what}", body, token=None)
        refused(a, 401, "unauthorized")
        assert a.headers.get("WWW-Authenticate") == "Bearer"
    for auth in ["", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN]:
        a = await client.batch(body, token=None, headers={"Authorization": auth})
        refused(a, 401, "unauthorized")
        assert a.headers.get("WWW-Authenticate") == "Bearer"
    # authentication comes first: not even an empty replica group appears
    assert "g1" not in client.site.receiver.groups
    holds_none(client.site, "g1", src.ids(1, 10))

    await client.ok(body)
    before = snapshot(client.site)
    a = await client.batch(src.batch(11, 20), token=None)
    refused(a, 401, "unauthorized")
    assert snapshot(client.site) == before
    assert client.site.receiver.refused["unauthorized"] == len(ENDPOINTS) + 7
    await replicate_rest(client.site, src)


async def test_wrong_token_is_401(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    wrong = [
        "wrong-token",
        TOKEN[:-1],
        TOKEN + "x",
        TOKEN.upper(),
        "x" + TOKEN,
        "# rotated tokens",  # the comment line of the tokens file is not a token
        "rotated",
    ]
    body = src.batch(11, 20)
    for tok in wrong:
        for method, what in ENDPOINTS:
            a = await client.call(method, f"/v1/groups/g1/{what}", body, token=tok)
            refused(a, 401, "unauthorized")
            assert a.headers.get("WWW-Authenticate") == "Bearer"
    assert snapshot(client.site) == before
    # any token of the file is good; the scheme is case-insensitive (RFC 7235)
    a = await client.batch(src.batch(11, 20), token="old-token-aaaa")
    assert a.status == 200, a.doc
    a = await client.batch(src.batch(21, 30), headers={"Authorization": f"bearer {TOKEN}"})
    assert a.status == 200, a.doc
    await replicate_rest(client.site, src)


def rewrite(p: Path, text: str, *, append: bool = False, same_stat: bool = False) -> None:
    """Rewrite the tokens file in place; ``same_stat``: keep its size and mtime too."""
    st = p.stat()
    p.write_text(p.read_text() + text if append else text)
    if same_stat:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


async def test_token_rotation_needs_no_restart(client: Client, src: Src, tokens: Path) -> None:
    new, newer = "rotated-token-1111111111111111", "rotated-token-2222222222222222"
    assert len(new) == len(newer)
    refused(await client.batch(src.batch(1, 10), token=new), 401, "unauthorized")
    holds_none(client.site, "g1", src.ids(1, 10))

    rewrite(tokens, f"{new}\n", append=True)  # a token added later is accepted
    a = await client.batch(src.batch(1, 10), token=new)
    assert a.status == 200, a.doc
    a = await client.batch(src.batch(11, 20), token=TOKEN)  # the old one still works
    assert a.status == 200, a.doc

    rewrite(tokens, f"{new}\n")  # the old one removed: refused from now on
    before = snapshot(client.site)
    for old in (TOKEN, "old-token-aaaa"):
        refused(await client.batch(src.batch(21, 30), token=old), 401, "unauthorized")
    assert snapshot(client.site) == before

    # a same-length replacement within one mtime tick (coarse file timestamps) still counts
    rewrite(tokens, f"{newer}\n", same_stat=True)
    refused(await client.batch(src.batch(21, 30), token=new), 401, "unauthorized")
    assert snapshot(client.site) == before
    a = await client.batch(src.batch(21, 30), token=newer)
    assert a.status == 200, a.doc

    rewrite(tokens, "# no tokens at all\n")  # an empty file lets nobody in
    before = snapshot(client.site)
    refused(await client.batch(src.batch(31, 40), token=newer), 401, "unauthorized")
    refused(await client.batch(src.batch(31, 40), token="# no tokens at all"), 401, "unauthorized")
    assert snapshot(client.site) == before

    rewrite(tokens, f"{TOKEN}\n")
    await replicate_rest(client.site, src)


# ------------------------------------------------------------------ fencing and identity
async def test_stale_epoch_is_fenced(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10, epoch=2))
    assert client.site.receiver.groups["g1"].meta.epoch == 2  # type: ignore[union-attr]
    before = snapshot(client.site)
    for first, last in [(11, 20), (1, 10), (5, 15), (30, 40)]:  # new, replayed, overlap, gap
        a = await client.batch(src.batch(first, last, epoch=1))
        refused(a, 409, "stale-epoch")
        assert a.doc["epoch"] == 2
        assert snapshot(client.site) == before

    # a newer epoch moves the fence; then epoch 2 is stale too
    await client.ok(src.batch(11, 20, epoch=3))
    assert client.site.receiver.groups["g1"].meta.epoch == 3  # type: ignore[union-attr]
    before = snapshot(client.site)
    a = await client.batch(src.batch(21, 30, epoch=2))
    refused(a, 409, "stale-epoch")
    assert a.doc["epoch"] == 3
    assert snapshot(client.site) == before

    # a fenced Sender stops (status refused) without changing anything
    primary = src.journal
    old = Sender(target(client.site.url), "g1", lambda: primary, epoch=1)
    async with running(old):
        await until(lambda: old.state == "refused", "old primary refused")
    assert "stale-epoch" in old.detail
    assert snapshot(client.site) == before
    await replicate_rest(client.site, src, epoch=3)


async def test_other_primary_is_refused(
    client: Client, src: Src, tmp_path: Path, primary: Journal
) -> None:
    await client.ok(src.batch(1, 10))
    other_j = Journal.open(str(tmp_path / "other"), options=SMALL)
    try:
        for vol, size in VOLS.items():
            other_j.add_volume(vol, size)
        random_writes(other_j, random.Random(99), 40)
        other = read_source(other_j)
        before = snapshot(client.site)
        for first, last in [(11, 20), (1, 10), (5, 15)]:  # its own records, any range
            refused(await client.batch(other.batch(first, last)), 409, "other-primary")
            assert snapshot(client.site) == before
        # the primary's own records under a forged journal uuid
        forged = uuid.uuid4().bytes
        for first, last in [(11, 20), (1, 10)]:
            refused(
                await client.batch(src.batch(first, last, journal=forged)), 409, "other-primary"
            )
        assert snapshot(client.site) == before
        assert client.site.receiver.groups["g1"].meta.journal == primary.uuid  # type: ignore[union-attr]

        # a Sender of the other journal stops at the position check
        s = Sender(target(client.site.url), "g1", lambda: other_j)
        async with running(s):
            await until(lambda: s.state == "refused", "other primary refused")
        assert snapshot(client.site) == before
    finally:
        other_j.close()
    await replicate_rest(client.site, src)


async def test_stream_group_must_match_url(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    refused(await client.batch(src.batch(11, 20, group="g2")), 400, "bad-frame")
    assert snapshot(client.site) == before
    refused(await client.batch(src.batch(1, 10, group="g1"), group="g2"), 400, "bad-frame")
    holds_none(client.site, "g2", src.ids(1, 10))
    await replicate_rest(client.site, src)


# ------------------------------------------------------------------ forged or damaged bodies
def _flip(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 0x5A]) + body[at + 1 :]


async def test_flipped_byte_fails_the_checksum(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    body = src.batch(11, 20, codec=wire.CODEC_NONE)
    outer = msgpack.unpackb(body[wire.PREFIX.size :], raw=False)
    for part in ("r", "h"):
        raw = outer[part]
        at = body.find(raw)
        assert at > 0 and body.count(raw) == 1
        for k in (0, len(raw) // 3, len(raw) // 2, len(raw) - 1):
            a = await client.batch(_flip(body, at + k))
            refused(a, 400, "bad-frame")
            assert "checksum" in a.doc["error"]
    # the same damage inside a zstd frame (recompressed so only the checksum can tell)
    raw = outer["r"]
    at = body.find(raw) + len(raw) // 2
    damaged = _flip(body, at)[wire.PREFIX.size :]
    z = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_ZSTD)
    a = await client.batch(z + zstandard.ZstdCompressor().compress(damaged))
    refused(a, 400, "bad-frame")
    assert "checksum" in a.doc["error"]
    # a replaced checksum
    fake = dict(outer, s=os.urandom(16))
    none = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_NONE)
    a = await client.batch(none + msgpack.packb(fake, use_bin_type=True))
    refused(a, 400, "bad-frame")
    assert "checksum" in a.doc["error"]
    assert snapshot(client.site) == before
    # the undamaged body is fine
    await client.ok(body)
    await replicate_rest(client.site, src)


async def test_block_data_must_match_its_id(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    rj = replica(client.site)
    new_ids = [b for b in src.ids(11, 20) if not rj.locate_blocks([b])]
    assert new_ids
    before = snapshot(client.site)
    victim = new_ids[len(new_ids) // 2]
    real = src.blocks[victim]
    fakes = [
        bytes(len(real)),  # same length, other bytes
        _flip(real, len(real) // 2),  # one byte changed
        real[:-1],  # shorter
        real + b"\0",  # longer
    ]
    for fake in fakes:
        blocks = {b: src.blocks[b] for b in src.ids(11, 20)}
        blocks[victim] = fake
        a = await client.batch(src.batch(11, 20, blocks=blocks))  # checksum is recomputed
        refused(a, 400, "bad-frame")
        assert "does not match its id" in a.doc["error"]
        assert snapshot(client.site) == before
        assert rj.locate_blocks([*new_ids, block_id(fake)]) == set()
    # an extra block nobody references, with bytes not matching its id
    blocks = {b: src.blocks[b] for b in src.ids(11, 20)}
    blocks[hashlib.sha256(b"x").digest()] = b"not that"
    refused(await client.batch(src.batch(11, 20, blocks=blocks)), 400, "bad-frame")
    assert snapshot(client.site) == before
    assert rj.locate_blocks(new_ids) == set()

    # the same for a base install's /blocks (an empty replica only)
    ids = src.ids(1, 10)
    forged = {b: bytes(len(src.blocks[b])) for b in ids[:2]} | {b: src.blocks[b] for b in ids[2:]}
    a = await client.call("POST", "/v1/groups/g2/blocks", wire.encode_blocks(forged))
    refused(a, 400, "bad-frame")
    holds_none(client.site, "g2", ids)
    await replicate_rest(client.site, src)


# ------------------------------------------------------------------ size limits
async def _raw_request(site: Site, head: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A request written by hand (a Content-Length that lies), answer read by hand."""
    host, port = site.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        status_line, _, rest = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        headers = dict(ln.split(": ", 1) for ln in rest.decode().split("\r\n") if ": " in ln)
        n = int({k.lower(): v for k, v in headers.items()}["content-length"])
        raw = await reader.readexactly(n)
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {"raw": raw.decode(errors="replace")}
        return int(status_line.split()[1]), doc
    finally:
        writer.close()


async def test_oversized_bodies_are_413(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    site = client.site
    # a Content-Length that claims more than the limit: refused before the body is read
    for group in ("g1", "g2"):
        for what in ("batch", "have", "blocks", "base"):
            head = (
                f"POST /v1/groups/{group}/{what} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Length: {wire.MAX_BODY + 1}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            status, doc = await _raw_request(site, head, src.batch(11, 20)[:1000])
            assert (status, doc["code"]) == (413, "too-large"), doc
    head = (
        "POST /v1/groups/g1/batch HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {1 << 62}\r\n\r\n"
    )
    status, doc = await _raw_request(site, head, b"CDPR")
    assert status in (400, 413), doc  # the HTTP parser may refuse such a length itself
    assert snapshot(site) == before
    holds_none(site, "g2", src.ids(1, 20))

    valid = src.batch(11, 20)
    # a real body just over the limit, declared honestly
    pad = valid + bytes(wire.MAX_BODY + 1 - len(valid))
    refused(await client.batch(pad), 413, "too-large")
    del pad
    assert snapshot(site) == before

    # the same without a declared length (chunked): the read itself stops at the limit
    chunk = bytes(1 << 20)

    async def chunked(total: int) -> AsyncIterator[bytes]:
        yield valid
        left = total - len(valid)
        while left > 0:
            yield chunk[: min(left, len(chunk))]
            left -= len(chunk)

    refused(await client.batch(chunked(wire.MAX_BODY + 1)), 413, "too-large")
    assert snapshot(site) == before
    # exactly at the limit is not too large: it gets as far as the frame (bad magic)
    valid = b"XXXX" + valid[4:]
    a = await client.batch(chunked(wire.MAX_BODY))
    assert a.status == 400 and a.code == "bad-frame", a.doc
    assert snapshot(site) == before
    assert site.receiver.refused["too-large"] >= 11
    await replicate_rest(site, src)


def _rle_bomb(out_bytes: int) -> bytes:
    """A zstd frame of RLE blocks without a declared size: 4 bytes per 128 KiB of output."""
    frame = bytearray((0xFD2FB528).to_bytes(4, "little")) + bytes([0x00, 0x58])
    n = out_bytes // (1 << 17)
    for k in range(n):
        hdr = (1 if k == n - 1 else 0) | (1 << 1) | ((1 << 17) << 3)
        frame += hdr.to_bytes(3, "little") + b"\x90"
    return bytes(frame)


async def test_decompression_bomb_is_refused(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    bomb = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_ZSTD) + _rle_bomb(
        wire.MAX_RAW + (8 << 20)
    )
    assert len(bomb) < 8 << 10
    for what in ("batch", "have", "blocks", "base"):
        a = await client.call("POST", f"/v1/groups/g1/{what}", bomb)
        refused(a, 400, "bad-frame")
    # a frame that declares a huge size is refused without allocating it
    liar = bytearray((0xFD2FB528).to_bytes(4, "little")) + bytes([0xE0])
    liar += (1 << 40).to_bytes(8, "little") + ((1 | 2 | (16 << 3)).to_bytes(3, "little") + b"\0")
    z = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_ZSTD)
    refused(await client.batch(z + bytes(liar)), 400, "bad-frame")
    assert snapshot(client.site) == before
    await replicate_rest(client.site, src)


# ------------------------------------------------------------------ malformed frames
def _malformed(valid: bytes) -> Iterator[tuple[str, bytes]]:
    none = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, wire.CODEC_NONE)
    payload = zstandard.ZstdDecompressor().decompress(valid[wire.PREFIX.size :])
    yield "empty", b""
    yield "short", b"CDP"
    yield "prefix only", valid[: wire.PREFIX.size]
    yield "bad magic", b"CDPX" + valid[4:]
    yield "lowercase magic", b"cdpr" + valid[4:]
    yield "version 0", valid[:4] + b"\x00" + valid[5:]
    yield "version 2", valid[:4] + b"\x02" + valid[5:]
    yield "version 255", valid[:4] + b"\xff" + valid[5:]
    yield "unknown codec", valid[:5] + b"\x07" + valid[6:]
    yield "codec none on zstd", valid[:5] + b"\x00" + valid[6:]
    yield "codec zstd on raw", valid[:5] + b"\x01" + payload
    for n in (1, 10, len(valid) // 2, len(valid) - 7):
        yield f"zstd truncated by {n}", valid[:-n]
    yield "zstd garbage", valid[:6] + os.urandom(200)
    yield "msgpack reserved byte", none + b"\xc1"
    yield "msgpack truncated", none + payload[: len(payload) // 2]
    yield "msgpack trailing", none + payload + b"\x00"
    yield "not a map", none + msgpack.packb([1, 2, 3])
    yield "empty map", none + msgpack.packb({})
    outer = msgpack.unpackb(payload, raw=False)
    yield "missing key", none + msgpack.packb({k: v for k, v in outer.items() if k != "b"})
    yield "extra key", none + msgpack.packb({**outer, "x": 1}, use_bin_type=True)
    yield "header not bytes", none + msgpack.packb({**outer, "h": 5}, use_bin_type=True)
    yield "blocks not a list", none + msgpack.packb({**outer, "b": {}}, use_bin_type=True)
    yield "short block id", none + msgpack.packb({**outer, "b": [[b"x", b"y"]]}, use_bin_type=True)


async def test_malformed_bodies_are_400(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    valid = src.batch(11, 20)
    before = snapshot(client.site)
    for group in ("g1", "g2"):
        for what in ("batch", "have", "blocks", "base"):
            for name, body in _malformed(valid):
                a = await client.call("POST", f"/v1/groups/{group}/{what}", body)
                assert (a.status, a.code) == (400, "bad-frame"), (group, what, name, a.doc)
    assert snapshot(client.site) == before
    holds_none(client.site, "g2", src.ids(1, 20))
    await client.ok(valid)  # the undamaged one still applies
    await replicate_rest(client.site, src)


async def test_bad_group_names_create_nothing(client: Client, src: Src) -> None:
    for name in ("..", ".", "-x", "_x", "a" * 65, "a%20b", "%2E%2E", "..%2Fescape"):
        a = await client.batch(src.batch(1, 10), group=name)
        assert a.status in (400, 404), (name, a.status, a.doc)
        if a.status == 400:
            assert a.code == "bad-group", a.doc
    assert sorted(os.listdir(client.site.state_dir / "groups")) == []
    assert sorted(os.listdir(client.site.state_dir)) == ["groups"]
    assert client.site.receiver.groups == {}


# ------------------------------------------------------------------ order and idempotence
async def test_gap_is_409_with_expected(client: Client, src: Src) -> None:
    a = await client.batch(src.batch(5, 10))  # an empty replica expects seq 1
    refused(a, 409, "gap")
    assert a.doc["expected"] == 1
    holds_none(client.site, "g1", src.ids(5, 10))

    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    for first, last in [(12, 20), (15, 15), (40, 50)]:
        a = await client.batch(src.batch(first, last))
        refused(a, 409, "gap")
        assert a.doc["expected"] == 11
        assert snapshot(client.site) == before
    assert client.site.receiver.refused["gap"] == 4
    await replicate_rest(client.site, src)


async def test_replayed_batch_is_duplicate(client: Client, src: Src) -> None:
    body = src.batch(1, 10)
    first = await client.ok(body)
    assert first["durable_seq"] == 10 and not first.get("duplicate")
    before = snapshot(client.site)
    accepted = client.site.receiver.accepted
    for again in (body, body, src.batch(3, 7), src.batch(10, 10), src.batch(1, 1)):
        doc = await client.ok(again)
        assert doc["duplicate"] is True
        assert doc["durable_seq"] == 10
        assert snapshot(client.site) == before
    assert client.site.receiver.accepted == accepted  # not counted as applied batches
    await client.ok(src.batch(11, 20))
    doc = await client.ok(body)  # an old one, after more came in
    assert doc["duplicate"] is True and doc["durable_seq"] == 20
    await replicate_rest(client.site, src)


async def test_overlapping_batch_applies_only_new_seqs(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)["records"]
    doc = await client.ok(src.batch(1, 20))
    assert doc["durable_seq"] == 20 and not doc.get("duplicate")
    rj = replica(client.site)
    got = [_norm(r) for r in rj.records(1)]
    assert [r[1] if isinstance(r, tuple) else r.seq for r in got] == list(range(1, 21))
    assert got[:10] == before
    assert got == [_norm(r) for r in src.recs(1, 20)]
    for seq in range(10, 21):
        await asyncio.to_thread(same_at, src.journal, rj, seq)
    # overlapping by one, with only the blocks of the new part
    doc = await client.ok(src.batch(20, 30, blocks={b: src.blocks[b] for b in src.ids(21, 30)}))
    assert doc["durable_seq"] == 30
    assert [_norm(r) for r in rj.records(1)] == [_norm(r) for r in src.recs(1, 30)]
    await replicate_rest(client.site, src)


async def test_missing_blocks_are_422_with_their_ids(client: Client, src: Src) -> None:
    rcv = client.site
    a = await client.batch(src.batch(1, 10, blocks={}))
    refused(a, 422, "blocks-needed")
    assert sorted(a.doc["missing"]) == sorted(b.hex() for b in src.ids(1, 10))
    holds_none(rcv, "g1", src.ids(1, 10))

    await client.ok(src.batch(1, 10))
    rj = replica(rcv)
    held = rj.locate_blocks(src.ids(11, 20))
    lacking = [b for b in src.ids(11, 20) if b not in held]
    assert len(lacking) >= 2
    before = snapshot(rcv)
    a = await client.batch(src.batch(11, 20, blocks={}))
    refused(a, 422, "blocks-needed")
    assert len(a.doc["missing"]) == len(set(a.doc["missing"]))
    assert sorted(a.doc["missing"]) == sorted(b.hex() for b in lacking)
    assert snapshot(rcv) == before
    # half of them given: the other half is named, and the given half is not stored either
    half = lacking[: len(lacking) // 2]
    a = await client.batch(src.batch(11, 20, blocks={b: src.blocks[b] for b in half}))
    refused(a, 422, "blocks-needed")
    assert sorted(a.doc["missing"]) == sorted(b.hex() for b in lacking[len(half) :])
    assert snapshot(rcv) == before
    assert rj.locate_blocks(half) == set()
    # only what is lacking is needed: blocks already held may be left out
    doc = await client.ok(src.batch(11, 20, blocks={b: src.blocks[b] for b in lacking}))
    assert doc["durable_seq"] == 20
    await replicate_rest(rcv, src)


# ------------------------------------------------------------------ ranges and volumes
def _forged_records(src: Src) -> Iterator[tuple[str, list[Record], dict[bytes, bytes]]]:
    """Seq 11 replaced by something the receiver must refuse (after 1..10 were applied)."""
    r11 = src.recs(11, 11)[0]
    ts = r11.ts
    full, half = os.urandom(CS), os.urandom(CS // 2)
    blocks = {block_id(full): full, block_id(half): half}
    d1 = VOLS["vm1-disk1"]

    def one(r: Record) -> list[Record]:
        return [r]

    yield "write past the end", one(write_rec(11, ts, "vm1-disk1", d1, [full])), blocks
    yield "write far past the end", one(write_rec(11, ts, "vm1-disk1", 1 << 50, [full])), blocks
    yield (
        "write across the end",
        one(write_rec(11, ts, "vm1-disk1", d1 - CS // 2, [half, half])),
        blocks,
    )
    yield "write to an unknown volume", one(write_rec(11, ts, "vm9", 0, [full])), blocks
    yield "zero past the end", one(ZeroRecord(Seq(11), ts, "vm1-disk1", d1, 512)), {}
    yield "zero across the end", one(ZeroRecord(Seq(11), ts, "vm1-disk1", d1 - 512, 1024)), {}
    yield "trim on an unknown volume", one(ZeroRecord(Seq(11), ts, "nope", 0, 512, True)), {}
    prev_ts = src.recs(10, 10)[0].ts
    if prev_ts > 0:
        yield (
            "time running backwards",
            one(write_rec(11, prev_ts - 1, "vm1-disk0", 0, [full])),
            blocks,
        )
    # pieces not cut at the chunk bounds, or not covering the write
    two = os.urandom(2 * CS)
    blocks2 = {**blocks, block_id(two): two}
    yield "refs not at chunk bounds", one(write_rec(11, ts, "vm1-disk0", 0, [two])), blocks2
    yield "refs off the chunk grid", one(write_rec(11, ts, "vm1-disk0", CS // 2, [full])), blocks
    short = write_rec(11, ts, "vm1-disk0", 0, [half])
    short = WriteRecord(short.seq, ts, "vm1-disk0", 0, CS, None, short.refs)
    yield "refs not covering the write", one(short), blocks
    # a bad record in the middle of otherwise good ones: nothing of the batch is applied
    good = src.recs(11, 14)
    bad = write_rec(15, src.recs(15, 15)[0].ts, "vm1-disk1", d1, [full])
    mixed_blocks = {**{b: src.blocks[b] for b in wire.refs_of(good)}, **blocks}
    yield "bad record after good ones", [*good, bad], mixed_blocks


async def test_writes_outside_volumes_are_400(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    rj = replica(client.site)
    before = snapshot(client.site)
    for name, recs, blocks in _forged_records(src):
        a = await client.batch(src.batch(0, 0, records=recs, blocks=blocks))
        assert (a.status, a.code) == (400, "bad-frame"), (name, a.doc)
        assert snapshot(client.site) == before, name
        fresh = [b for b in blocks if b not in src.blocks]
        assert rj.locate_blocks(fresh) == set(), name
    # ranges the wire format itself refuses (negative offset, empty write)
    r = src.recs(11, 11)[0]
    for off, length in [(-512, 512), (0, 0), (0, -1)]:
        rec = ZeroRecord(Seq(11), r.ts, "vm1-disk0", off, length)
        a = await client.batch(src.batch(0, 0, records=[rec], blocks={}))
        refused(a, 400, "bad-frame")
    assert snapshot(client.site) == before
    # an unknown volume on a fresh group (the VolumeRecords of 1..2 never came)
    a = await client.batch(
        src.batch(
            0, 0, records=[write_rec(1, 1, "vm1-disk0", 0, [b"x"])], blocks={block_id(b"x"): b"x"}
        ),
        group="g2",
    )
    refused(a, 400, "bad-frame")
    holds_none(client.site, "g2", [block_id(b"x")])
    await replicate_rest(client.site, src)


@pytest.mark.parametrize("where", ["held", "in-batch"])
async def test_ref_length_must_match_its_block(client: Client, src: Src, where: str) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    ts = src.recs(11, 11)[0].ts
    if where == "held":  # a block the replica holds, named with another length
        bid, n = next(
            (x.block_id, x.length)
            for r in src.recs(1, 10)
            if isinstance(r, WriteRecord)
            for x in r.refs
            if x.length < CS
        )
        assert replica(client.site).locate_blocks([bid])
        recs: list[Record] = [
            WriteRecord(Seq(11), ts, "vm1-disk0", 0, CS, None, (BlockRef(bid, CS, 0, 0),))
        ]
        blocks: dict[bytes, bytes] = {}
    else:  # a block of the batch, named twice with two lengths
        small = os.urandom(4096)
        bid, n = BlockId(block_id(small)), len(small)
        recs = [
            WriteRecord(Seq(11), ts, "vm1-disk0", 0, n, None, (BlockRef(bid, n, 0, 0),)),
            WriteRecord(Seq(12), ts, "vm1-disk0", CS, CS, None, (BlockRef(bid, CS, 0, 0),)),
        ]
        blocks = {bid: small}
    assert n != CS
    a = await client.batch(src.batch(0, 0, records=recs, blocks=blocks))
    refused(a, 400, "bad-frame")
    assert snapshot(client.site) == before


# ------------------------------------------------------------------ append-only
async def test_no_endpoint_deletes_or_rewrites(client: Client, src: Src) -> None:
    await client.ok(src.batch(1, 10))
    before = snapshot(client.site)
    for method in ("DELETE", "PUT", "PATCH"):
        for what in ("batch", "have", "blocks", "base", "position", "digest"):
            a = await client.call(method, f"/v1/groups/g1/{what}", src.batch(1, 10))
            assert a.status == 405, (method, what, a.status)
        for path in (
            "/v1/groups/g1",
            "/v1/groups/g1/",
            "/v1/groups",
            "/v1/groups/g1/journal",
            "/v1/groups/g1/records",
            "/v1/groups/g1/prune",
            "/v1/groups/g1/history",
        ):
            a = await client.call(method, path, b"")
            assert a.status in (404, 405), (method, path, a.status)
    for path in (
        "/v1/groups/g1/prune",
        "/v1/groups/g1/delete",
        "/v1/groups/g1/reset",
        "/v1/groups/g1/retention",
        "/v1/groups/g1/truncate",
    ):
        a = await client.call("POST", path, b"")
        assert a.status == 404, (path, a.status)
    assert snapshot(client.site) == before

    # the base-install endpoints cannot rewrite a replica that has history
    ids = src.ids(1, 10)
    a = await client.call(
        "POST", "/v1/groups/g1/blocks", wire.encode_blocks({b: src.blocks[b] for b in ids})
    )
    refused(a, 409, "not-empty")
    base = wire.Base(src.stream(), 50, 10**18, {"vm1-disk0": (VOLS["vm1-disk0"], {0: ids[0]})})
    a = await client.call("POST", "/v1/groups/g1/base", wire.encode_base(base))
    refused(a, 409, "not-empty")
    old = wire.Base(src.stream(), 5, 0, {"vm1-disk0": (VOLS["vm1-disk0"], {})})
    a = await client.call("POST", "/v1/groups/g1/base", wire.encode_base(old))
    assert a.status == 200 and a.doc["duplicate"] is True, a.doc
    assert snapshot(client.site) == before
    await replicate_rest(client.site, src)


# ------------------------------------------------------------------ all of it, then a Sender
async def test_sender_replicates_after_all_bad_input(client: Client, src: Src) -> None:
    site = client.site
    await client.ok(src.batch(1, 10, epoch=2))
    before = snapshot(site)
    flat = src.batch(11, 20, epoch=2, codec=wire.CODEC_NONE)
    bad: list[tuple[bytes, dict[str, Any], int, str]] = [
        (src.batch(11, 20), {"token": None}, 401, "unauthorized"),
        (src.batch(11, 20), {"token": "nope"}, 401, "unauthorized"),
        (src.batch(11, 20, epoch=1), {}, 409, "stale-epoch"),
        (src.batch(11, 20, epoch=2, journal=uuid.uuid4().bytes), {}, 409, "other-primary"),
        (_flip(flat, len(flat) // 2), {}, 400, "bad-frame"),
        (src.batch(11, 20, epoch=2)[:-3], {}, 400, "bad-frame"),
        (src.batch(13, 20, epoch=2), {}, 409, "gap"),
        (src.batch(11, 20, epoch=2, blocks={}), {}, 422, "blocks-needed"),
        (b"GARBAGE", {}, 400, "bad-frame"),
    ]
    for _name, recs, blocks in _forged_records(src):
        bad.append((src.batch(0, 0, records=recs, blocks=blocks, epoch=2), {}, 400, "bad-frame"))
    victim = next(b for b in src.ids(11, 20) if not replica(site).locate_blocks([b]))
    forged = {b: src.blocks[b] for b in src.ids(11, 20)} | {victim: bytes(len(src.blocks[victim]))}
    bad.append((src.batch(11, 20, epoch=2, blocks=forged), {}, 400, "bad-frame"))
    for body, kw, status, code in bad:
        refused(await client.batch(body, **kw), status, code)
    doc = await client.ok(src.batch(1, 10, epoch=2))
    assert doc["duplicate"] is True
    a = await client.call("DELETE", "/v1/groups/g1/batch", b"")
    assert a.status == 405
    assert snapshot(site) == before

    # the primary goes on (some of it sealed: refs read from its block store), and a
    # well-behaved Sender at the current epoch brings the replica up to date
    primary = src.journal
    await asyncio.to_thread(random_writes, primary, random.Random(8), 80, checkpoint_every=20)
    await asyncio.to_thread(primary.seal_pending, 100)
    await asyncio.to_thread(random_writes, primary, random.Random(9), 30)
    await replicate_rest(site, src, epoch=2)
