"""The block store's batch paths: whole-block copies for reads, prepared puts for sealing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from journal import BlockCorrupt, BlockRef, Journal, JournalOptions
from journal.blockstore import ENTRY, BlockStore, block_id
from journal.index import Index
from journal.storage import OsStorage

OPTS = JournalOptions(segment_size=24 * 1024, chunk_size=8 * 1024, pack_target=64 * 1024)


def test_whole_block_copy_falls_back_on_stale_hints_and_checks_entries(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), options=OPTS)
    try:
        x, y = b"x" * 4096, random.Random(7).randbytes(4096)
        refs = j.store.put_many([x, y])
        j.store.flush()
        rx, ry = refs
        moved = BlockRef(rx.block_id, rx.length, rx.pack, ry.pack_offset)  # another block there
        gone = BlockRef(rx.block_id, rx.length, 12345, 32)  # a pack that no longer exists
        out = bytearray(4 * 4096)
        j.store.copy_whole(memoryview(out), [(0, moved), (4096, gone), (8192, ry), (12288, rx)])
        assert out == x + x + y + x

        pack = next(p for p in (tmp_path / "j").rglob("*.pack"))
        with open(pack, "r+b") as f:  # flip one stored byte of y (stored raw: incompressible)
            f.seek(ry.pack_offset + 56 + 100)
            f.write(bytes([f.read(1)[0] ^ 1]))
        with pytest.raises(BlockCorrupt):
            j.store.copy_whole(memoryview(out), [(0, ry)])
    finally:
        j.close()


def test_prepared_put_stores_a_block_collected_after_it_was_prepared(tmp_path: Path) -> None:
    """prepare() skips compressing what the store holds; put_many must not trust that."""
    j = Journal.open(str(tmp_path / "j"), options=OPTS)
    try:
        rng = random.Random(8)
        x, filler, y = rng.randbytes(8192), rng.randbytes(70_000), rng.randbytes(4096)
        j.store.put_many([x, filler])  # fills the first pack past its target
        j.store.flush()
        j.store.put_many([y])  # so this starts a second pack, and the first can be collected
        j.store.flush()
        prep = j.store.prepare([x, b"z" * 9000, x])
        assert block_id(x) not in prep.stored  # held then: not compressed ahead
        assert block_id(b"z" * 9000) in prep.stored
        dropped, packs = j.store.collect({bytes(r.block_id) for r in j.store.put_many([y])})
        assert packs == 1 and dropped == 2
        refs = j.store.put_many([x, b"z" * 9000, x], prep)
        j.store.flush()
        assert refs[0] == refs[2]
        assert j.store.get(refs[0]) == x
        assert j.store.get(refs[1]) == b"z" * 9000
        out = bytearray(8192)
        j.store.copy_whole(memoryview(out), [(0, refs[0])])
        assert out == x
    finally:
        j.close()


@pytest.mark.parametrize("flushes", [0, 1, 2, 4, 7])
def test_prepared_put_dedups_against_blocks_stored_after_it_was_prepared(
    tmp_path: Path, flushes: int
) -> None:
    """put_many reuses prepare's lookups; blocks stored since (by any number of flushes, or
    still pending) must still be found, so no entry is written twice and refs resolve."""
    j = Journal.open(str(tmp_path / "j"), options=OPTS)
    try:
        rng = random.Random(flushes)
        old, a, b, c = (rng.randbytes(4096) for _ in range(4))
        j.store.put_many([old])
        j.store.flush()
        prep = j.store.prepare([old, a, b, c, a])
        assert block_id(old) not in prep.stored and block_id(a) in prep.stored
        seen: dict[bytes, BlockRef] = {}
        for k in range(flushes):  # a flushed; others pass through the store meanwhile
            for r in j.store.put_many([a] if k == 0 else [rng.randbytes(4096)]):
                seen.setdefault(bytes(r.block_id), r)
            j.store.flush()
        pending = j.store.put_many([b])[0]  # stored, not yet flushed
        before = j.store.stats().pack_bytes
        refs = j.store.put_many([old, a, b, c, a], prep)
        j.store.flush()
        grown = j.store.stats().pack_bytes - before
        entry = ENTRY.size + 4096  # c (and a) stored raw: incompressible
        assert grown == (entry if flushes else 2 * entry)  # c, and a unless flushed before
        if flushes:
            assert refs[1] == seen[block_id(a)]
        assert refs[1] == refs[4] and refs[2] == pending
        for r, data in zip(refs, [old, a, b, c, a], strict=True):
            assert j.store.get(r) == data
    finally:
        j.close()


def test_blocks_fsynced_but_not_yet_indexed_survive_a_crash(tmp_path: Path) -> None:
    """Rows are indexed in batches; until then a crash must cost neither data nor dedup."""
    uuid = bytes(range(16))

    def store_at(batch: int) -> tuple[BlockStore, Index]:
        index = Index(str(tmp_path / "index.db"))
        return BlockStore(
            str(tmp_path / "packs"), OsStorage(), index, uuid, index_batch=batch
        ), index

    rng = random.Random(9)
    blocks = [rng.randbytes(4096) for _ in range(10)]
    store, index = store_at(1000)
    refs = store.put_many(blocks)
    store.flush()
    assert index.block_count() == 0  # durable, not indexed yet
    assert store.stats().blocks == 10
    assert set(store.locate_many([r.block_id for r in refs])) == {r.block_id for r in refs}
    assert store.put_many(blocks[:3]) == refs[:3]  # found in memory: nothing stored twice

    # The process dies here: no close, no index commit. A new store over the same files:
    again, index2 = store_at(1000)
    assert again.recover() == 0
    assert index2.block_count() == 10
    assert [again.get(r) for r in refs] == blocks
    packs = again.stats().pack_bytes
    assert again.put_many(blocks) == refs  # dedup finds them in the index
    again.flush()
    assert again.stats().pack_bytes == packs

    # Once a batch has gathered, a flush indexes it.
    more = [rng.randbytes(4096) for _ in range(1000)]
    again.put_many(more)
    again.flush()
    assert index2.block_count() == 1010
    again.close()


def test_small_blocks_that_do_not_compress_are_tried_one_in_a_stride(tmp_path: Path) -> None:
    """Early abort for 4 KiB blocks: random data costs few zstd calls, text is still caught."""
    from journal.blockstore import _SMALL_MISSES, _SMALL_STRIDE, CODEC_RAW, CODEC_ZSTD

    store = BlockStore(
        str(tmp_path / "packs"), OsStorage(), Index(str(tmp_path / "i.db")), b"u" * 16
    )
    rng = random.Random(10)
    noise = [rng.randbytes(4096) for _ in range(64)]
    text = [(b"block %d of a log file; " % k) * 200 for k in range(64)]
    text = [t[:4096] for t in text]
    calls = 0
    real = store._compressor()

    class Counting:
        def compress(self, data: bytes | memoryview) -> bytes:
            nonlocal calls
            calls += 1
            return bytes(real.compress(data))

    store._local.c = Counting()
    out = store._compress_run([*noise, *text, *noise[:8]])
    codecs = [c for c, _ in out]
    assert all(c == CODEC_RAW for c in codecs[:64])
    tried_noise = _SMALL_MISSES + (64 - _SMALL_MISSES + _SMALL_STRIDE - 1) // _SMALL_STRIDE
    # the first text block is caught within a stride, and every one after it is compressed
    first = codecs.index(CODEC_ZSTD)
    assert 64 <= first < 64 + _SMALL_STRIDE
    assert all(c == CODEC_ZSTD for c in codecs[first:128])
    assert calls <= tried_noise + 64 + 8
    assert calls < 64 + 64  # fewer than one per block
    # what is stored decodes back to the input
    for (codec, body), raw in zip(out, [*noise, *text, *noise[:8]], strict=True):
        if codec == CODEC_ZSTD:
            import zstandard

            assert zstandard.ZstdDecompressor().decompress(body) == raw
        else:
            assert bytes(body) == raw
    store.close()


def test_a_bad_entry_inside_fsynced_pack_data_is_not_cut_off_as_a_torn_tail(tmp_path: Path) -> None:
    """Rows wait in memory to be indexed; a pack's fsynced size is committed at every flush, so
    recovery tells bit rot in fsynced entries from a torn tail and keeps what follows it."""
    uuid = bytes(range(16))

    def store_at() -> tuple[BlockStore, Index]:
        index = Index(str(tmp_path / "index.db"))
        return BlockStore(
            str(tmp_path / "packs"), OsStorage(), index, uuid, index_batch=1000
        ), index

    rng = random.Random(11)
    blocks = [rng.randbytes(4096) for _ in range(6)]
    store, _ = store_at()
    refs = store.put_many(blocks)
    store.flush()  # fsynced, not indexed
    pack = next((tmp_path / "packs").glob("*.pack"))
    size = pack.stat().st_size
    with open(pack, "r+b") as f:  # rot one stored byte of the third block
        f.seek(refs[2].pack_offset + ENTRY.size + 10)
        f.write(bytes([f.read(1)[0] ^ 1]))

    # the process dies; the next open must not truncate the pack at the bad entry
    again, _ = store_at()
    assert again.recover() == 0
    assert pack.stat().st_size == size
    assert again.damaged == {refs[2].pack: refs[2].pack_offset}
    assert [again.get(r) for r in refs[3:]] == blocks[3:]  # found where sealed records name them
    with pytest.raises(BlockCorrupt):
        again.get(refs[2])
    assert again.collect(set()) == (0, 0)  # a damaged pack is never collected
    assert pack.exists()

    # nor cut by a rebuild of the index (the index was found damaged and dropped)
    again.index.clear()
    again.damaged.clear()
    again.rebuild_index()
    assert pack.stat().st_size == size
    assert again.damaged == {refs[2].pack: refs[2].pack_offset}

    again.close()


def test_the_sealer_hashes_and_compresses_on_the_prep_threads_two_segments_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rolled segments are prepared ahead, never by the sealer alone, and read the same."""
    import threading

    from journal import journal as journal_mod

    calls: list[tuple[int, bool, str]] = []
    orig = journal_mod.Journal._prepare_seal

    def spy(self: Journal, seg: object, compute: bool) -> object:
        calls.append((seg.no, compute, threading.current_thread().name))  # type: ignore[attr-defined]
        return orig(self, seg, compute)  # type: ignore[arg-type]

    monkeypatch.setattr(journal_mod.Journal, "_prepare_seal", spy)
    j = Journal.open(str(tmp_path / "j"), options=OPTS)
    try:
        j.add_volume("vda", 1 << 20)
        rng = random.Random(5)
        model = bytearray(1 << 20)
        for _ in range(60):  # about 20 segments of 24 KiB
            off = rng.randrange(0, (1 << 20) - 8192)
            data = rng.randbytes(4096) * 2 if rng.random() < 0.5 else bytes(8192)
            j.write("vda", off, data)
            model[off : off + 8192] = data
        j.sync()
        rolled = j.status().unsealed_segments
        assert rolled >= 6
        assert j.seal_pending(1000) == rolled
        assert calls, "nothing was prepared"
        assert all(compute for _, compute, _ in calls), calls  # the sealer never did it alone
        assert {name.split("_")[0] for _, _, name in calls} == {"journal-prep"}
        assert len({no for no, _, _ in calls}) == len(calls) == rolled  # each once
        assert len({name for _, _, name in calls}) == 2  # two at a time
        assert bytes(j.read("vda", 0, 1 << 20)) == bytes(model)
    finally:
        j.close()
