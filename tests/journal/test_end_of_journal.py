"""End-of-journal detection on the real OsStorage (reliability.md A1, PostgreSQL 039 analogue).

Each case writes N valid records, closes, damages the newest segment file on disk and reopens.
A damaged tail must be truncated at the last fully valid frame and named in the recovery
report; damage that later frames prove was durable, and any damage in a closed or sealed
segment, must be ``SegmentCorrupt`` naming the segment and the frame offset. Nothing after a
bad frame may ever come back, and no record may ever be returned with contents other than the
ones written.

The frame layout is parsed here independently of journal/segment.py (only the checksum helper
is borrowed, to forge frames that are valid except for the one property under test).
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from journal import (
    Journal,
    JournalError,
    JournalOptions,
    ManualClock,
    SegmentCorrupt,
    codec,
)
from journal.segment import frame_checksum, segment_seed
from journal.types import Seq, WriteRecord

SEC = 1_000_000_000
HEADER = 56
FRAME = struct.Struct("<IIQQ")  # length, synced_upto, prev_checksum, checksum
NOTE = 1 << 31  # top bit of the length: a durability note frame, not a record
VOL = 512 * 1024


@dataclass(frozen=True)
class FrameInfo:
    offset: int
    length: int
    synced_upto: int
    prev: int
    checksum: int

    @property
    def end(self) -> int:
        return self.offset + FRAME.size + self.length


def parse_frames(buf: bytes) -> list[FrameInfo]:
    out, pos = [], HEADER
    while pos + FRAME.size <= len(buf):
        raw, synced, prev, csum = FRAME.unpack_from(buf, pos)
        length = raw & ~NOTE
        if pos + FRAME.size + length > len(buf):
            break
        out.append(FrameInfo(pos, length, synced, prev, csum))
        pos += FRAME.size + length
    assert pos == len(buf), "the pristine segment should parse to its end"
    return out


def later_clock() -> ManualClock:
    return ManualClock(1_800_000_000 * SEC)


@dataclass
class Built:
    path: str
    writes: dict[int, tuple[int, bytes]]  # seq -> (offset, data), volume "vda"
    last_seq: int
    options: JournalOptions

    def model_at(self, seq: int) -> bytes:
        disk = bytearray(VOL)
        for s in range(2, seq + 1):
            off, data = self.writes[s]
            disk[off : off + len(data)] = data
        return bytes(disk)

    def copy(self) -> str:
        dst = tempfile.mkdtemp(prefix="cdp-eoj-")
        shutil.rmtree(dst)
        shutil.copytree(self.path, dst)
        return dst


def build(
    path: str,
    n_writes: int,
    *,
    seed: int = 1,
    sync_every: int | None = None,
    last_size: int = 300,
    options: JournalOptions | None = None,
    seal: bool = False,
) -> Built:
    """A journal: seq 1 declares "vda", seqs 2..n_writes+1 write random data, then close()."""
    rng = random.Random(seed)
    opts = options or JournalOptions()
    clock = ManualClock()
    writes: dict[int, tuple[int, bytes]] = {}
    with Journal.open(path, clock=clock, options=opts) as j:
        j.add_volume("vda", VOL)
        for i in range(n_writes):
            clock.advance(SEC)
            n = last_size if i == n_writes - 1 else rng.randint(200, 3000)
            off = rng.randrange(0, VOL - n)
            data = rng.randbytes(n)
            writes[j.write("vda", off, data)] = (off, data)
            if sync_every and i % sync_every == sync_every - 1:
                j.sync()
        if seal:
            j.seal_pending(1000)
        last = j.window().last_seq
    return Built(path, writes, last, opts)


def segments(path: str) -> list[str]:
    return sorted(
        glob.glob(os.path.join(path, "segments", "*.hot"))
        + glob.glob(os.path.join(path, "segments", "*.seg"))
    )


def last_hot(path: str) -> str:
    hots = sorted(glob.glob(os.path.join(path, "segments", "*.hot")))
    assert hots and hots[-1] == segments(path)[-1]
    return hots[-1]


def rel(path: str, seg: str) -> str:
    return os.path.relpath(seg, path)


def mutate(seg: str, offset: int, data: bytes) -> None:
    with open(seg, "r+b") as f:
        f.seek(offset)
        f.write(data)


def reopen(b: Built, path: str) -> Journal:
    return Journal.open(path, clock=later_clock(), options=b.options)


def check_prefix(b: Built, j: Journal, last: int) -> None:
    """The journal holds exactly seqs 1..last, each as written, and reads like the model."""
    assert j.window().last_seq == last
    recs = list(j.records(1))
    assert [r.seq for r in recs] == list(range(1, last + 1))
    for r in recs[1:]:
        assert isinstance(r, WriteRecord)
        off, data = b.writes[r.seq]
        assert r.offset == off and r.length == len(data)
        assert r.data is None or r.data == data, f"seq {r.seq}: bad contents"
    if last >= 1:
        assert j.read("vda", 0, VOL) == b.model_at(last)


def check_truncated(b: Built, path: str, seg: str, at: int, last: int) -> None:
    """Reopen: truncated at ``at`` to seqs 1..last, reported; appends continue afterwards."""
    size_before = os.path.getsize(seg)
    with reopen(b, path) as j:
        check_prefix(b, j, last)
        rep = j.recovery
        assert rep.truncated_segment == rel(path, seg), rep
        assert rep.truncated_at == at, rep
        assert rep.truncated_bytes == size_before - at, rep
        assert any("torn tail" in a for a in j.status().alerts)
        assert os.path.getsize(seg) == at
        j.write("vda", 0, b"after recovery")
    with reopen(b, path) as j:
        assert j.window().last_seq == last + 1
        assert j.recovery.truncated_segment is None
        assert j.read("vda", 0, 14) == b"after recovery"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Built:
    """12 records in one hot segment; the last frame is small (the byte-offset loop is cheap)."""
    return build(str(tmp_path_factory.mktemp("eoj") / "j"), 11, sync_every=4)


def _last_frame(b: Built, path: str) -> tuple[str, FrameInfo, list[FrameInfo]]:
    seg = last_hot(path)
    with open(seg, "rb") as f:
        frames = parse_frames(f.read())
    assert len(frames) == b.last_seq
    return seg, frames[-1], frames


# ---------------------------------------------------------------------- damaged last frame
@pytest.mark.parametrize(
    "case",
    [
        "length0",
        "length1",
        "length23",
        "length2GiB",
        "lengthmax",
        "flip_checksum",
        "flip_payload",
        "synced_beyond_self",
    ],
)
def test_damaged_last_frame_is_truncated(small: Built, case: str) -> None:
    path = small.copy()
    seg, fr, _ = _last_frame(small, path)
    o = fr.offset
    if case == "length0":
        mutate(seg, o, (0).to_bytes(4, "little"))
    elif case == "length1":
        mutate(seg, o, (1).to_bytes(4, "little"))
    elif case == "length23":  # shorter than a frame header
        mutate(seg, o, (23).to_bytes(4, "little"))
    elif case == "length2GiB":
        mutate(seg, o, (1 << 31).to_bytes(4, "little"))
    elif case == "lengthmax":
        mutate(seg, o, (0xFFFFFFFF).to_bytes(4, "little"))
    elif case == "flip_checksum":
        with open(seg, "rb") as f:
            f.seek(o + 16)
            byte = f.read(1)[0]
        mutate(seg, o + 16, bytes([byte ^ 0xFF]))
    elif case == "flip_payload":
        with open(seg, "rb") as f:
            f.seek(o + 40)
            byte = f.read(1)[0]
        mutate(seg, o + 40, bytes([byte ^ 0x01]))
    elif case == "synced_beyond_self":
        mutate(seg, o + 4, (o + 1).to_bytes(4, "little"))
    check_truncated(small, path, seg, o, small.last_seq - 1)
    shutil.rmtree(path)


def _forge(seg: str, offset: int, length: int, synced: int, prev: int, payload: bytes) -> bytes:
    """A frame that validates at ``offset`` of this segment (checksum bound to the place)."""
    with open(seg, "rb") as f:
        header = f.read(HEADER)
    seg_no, uuid = struct.unpack_from("<Q", header, 16)[0], header[32:48]
    head16 = struct.pack("<IIQ", length, synced, prev)
    csum = frame_checksum(segment_seed(uuid, seg_no), offset, head16, (payload,))
    return head16 + csum.to_bytes(8, "little") + payload


def test_bad_prev_link_is_truncated(small: Built) -> None:
    """The last frame is valid in itself but does not chain to the one before (stale)."""
    path = small.copy()
    seg, fr, _ = _last_frame(small, path)
    with open(seg, "rb") as f:
        f.seek(fr.offset + FRAME.size)
        payload = f.read(fr.length)
    forged = _forge(seg, fr.offset, fr.length, fr.synced_upto, 0xDEADBEEF, payload)
    mutate(seg, fr.offset, forged)
    check_truncated(small, path, seg, fr.offset, small.last_seq - 1)
    shutil.rmtree(path)


def test_frame_moved_from_another_offset_is_truncated(small: Built) -> None:
    """A verbatim copy of an earlier frame appended at the end (recycled bytes) is not valid."""
    path = small.copy()
    seg, fr, frames = _last_frame(small, path)
    with open(seg, "rb") as f:
        buf = f.read()
    copy = buf[frames[3].offset : frames[3].end]
    with open(seg, "ab") as f:
        f.write(copy)
    check_truncated(small, path, seg, fr.end, small.last_seq)
    shutil.rmtree(path)


def test_zeroed_page_at_the_tail(small: Built) -> None:
    path = small.copy()
    seg, _, frames = _last_frame(small, path)
    size = os.path.getsize(seg)
    page = (size - 1) // 4096 * 4096
    assert page > HEADER
    mutate(seg, page, bytes(min(4096, size - page)))
    good = [f for f in frames if f.end <= page]
    first_bad = frames[len(good)]
    check_truncated(small, path, seg, first_bad.offset, len(good))
    shutil.rmtree(path)


def test_truncation_at_every_byte_of_the_last_frame(small: Built) -> None:
    path = small.copy()
    seg, fr, _ = _last_frame(small, path)
    with open(seg, "rb") as f:
        pristine = f.read()
    assert fr.end == len(pristine)
    for cut in range(fr.offset + 1, fr.end):
        with open(seg, "wb") as f:
            f.write(pristine[:cut])
        with reopen(small, path) as j:
            assert j.window().last_seq == small.last_seq - 1, f"cut at {cut}"
            rep = j.recovery
            assert (rep.truncated_segment, rep.truncated_at, rep.truncated_bytes) == (
                rel(path, seg),
                fr.offset,
                cut - fr.offset,
            ), f"cut at {cut}: {rep}"
    # the last one once more with the full check (contents, reads, appends after)
    with open(seg, "wb") as f:
        f.write(pristine[: fr.end - 1])
    check_truncated(small, path, seg, fr.offset, small.last_seq - 1)
    # and a cut exactly at the frame boundary is a clean end, not a truncation
    with open(seg, "wb") as f:
        f.write(pristine[: fr.offset])
    with reopen(small, path) as j:
        check_prefix(small, j, small.last_seq - 1)
        assert j.recovery.truncated_segment is None
    shutil.rmtree(path)


def test_valid_frame_after_garbage_is_not_resurrected(small: Built) -> None:
    """Garbage, then a frame forged to validate at its place: the journal ends at the garbage."""
    path = small.copy()
    seg, fr, _ = _last_frame(small, path)
    garbage = bytes(random.Random(3).randbytes(100))
    pos = fr.end + len(garbage)
    payload = _payload_like(small.last_seq + 1)
    forged = _forge(seg, pos, len(payload), 0, fr.checksum, payload)
    with open(seg, "ab") as f:
        f.write(garbage + forged)
    check_truncated(small, path, seg, fr.end, small.last_seq)
    shutil.rmtree(path)


def test_valid_frame_after_garbage_vouching_for_it_is_corruption(small: Built) -> None:
    """If the frame after the garbage claims the garbage was durable, that is corruption."""
    path = small.copy()
    seg, fr, _ = _last_frame(small, path)
    garbage = bytes(random.Random(4).randbytes(100))
    pos = fr.end + len(garbage)
    payload = _payload_like(small.last_seq + 1)
    forged = _forge(seg, pos, len(payload), pos, fr.checksum, payload)
    with open(seg, "ab") as f:
        f.write(garbage + forged)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(small, path)
    assert (ei.value.segment, ei.value.offset) == (rel(path, seg), fr.end)
    shutil.rmtree(path)


def _payload_like(seq: int) -> bytes:
    """A well-formed write record payload with the next seq (what a resurrection would show)."""
    rec = WriteRecord(Seq(seq), 1_700_000_999 * SEC, "vda", 0, 16, b"RESURRECTED-DATA")
    return codec.encode(rec)


# ---------------------------------------------------------------------- foreign / stale segments
def test_segment_from_another_journal_is_rejected(small: Built, tmp_path) -> None:
    """A foreign segment is refused (SegmentCorrupt) and left on disk, never deleted."""
    other = build(str(tmp_path / "other"), small.last_seq + 5, seed=9)
    path = small.copy()
    seg = last_hot(path)
    nxt = os.path.join(path, "segments", "000000000002.hot")
    shutil.copyfile(last_hot(other.path), nxt)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(small, path)
    assert ei.value.segment == rel(path, nxt) and "another journal" in ei.value.reason
    assert os.path.exists(nxt), "open() deleted a segment it could not attribute"
    # the same when it replaces our only segment
    os.remove(nxt)
    shutil.copyfile(last_hot(other.path), seg)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(small, path)
    assert ei.value.segment == rel(path, seg) and "another journal" in ei.value.reason
    assert os.path.exists(seg)
    shutil.rmtree(path)


def test_missing_meta_never_deletes_segments(tmp_path) -> None:
    """Losing journal.meta must not turn into losing the journal."""
    b = build(str(tmp_path / "j"), 40, sync_every=3, options=JournalOptions(segment_size=8192))
    seg_dir = os.path.join(b.path, "segments")
    before = sorted(os.listdir(seg_dir))
    assert len(before) > 3
    os.remove(os.path.join(b.path, "journal.meta"))
    try:
        j = reopen(b, b.path)
    except JournalError:
        pass  # refusing to open is fine
    else:
        with j:  # so is recovering everything (the uuid is in every segment header)
            check_prefix(b, j, b.last_seq)
    assert sorted(os.listdir(seg_dir)) == before, "open() deleted segments"


def test_stale_copy_of_a_segment_is_rejected(small: Built) -> None:
    """An old copy of segment 1 showing up as segment 2 must not replay seqs twice."""
    path = small.copy()
    seg = last_hot(path)
    shutil.copyfile(seg, os.path.join(path, "segments", "000000000002.hot"))
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(small, path)
    assert ei.value.segment == "segments/000000000002.hot"
    shutil.rmtree(path)


def test_segment_under_a_wrong_number_is_rejected(small: Built) -> None:
    """Self-address: a segment whose header names another number than its file is stale.

    (reliability.md A1: "a recycled segment whose self-address (segment id/offset) is stale").
    """
    path = small.copy()
    seg = last_hot(path)
    moved = os.path.join(path, "segments", "000000000007.hot")
    os.rename(seg, moved)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(small, path)
    assert ei.value.segment == rel(path, moved)
    shutil.rmtree(path)


# ---------------------------------------------------------------------- corruption in the middle
@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Built:
    """Several segments (8 KiB each), closed; the older ones were rolled (fsynced whole)."""
    return build(
        str(tmp_path_factory.mktemp("eoj") / "m"),
        40,
        sync_every=3,
        options=JournalOptions(segment_size=8 * 1024),
    )


def _flip(seg: str, pos: int, bit: int = 0) -> None:
    with open(seg, "rb") as f:
        f.seek(pos)
        byte = f.read(1)[0]
    mutate(seg, pos, bytes([byte ^ (1 << bit)]))


@pytest.mark.parametrize("sealed", [False, True])
def test_flip_in_a_middle_frame_of_a_closed_segment(multi: Built, sealed: bool) -> None:
    path = multi.copy()
    if sealed:
        with reopen(multi, path) as j:
            assert j.seal_pending(1000) > 0
    segs = segments(path)
    assert len(segs) >= 3
    seg = segs[1]
    assert seg.endswith(".seg" if sealed else ".hot")
    with open(seg, "rb") as f:
        frames = parse_frames(f.read())
    assert len(frames) >= 3
    fr = frames[len(frames) // 2]
    _flip(seg, fr.offset + FRAME.size + fr.length // 2, 3)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(multi, path)
    assert ei.value.segment == rel(path, seg)
    assert ei.value.offset == fr.offset
    assert str(fr.offset) in str(ei.value) and rel(path, seg) in str(ei.value)
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def multi_one_sync(tmp_path_factory) -> Built:
    """Several 8 KiB segments written without sync(); close() syncs everything once."""
    return build(
        str(tmp_path_factory.mktemp("eoj") / "m1"),
        40,
        options=JournalOptions(segment_size=8 * 1024),
    )


def test_flip_in_a_closed_segment_without_later_claims_is_corruption(
    multi_one_sync: Built,
) -> None:
    """Every record here was acknowledged durable (close() synced), and segment 1 was rolled
    and fsynced whole long before. A bit flip in its middle is damage to durable data: it must
    be SegmentCorrupt, never a "torn tail" that truncates segment 1 and deletes every later
    segment (no frame carries a synced_upto claim, because sync() writes no frame)."""
    b = multi_one_sync
    path = b.copy()
    segs = segments(path)
    assert len(segs) >= 4
    seg = segs[0]
    with open(seg, "rb") as f:
        frames = parse_frames(f.read())
    fr = frames[len(frames) // 2]
    _flip(seg, fr.offset + FRAME.size + fr.length // 2, 2)
    try:
        j = reopen(b, path)
    except SegmentCorrupt as e:
        assert (e.segment, e.offset) == (rel(path, seg), fr.offset)
    else:
        with j:
            lost = b.last_seq - j.window().last_seq
            pytest.fail(
                f"a flip in a closed segment was taken for a torn tail: {lost} acknowledged "
                f"records dropped, segments left: {len(segments(path))} of {len(segs)} "
                f"({j.recovery})"
            )
    finally:
        shutil.rmtree(path)


def test_flip_in_the_last_frame_of_a_closed_segment_is_corruption(multi: Built) -> None:
    """Only the newest hot segment may have a torn tail; an older one's last frame may not."""
    path = multi.copy()
    seg = segments(path)[0]
    with open(seg, "rb") as f:
        fr = parse_frames(f.read())[-1]
    _flip(seg, fr.end - 1, 0)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(multi, path)
    assert (ei.value.segment, ei.value.offset) == (rel(path, seg), fr.offset)
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def synced(tmp_path_factory) -> Built:
    """One hot segment written in batches, each followed by sync() (frames carry claims)."""
    return build(str(tmp_path_factory.mktemp("eoj") / "s"), 30, sync_every=5, seed=2)


