"""The detector's ring (cdp/detector_feed.py) and the prior reads the worker asks in one go."""

from __future__ import annotations

import os
import random

from cdp.detector import BLOCK, DetectorConfig, GroupDetector, Write
from cdp.detector_feed import Gap, Ring, RingReader, RingWriter
from journal import Record, Seq, WriteRecord, ZeroRecord


def _w(seq: int, off: int, data: bytes, vol: str = "v") -> WriteRecord:
    return WriteRecord(Seq(seq), seq * 10, vol, off, len(data), b"")


Op = tuple[int, bytes | None, int, bool]


def _ops(recs: list[Record], datas: list[bytes | None]) -> list[Op]:
    return [(r.offset, d, r.length, False) for r, d in zip(recs, datas, strict=True)]  # type: ignore[union-attr]


def test_records_come_out_as_they_went_in_across_the_wrap() -> None:
    ring = Ring.create(capacity=10_000)
    w, r = RingWriter(ring, after=0), RingReader(ring)
    rng = random.Random(3)
    sent: list[tuple[str, int, int, bytes | None]] = []
    got: list[tuple[str, int, int, bytes | None]] = []
    for seq in range(1, 301):  # ~1.3 MB through a 10 kB ring: it wraps many times
        n = rng.randint(1, 6000)
        data = os.urandom(n)
        if rng.random() < 0.2:
            z = ZeroRecord(Seq(seq), seq, "vol-é", 512, n, trim=True)
            w.tap([z], [(512, None, n, True)])
            sent.append(("z", seq, n, None))
        else:
            w.tap([_w(seq, 4096, data)], [(4096, memoryview(data), n, False)])
            sent.append(("w", seq, n, data))
        for it in r.take():
            assert not isinstance(it, Gap)  # one record at a time always fits
            if isinstance(it, Write):
                got.append(("w", it.seq, it.length, bytes(it.data or b"")))
            else:
                assert isinstance(it, ZeroRecord) and it.trim and it.volume == "vol-é"
                got.append(("z", it.seq, it.length, None))
        r.release()  # as the worker does once a batch is scored
    assert got == sent
    del it  # views into the ring must go before it is unmapped
    ring.close()


def test_a_full_ring_drops_and_says_which_seqs_to_read_back() -> None:
    ring = Ring.create(capacity=3 * BLOCK + 200)  # three records of a block, with headers
    w, r = RingWriter(ring, after=5), RingReader(ring)
    blk = bytes(BLOCK)
    for s in (6, 7, 8, 9):  # the fourth does not fit: dropped
        w.tap([_w(s, 0, blk)], [(0, blk, BLOCK, False)])
    assert w.dropped == 1 and w.gap
    assert [it.seq for it in r.take()] == [6, 7, 8]  # type: ignore[union-attr]
    r.release()  # their views are done with: the space is free again
    w.tap([_w(12, 0, blk)], [(0, blk, BLOCK, False)])  # 10 and 11 were checkpoints, say
    out = r.take()
    assert [type(x) for x in out] == [Gap, Write]
    assert out[0] == Gap(after=8, upto=11) and out[1].seq == 12  # type: ignore[union-attr]
    w.mark_gap()  # a reopened journal: what came before the new tap is read back
    w.flush_gap(upto=20)
    assert r.take() == [Gap(after=12, upto=20)]
    ring.close()


def test_a_write_larger_than_a_take_comes_whole_and_excluded_volumes_never_enter() -> None:
    ring = Ring.create(capacity=4 << 20)
    w, r = RingWriter(ring, after=0, excluded=frozenset({"swap"})), RingReader(ring)
    big = os.urandom(3 << 20)
    recs: list[Record] = [_w(1, 0, big), _w(2, 0, big[:10], vol="swap")]
    w.tap(recs, _ops(recs, [big, big[:10]]))
    out = r.take(max_bytes=1 << 20)
    assert len(out) == 1 and isinstance(out[0], Write) and bytes(out[0].data) == big
    assert r.take() == []
    del out  # views into the ring must go before it is unmapped
    ring.close()


