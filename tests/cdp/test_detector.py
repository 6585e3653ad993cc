"""The detector's scoring rules on synthetic write streams (no daemon, no file system).

The real-file-system corpus (tests/detector) shows the rules work on what ext4 writes;
these pin down each rule on its own, so a change to one is caught here by name. The data
is real text and real random bytes; the prior content comes from an in-memory model of the
volume, as the journal would give it.
"""

from __future__ import annotations

import mmap
import os
import random

import zstandard
from hypothesis import given
from hypothesis import strategies as st

from cdp.detector import (
    BLOCK,
    EMPTY,
    SAMPLE,
    UNSEEN,
    Detection,
    DetectorConfig,
    GroupDetector,
    ratio_class,
)
from journal import Record, WriteRecord, ZeroRecord

SEC = 10**9
MIB = 1 << 20


def _pool(n: int = 3 * MIB) -> bytes:
    rng = random.Random(0)
    words = b"invoice customer order total amount paid due report quarter the of and".split()
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(10)) + b".\n"
    return bytes(out)


POOL = _pool()


def text(rng: random.Random, n: int) -> bytes:
    """Compressible like documents are (a slice of generated prose)."""
    o = rng.randrange(len(POOL) - n)
    return POOL[o : o + n]


class Volume:
    """A disk image in memory: what ``prior`` reads, and a seq/ts clock for records."""

    def __init__(self, size: int = 64 * MIB) -> None:
        self.data = bytearray(size)
        self.seq = 0
        self.ts = 1000 * SEC
        self.history: list[tuple[int, int, bytes]] = []  # (seq, offset, bytes before)

    def write(self, offset: int, data: bytes, dt: float = 0.01) -> WriteRecord:
        self.seq += 1
        self.ts += int(dt * SEC)
        self.history.append((self.seq, offset, bytes(self.data[offset : offset + len(data)])))
        self.data[offset : offset + len(data)] = data
        return WriteRecord(self.seq, self.ts, "vol", offset, len(data), data)

    def prior(self, volume: str, offset: int, length: int, seq: int) -> bytes:
        """The bytes as of ``seq``: undo the writes after it (newest first)."""
        img = bytearray(self.data[offset : offset + length])
        for s, off, before in reversed(self.history):
            if s <= seq:
                break
            lo, hi = max(off, offset), min(off + len(before), offset + length)
            if lo < hi:
                img[lo - offset : hi - offset] = before[lo - off : hi - off]
        return bytes(img)


def detector(v: Volume, **cfg: object) -> GroupDetector:
    return GroupDetector(64 << 10, DetectorConfig(**cfg), v.prior)  # type: ignore[arg-type]


def feed(det: GroupDetector, recs: list[Record]) -> list[Detection]:
    return list(det.observe(recs))


def test_in_place_encryption_of_text_alarms_and_names_the_point_before_it() -> None:
    rng = random.Random(1)
    v = Volume()
    files = [(k * 2 * MIB, text(rng, 1 * MIB)) for k in range(8)]
    written = [v.write(off, data, dt=0.1) for off, data in files]
    det = detector(v)
    assert feed(det, written) == []  # writing text into empty space is ordinary
    v.ts += 30 * SEC
    first = v.seq + 1
    attack = [v.write(off, os.urandom(len(data)), dt=0.2) for off, data in files]
    found = feed(det, attack)
    assert len(found) == 1
    d = found[0]
    assert d.first_seq == first and d.last_clean_seq == first - 1
    assert d.reverse_bytes == 0 and d.score >= 0.25


def test_a_detector_started_later_reads_what_blocks_held_from_the_journal() -> None:
    rng = random.Random(2)
    v = Volume()
    files = [(k * 2 * MIB, text(rng, 1 * MIB)) for k in range(4)]
    for off, data in files:
        v.write(off, data)
    det = detector(v)  # saw none of the writes above: ``prior`` must tell it
    found = feed(det, [v.write(off, os.urandom(len(data))) for off, data in files])
    assert len(found) == 1