def test_flip_in_a_middle_frame_vouched_by_later_synced_frames(synced: Built) -> None:
    path = synced.copy()
    seg = last_hot(path)
    with open(seg, "rb") as f:
        frames = parse_frames(f.read())
    fr = frames[8]
    assert any(g.synced_upto > fr.offset for g in frames[9:]), "later frames must vouch"
    _flip(seg, fr.offset + FRAME.size + 7, 5)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(synced, path)
    assert (ei.value.segment, ei.value.offset) == (rel(path, seg), fr.offset)
    shutil.rmtree(path)


def test_zeroed_page_in_the_middle_vouched_by_later_frames(synced: Built) -> None:
    path = synced.copy()
    seg = last_hot(path)
    with open(seg, "rb") as f:
        frames = parse_frames(f.read())
    mutate(seg, 4096, bytes(4096))
    first_bad = next(f for f in frames if f.end > 4096)
    assert any(g.synced_upto > first_bad.offset for g in frames if g.offset >= 8192)
    with pytest.raises(SegmentCorrupt) as ei:
        reopen(synced, path)
    assert (ei.value.segment, ei.value.offset) == (rel(path, seg), first_bad.offset)
    shutil.rmtree(path)


# ---------------------------------------------------------------------- random bit flips
@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Built:
    """One hot segment of > 100 KiB, synced every 6 records."""
    b = build(str(tmp_path_factory.mktemp("eoj") / "b"), 70, sync_every=6, seed=5, last_size=1500)
    assert os.path.getsize(last_hot(b.path)) > 64 * 1024 + HEADER
    return b