def test_needs_names_every_prior_read_observe_makes() -> None:
    """The worker asks the daemon for ``needs(batch)`` in one round trip; ``observe`` must
    then find every read it makes among them (a miss costs a round trip of its own)."""
    rng = random.Random(7)
    asked: list[tuple[str, int, int, int]] = []

    def prior(vol: str, off: int, n: int, seq: int) -> bytes:
        asked.append((vol, off, n, seq))
        return os.urandom(n) if rng.random() < 0.5 else b"text " * (n // 5)

    det = GroupDetector(65536, DetectorConfig(), prior)
    seq = 0
    for _ in range(30):
        batch: list[Record] = []
        for _ in range(rng.randint(1, 40)):
            seq += 1
            off = rng.randrange(0, 64) * BLOCK + rng.choice([0, 0, 0, 512])
            n = rng.choice([512, BLOCK, 3 * BLOCK, 70 * BLOCK])
            if rng.random() < 0.1:
                batch.append(ZeroRecord(Seq(seq), seq, "v", off, n, trim=True))
            else:
                batch.append(WriteRecord(Seq(seq), seq, "v", off, n, os.urandom(n)))
        want = det.needs(batch)
        asked.clear()
        det.observe(batch)
        assert set(asked) <= set(want), (asked, want)
        assert len(want) == len(set(want))


def test_a_taken_write_is_not_overwritten_before_it_is_released() -> None:
    """The worker scores straight from the ring: the writer must not reuse that space."""
    ring = Ring.create(capacity=BLOCK + 100)
    w, r = RingWriter(ring, after=0), RingReader(ring)
    a, b = os.urandom(BLOCK), os.urandom(BLOCK)
    w.tap([_w(1, 0, a)], [(0, a, BLOCK, False)])
    (got,) = r.take()
    w.tap([_w(2, 0, b)], [(0, b, BLOCK, False)])  # no room until the view is released
    assert isinstance(got, Write) and bytes(got.data) == a and w.dropped == 1
    del got
    r.release()
    w.tap([_w(3, 0, b)], [(0, b, BLOCK, False)])
    out = r.take()
    assert [type(x) for x in out] == [Gap, Write] and bytes(out[1].data) == b  # type: ignore[union-attr]
    del out
    ring.close()


def test_the_tap_never_fails_a_write_and_places_nothing_once_closed() -> None:
    """The tap runs after the journal appended the write: an error in it must not reach
    the guest; what it could not place is read back like a drop."""
    ring = Ring.create(capacity=4 * BLOCK)
    w, r = RingWriter(ring, after=0), RingReader(ring)
    blk = bytes(BLOCK)
    bad = "x" * BLOCK  # has a length, but is no buffer: copying it into the ring raises
    w.tap([_w(1, 0, blk)], [(0, bad, BLOCK, False)])  # type: ignore[list-item]  # no raise
    assert w.failed == 1 and w.gap
    w.tap([_w(2, 0, blk)], [(0, blk, BLOCK, False)])
    out = r.take()
    assert out[0] == Gap(after=0, upto=1) and isinstance(out[1], Write) and out[1].seq == 2
    del out
    w.close()
    w.tap([_w(3, 0, blk)], [(0, blk, BLOCK, False)])
    w.flush_gap(upto=9)
    assert r.take() == []
    ring.close()


def test_the_direct_path_and_the_general_one_place_the_same_records() -> None:
    """A batch that fits before the wrap is packed straight into the ring; one that does
    not, or that follows a drop, or has a name too long for the estimate, goes through
    the general path. The reader must not tell them apart."""
    rng = random.Random(7)
    long_name = "v" * 300
    for cap in (3_000, 50_000, 1 << 20):
        ring = Ring.create(capacity=cap)
        w, r = RingWriter(ring, after=0, excluded=frozenset({"skip"})), RingReader(ring)
        sent: list[tuple[int, str, int, int, bytes | None]] = []
        got: list[tuple[int, str, int, int, bytes | None]] = []
        seq = 0
        for _ in range(200):
            recs: list[Record] = []
            ops: list[Op] = []
            for _k in range(rng.randint(1, 8)):
                seq += 1
                vol = rng.choice(["a", "skip", long_name])
                n = rng.randint(1, 700)
                if rng.random() < 0.25:
                    recs.append(ZeroRecord(Seq(seq), seq, vol, 8, n, trim=False))
                    ops.append((8, None, n, False))
                    data = None
                else:
                    data = os.urandom(n)
                    recs.append(_w(seq, 8, data, vol))
                    ops.append((8, data, n, False))
                if vol != "skip":
                    sent.append((seq, vol, 8, n, data))
            w.tap(recs, ops)
            for it in r.take():
                if isinstance(it, Gap):
                    sent = [x for x in sent if not it.after < x[0] <= it.upto]
                elif isinstance(it, Write):
                    got.append((it.seq, it.volume, it.offset, it.length, bytes(it.data)))
                else:
                    got.append((it.seq, it.volume, it.offset, it.length, None))
            r.release()
        assert got == [x for x in sent if x[0] <= w.delivered]
        assert w.failed == 0
        del it
        ring.close()


def test_the_direct_path_never_writes_over_what_the_reader_has_not_taken() -> None:
    """Room before the wrap is not room: the free space counts the reader's tail too."""
    ring = Ring.create(capacity=3 * BLOCK + 200)
    w, r = RingWriter(ring, after=0), RingReader(ring)
    data = {s: os.urandom(BLOCK) for s in range(1, 6)}
    for s in (1, 2, 3):
        w.tap([_w(s, 0, data[s])], [(0, data[s], BLOCK, False)])
    first = r.take(max_bytes=1)
    assert [x.seq for x in first] == [1]  # type: ignore[union-attr]
    del first
    r.release()
    for s in (4, 5):  # 4 wraps; 5 finds about 100 bytes free, though 8 KiB lie before the wrap
        w.tap([_w(s, 0, data[s])], [(0, data[s], BLOCK, False)])
    assert w.dropped == 1
    out = r.take()
    assert [getattr(x, "seq", None) for x in out] == [2, 3, 4]
    assert all(isinstance(x, Write) and bytes(x.data) == data[x.seq] for x in out)
    del out
    ring.close()