def test_incompressible_data_into_empty_or_trimmed_space_is_ordinary() -> None:
    rng = random.Random(3)
    v = Volume()
    det = detector(v)
    recs: list[Record] = [v.write(k * MIB, os.urandom(MIB), dt=0.05) for k in range(16)]
    # text, then trimmed (a deleted file under ``discard``), then a tarball written there
    recs += [v.write(32 * MIB + k * MIB, text(rng, MIB)) for k in range(4)]
    v.seq += 1
    recs.append(ZeroRecord(v.seq, v.ts, "vol", 32 * MIB, 4 * MIB, trim=True))
    v.data[32 * MIB : 36 * MIB] = bytes(4 * MIB)
    recs += [v.write(32 * MIB + k * MIB, os.urandom(MIB)) for k in range(4)]
    assert feed(det, recs) == []


def test_new_content_over_a_dead_file_system_does_not_alarm() -> None:
    """mkfs without discard over a used disk, then a copy: text and gzip swap places."""
    rng = random.Random(4)
    v = Volume()
    old_kinds = [k % 2 == 1 for k in range(48)]  # True: a compressed file; text, gz, text, gz
    new_kinds = [k % 4 >= 2 for k in range(48)]  # text, text, gz, gz: one of each transition
    data = {False: lambda: text(rng, MIB), True: lambda: os.urandom(MIB)}
    old = [v.write(k * MIB, data[z]()) for k, z in enumerate(old_kinds)]
    det = detector(v)
    feed(det, old)
    v.ts += 60 * SEC
    new = [v.write(k * MIB, data[z](), dt=0.05) for k, z in enumerate(new_kinds)]
    assert feed(det, new) == []
    # it is the cancelling that keeps it quiet: the raw share alone looks like an attack
    assert det._sus == 12 * MIB and det._over == 48 * MIB and det._reverse == 12 * MIB


def test_reverse_overwrites_cancel_suspicious_ones() -> None:
    rng = random.Random(5)
    v = Volume()
    a = [v.write(k * MIB, text(rng, MIB)) for k in range(4)]  # compressible
    b = [v.write((8 + k) * MIB, os.urandom(MIB)) for k in range(4)]  # incompressible
    det = detector(v)
    feed(det, a + b)
    v.ts += 60 * SEC
    swap: list[Record] = []
    for k in range(4):  # as many bytes turn compressible as turn incompressible
        swap.append(v.write((8 + k) * MIB, text(rng, MIB)))
        swap.append(v.write(k * MIB, os.urandom(MIB)))
    assert feed(det, swap) == []
    # the same suspicious half alone alarms
    v2 = Volume()
    det2 = detector(v2)
    feed(det2, [v2.write(k * MIB, text(rng, MIB)) for k in range(4)])
    v2.ts += 60 * SEC
    assert len(feed(det2, [v2.write(k * MIB, os.urandom(MIB)) for k in range(4)])) == 1


def test_rewriting_compressed_files_counts_half_against_an_attack() -> None:
    """Encrypting a home directory that is 2/3 gzip: the 1/3 text is still flagged."""
    rng = random.Random(6)
    kinds = [k % 3 != 0 for k in range(24)]  # True: already compressed
    order = sorted(range(24), key=lambda k: not kinds[k])  # the gzip files come first
    for weight, alarms in ((0.5, 1), (0.0, 0)):
        v = Volume()
        old = [
            v.write(k * MIB, os.urandom(MIB) if z else text(rng, MIB)) for k, z in enumerate(kinds)
        ]
        det = detector(v, redundant_weight=weight, min_fraction=0.4)
        feed(det, old)
        v.ts += 60 * SEC
        enc = [v.write(k * MIB, os.urandom(MIB), dt=0.05) for k in order]
        # after all 16 gzip files and n text files: n / (16 * (1 - weight) + n) >= 0.4
        # is reached at n = 6 with weight 0.5, and never (n <= 8) when they count fully
        assert len(feed(det, enc)) == alarms, weight