def expected_after_flip(frames: list[FrameInfo], pos: int) -> tuple[str, int]:
    """("corrupt", frame offset) or ("truncated", frame offset) for a flip at ``pos``."""
    bad = next(f for f in frames if f.offset <= pos < f.end)
    vouched = any(g.synced_upto > bad.offset for g in frames if g.offset > bad.offset)
    return ("corrupt" if vouched else "truncated"), bad.offset


def check_flip(b: Built, pos: int, bit: int) -> None:
    path = b.copy()
    try:
        seg = last_hot(path)
        with open(seg, "rb") as f:
            frames = parse_frames(f.read())
        _flip(seg, pos, bit)
        outcome, at = expected_after_flip(frames, pos)
        idx = next(i for i, f in enumerate(frames) if f.offset == at)
        try:
            j = reopen(b, path)
        except SegmentCorrupt as e:
            assert outcome == "corrupt", f"flip at {pos}: {e} but only a torn tail expected"
            assert (e.segment, e.offset) == (rel(path, seg), at)
            return
        with j:
            assert outcome == "truncated", f"flip at {pos} (frame {at}) was not detected"
            check_prefix(b, j, idx)  # frame i holds seq i+1
            assert (j.recovery.truncated_segment, j.recovery.truncated_at) == (rel(path, seg), at)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def flip_settings(n: int) -> settings:
    return settings(
        max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


@flip_settings(150)
@given(back=st.integers(1, 64 * 1024), bit=st.integers(0, 7))
def test_random_bit_flip_in_the_last_64k(big: Built, back: int, bit: int) -> None:
    size = os.path.getsize(last_hot(big.path))
    check_flip(big, size - back, bit)


@pytest.mark.slow
@flip_settings(20_000)
@given(back=st.integers(1, 64 * 1024), bit=st.integers(0, 7))
def test_random_bit_flip_in_the_last_64k_many(big: Built, back: int, bit: int) -> None:
    size = os.path.getsize(last_hot(big.path))
    check_flip(big, size - back, bit)