def test_small_bursts_and_excluded_volumes_stay_quiet() -> None:
    rng = random.Random(7)
    v = Volume()
    det = detector(v)
    feed(det, [v.write(0, text(rng, 256 << 10))])
    v.ts += 60 * SEC
    assert feed(det, [v.write(0, os.urandom(256 << 10))]) == []  # under min_bytes
    v2 = Volume()
    det2 = GroupDetector(64 << 10, DetectorConfig(), v2.prior, frozenset({"vol"}))
    recs = [v2.write(k * MIB, text(rng, MIB)) for k in range(4)]
    recs += [v2.write(k * MIB, os.urandom(MIB)) for k in range(4)]
    assert det2.observe(recs) == [] and det2.sampled == 0


def test_one_alarm_per_burst_then_quiet_for_the_cooldown() -> None:
    rng = random.Random(8)
    v = Volume()
    recs = [v.write(k * MIB, text(rng, MIB)) for k in range(40)]
    det = detector(v)
    det.observe(recs)
    v.ts += 60 * SEC
    found = det.observe([v.write(k * MIB, os.urandom(MIB), dt=0.1) for k in range(40)])
    assert len(found) == 1  # 4 s of encryption: one alarm, not one per write
    assert found[0].first_seq == 41


def test_a_block_keeps_its_own_class() -> None:
    """Two small files in one 64 KiB chunk: the second one's old content is its own."""
    rng = random.Random(9)
    v = Volume()
    a = v.write(0, os.urandom(BLOCK * 8))  # a compressed file
    b = v.write(BLOCK * 8, text(rng, BLOCK * 8))  # a text file in the same chunk
    det = detector(v)
    det.observe([a, b])
    assert det.block_class("vol", 0) > det.block_class("vol", 8)  # type: ignore[operator]  # incompressible vs compressible class


def test_a_burst_that_goes_on_for_minutes_raises_one_alarm() -> None:
    """Slow encryption, a file every 20 s: the first alarm pinned the point; no more."""
    rng = random.Random(10)
    v = Volume(size=128 * MIB)
    recs = [v.write(k * MIB, text(rng, MIB)) for k in range(30)]
    det = detector(v)
    det.observe(recs)
    v.ts += 60 * SEC
    found = det.observe([v.write(k * MIB, os.urandom(MIB), dt=20.0) for k in range(30)])
    assert len(found) == 1 and found[0].first_seq == 31
    # after a quiet spell longer than ``burst_gap_ns`` a new burst is a new alarm
    v.ts += det.config.burst_gap_ns + SEC
    more = [v.write((64 + k) * MIB, text(rng, MIB)) for k in range(4)]
    det.observe(more)
    v.ts += SEC
    again = det.observe([v.write((64 + k) * MIB, os.urandom(MIB)) for k in range(4)])
    assert len(again) == 1 and again[0].last_clean_seq > found[0].detected_seq


def test_a_write_mixing_kinds_is_sampled_block_by_block() -> None:
    """One request covering a text file and a tarball next to it (writeback merges them).

    The spread samples (blocks 0, 5, 10, 15 of 16) see both kinds here; a tarball that
    falls between them would take its neighbours' class, which is the price of sampling 4
    blocks of a long write instead of all of them.
    """
    rng = random.Random(11)
    v = Volume()
    mixed = text(rng, 4 * BLOCK) + os.urandom(3 * BLOCK) + text(rng, 9 * BLOCK)
    det = detector(v)
    det.observe([v.write(0, mixed)])
    got = [det.block_class("vol", b) for b in range(16)]
    hi, lo = round(0.97 * 250), round(0.90 * 250)
    assert all(c is not None and c <= lo for c in got[:4] + got[7:])
    assert all(c is not None and c >= hi for c in got[4:7])
    assert det.sampled > 4  # the four spread samples disagreed: every block was sampled


def test_a_long_write_of_one_kind_costs_four_samples() -> None:
    rng = random.Random(12)
    v = Volume()
    det = detector(v)
    det.observe([v.write(0, text(rng, MIB))])
    assert det.sampled == 8  # four of what the range held (zeroes), four of the new text
    assert {det.block_class("vol", b) for b in range(256)} == {det.block_class("vol", 0)}


def test_unaligned_writes_count_their_own_bytes() -> None:
    rng = random.Random(13)
    v = Volume()
    det = detector(v)
    det.observe([v.write(0, text(rng, MIB))])
    v.ts += 60 * SEC
    found = det.observe([v.write(1000, os.urandom(MIB - 3000))])
    assert len(found) == 1
    assert found[0].suspicious_bytes == found[0].overwrite_bytes == MIB - 3000


def test_zeroes_written_and_trims_make_blocks_empty() -> None:
    rng = random.Random(14)
    v = Volume()
    det = detector(v)
    det.observe([v.write(0, text(rng, 2 * MIB))])
    det.observe([v.write(0, bytes(MIB))])  # zero data written: empty, filling it is ordinary
    assert det.block_class("vol", 0) == 0 and det.block_class("vol", 255) == 0
    v.seq += 1
    det.observe([ZeroRecord(v.seq, v.ts, "vol", MIB + 4096, MIB - 8192, trim=True)])
    assert det.block_class("vol", 256) != 0  # the edge block outside the trim keeps its class
    assert det.block_class("vol", 257) == 0 and det.block_class("vol", 510) == 0
    v.data[MIB + 4096 : 2 * MIB - 4096] = bytes(MIB - 8192)
    v.ts += 60 * SEC
    assert det.observe([v.write(0, os.urandom(2 * MIB))]) == []  # mostly empty space now


def test_a_mixed_copy_over_dead_text_does_not_alarm() -> None:
    """A fresh file system's new files (2/5 gzip, 3/5 text) all over a dead one's text.

    Nothing turns compressible, so nothing cancels, and 40 % of the overwrites are
    suspicious; but an encryptor would have made all of them incompressible.
    """
    rng = random.Random(15)
    v = Volume()
    det = detector(v)
    det.observe([v.write(k * MIB, text(rng, MIB)) for k in range(40)])
    v.ts += 60 * SEC
    new = [
        v.write(k * MIB, os.urandom(MIB) if k % 5 in (1, 3) else text(rng, MIB), dt=0.05)
        for k in range(40)
    ]
    assert det.observe(new) == []
    assert det._sus - det._reverse >= 0.25 * det._over  # the score alone would have fired
    # the same copy with 4/5 gzip is indistinguishable from encryption, and alarms
    v.ts += 600 * SEC
    det.observe([v.write((40 + k) * MIB, text(rng, MIB)) for k in range(20)])
    v.ts += 60 * SEC
    mostly = [
        v.write((40 + k) * MIB, text(rng, MIB) if k % 5 == 0 else os.urandom(MIB), dt=0.05)
        for k in range(20)
    ]
    assert len(det.observe(mostly)) == 1


def test_a_learned_page_spares_reads_only_where_the_map_says_empty() -> None:
    """``learn_page`` (the worker's map of a MiB): blocks marked empty cost no ``prior``
    read, blocks marked written are still read, and a short map or a page already known
    is left alone."""
    reads: list[tuple[int, int]] = []

    def prior(volume: str, offset: int, length: int, seq: int) -> bytes:
        reads.append((offset, length))
        return bytes(length)

    det = GroupDetector(64 << 10, DetectorConfig(), prior)
    rec = WriteRecord(5, 1, "v", 0, 4 * BLOCK, os.urandom(4 * BLOCK))
    assert det.unknown_pages([rec]) == [("v", 0, 4)]
    det.learn_page("v", 0, b"\x00\x01" + bytes(254))
    det.learn_page("v", 1, b"\x00" * 10)  # not a whole page: ignored
    assert det.unknown_pages([WriteRecord(6, 1, "v", 256 * BLOCK, BLOCK, b"x" * BLOCK)]) == [
        ("v", 1, 5)
    ]
    det.observe([rec])
    assert reads == [(BLOCK, BLOCK)]  # only the block the map said may hold data
    det.learn_page("v", 0, bytes(256))  # known by now: a later map does not reset it
    assert det.block_class("v", 0) is not None and det.block_class("v", 0) != 0


def _reference_class(sample: bytes, cctx: zstandard.ZstdCompressor) -> int:
    """ratio_class as first written, before the table and the memcmp."""
    b = bytes(sample)
    if not b or b.count(0) == len(b):
        return EMPTY
    r = len(cctx.compress(b)) / len(b)
    return max(1, min(UNSEEN - 1, round(r * 250)))


_samples = st.one_of(
    st.binary(min_size=SAMPLE, max_size=SAMPLE),
    st.binary(max_size=SAMPLE),
    st.builds(lambda n, k: bytes(n) + b"\x01" * k, st.integers(0, SAMPLE), st.integers(0, 2)),
    st.builds(
        lambda t, n: (t * (SAMPLE // max(1, len(t)) + 1))[:n],
        st.binary(min_size=1, max_size=40),
        st.integers(1, SAMPLE),
    ),
)


@given(_samples)
def test_ratio_class_is_the_reference_arithmetic_on_bytes_and_views(sample: bytes) -> None:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False)
    want = _reference_class(sample, cctx)
    assert ratio_class(sample, cctx) == want
    assert ratio_class(memoryview(sample), cctx) == want
    padded = memoryview(b"\xff" + sample + b"\xff")[1 : 1 + len(sample)]  # a slice, as the worker's
    assert ratio_class(padded, cctx) == want


def test_ratio_class_reads_a_view_of_shared_memory_and_odd_views() -> None:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False)
    mm = mmap.mmap(-1, 3 * SAMPLE)
    mm[SAMPLE : 2 * SAMPLE] = os.urandom(SAMPLE // 2) * 2
    view = memoryview(mm)
    zeros, data = view[:SAMPLE], view[SAMPLE : 2 * SAMPLE]
    strided = view[SAMPLE : 3 * SAMPLE : 2]  # not contiguous: copied, same answer
    assert ratio_class(zeros, cctx) == EMPTY
    got = ratio_class(data, cctx)
    assert got == _reference_class(mm[SAMPLE : 2 * SAMPLE], cctx) and 0 < got < UNSEEN
    assert ratio_class(strided, cctx) == _reference_class(bytes(strided), cctx)
    for v in (zeros, data, strided, view):
        v.release()
    mm.close()


def test_ratio_class_over_every_compressibility_of_a_full_sample() -> None:
    """Samples from all zeroes to all random, a byte at a time: their compressed sizes
    sweep the table's whole used range, and each class is the reference arithmetic."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False)
    noise = random.Random(5).randbytes(SAMPLE)
    sizes = set()
    for k in range(SAMPLE + 1):
        sample = noise[:k] + bytes(SAMPLE - k)
        sizes.add(len(cctx.compress(sample)))
        assert ratio_class(memoryview(sample), cctx) == _reference_class(sample, cctx), k
    assert len(sizes) > 400  # the sweep did reach most of the used range (19 .. ~1040)


def test_ratio_class_of_views_whose_length_is_not_their_bytes() -> None:
    """A view of 4-byte items or of two dimensions: classed by its bytes, as a copy is."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False)
    raw = random.Random(9).randbytes(SAMPLE // 2) + bytes(SAMPLE // 2)
    want = _reference_class(raw, cctx)
    assert ratio_class(memoryview(raw).cast("I"), cctx) == want
    assert ratio_class(memoryview(raw).cast("B", (2, SAMPLE // 2)), cctx) == want
