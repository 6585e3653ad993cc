"""Random write streams against a simple model: every retained point reads back bit-exactly.

The model is a list of whole-disk images, one per seq. The state machine interleaves the
journal's background steps (seal, fold, rebuild-index, reopen) with writes, so each read
checks that none of them changed what a retained point reads.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from journal import CheckpointKind, Journal, JournalOptions, ManualClock, PointNotRetained

VOL = 192 * 1024
CHUNK = 16 * 1024
OPTS = JournalOptions(segment_size=24 * 1024, chunk_size=CHUNK, pack_target=128 * 1024)


class JournalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cdp-model-")
        self.clock = ManualClock()
        self.j = Journal.open(self.dir, clock=self.clock, options=OPTS)
        self.images: dict[int, bytes] = {}
        self.disk = bytearray(VOL)

    @initialize()
    def declare(self) -> None:
        seq = self.j.add_volume("disk0", VOL)
        self.images[seq] = bytes(self.disk)

    def teardown(self) -> None:
        self.j.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        offset=st.integers(0, VOL - 1),
        length=st.integers(1, 40 * 1024),
        fill=st.binary(min_size=1, max_size=64),
        step_ms=st.integers(-50, 50),
    )
    def write(self, offset: int, length: int, fill: bytes, step_ms: int) -> None:
        length = min(length, VOL - offset)
        data = (fill * (length // len(fill) + 1))[:length]
        self.clock.advance(step_ms * 1_000_000)  # negative: the wall clock steps back
        seq = self.j.write("disk0", offset, data)
        self.disk[offset : offset + length] = data
        self.images[seq] = bytes(self.disk)

    @rule(
        sector=st.integers(0, VOL // 512 - 1),
        sectors=st.integers(1, 80),
        fill=st.binary(min_size=1, max_size=64),
    )
    def write_sectors(self, sector: int, sectors: int, fill: bytes) -> None:
        """Whole 512-byte sectors, as a block device writes: the reader's sector-mask path."""
        offset = sector * 512
        length = min(sectors * 512, VOL - offset)
        data = (fill * (length // len(fill) + 1))[:length]
        seq = self.j.write("disk0", offset, data)
        self.disk[offset : offset + length] = data
        self.images[seq] = bytes(self.disk)

    @rule(offset=st.integers(0, VOL - 1), length=st.integers(1, 64 * 1024), trim=st.booleans())
    def zero(self, offset: int, length: int, trim: bool) -> None:
        length = min(length, VOL - offset)
        seq = self.j.zero("disk0", offset, length, trim=trim)
        self.disk[offset : offset + length] = bytes(length)
        self.images[seq] = bytes(self.disk)

    @rule(name=st.text("abc", min_size=1, max_size=3))
    def checkpoint(self, name: str) -> None:
        seq = self.j.checkpoint(name, CheckpointKind.USER)
        self.images[seq] = bytes(self.disk)
        assert self.j.find_checkpoint(name) is not None

    @rule()
    def sync(self) -> None:
        self.j.sync()

    @rule()
    def seal(self) -> None:
        self.j.seal_pending(100)

    @rule()
    def reopen(self) -> None:
        self.j.close()
        self.j = Journal.open(self.dir, clock=self.clock, options=OPTS)
        assert self.j.recovery.truncated_segment is None  # a clean close leaves no torn tail

    @rule()
    def rebuild_index(self) -> None:
        self.j.sync()  # segment rolls reach the index once their fsync is done
        self.j.store.flush(index=True)  # block rows are indexed in batches: all of them now
        before = self.j.index.dump()
        self.j.rebuild_index()
        assert self.j.index.dump() == before

    @rule(keep_ms=st.integers(0, 400))
    def fold(self, keep_ms: int) -> None:
        self.j.seal_pending(100)
        self.j.apply_retention(keep_ns=keep_ms * 1_000_000)
        first = self.j.window().first_seq
        for s in [s for s in self.images if s < first]:
            del self.images[s]

    @precondition(lambda self: len(self.images) > 0)
    @rule(data=st.data())
    def read_past_point(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.images)))
        offset = data.draw(st.integers(0, VOL - 1))
        length = data.draw(st.integers(1, VOL - offset))
        got = self.j.read("disk0", offset, length, seq)
        assert got == self.images[seq][offset : offset + length], f"seq {seq}"

    @precondition(lambda self: len(self.images) > 0)
    @rule(data=st.data())
    def read_sectors_past_point(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.images)))
        first = data.draw(st.integers(0, VOL // 512 - 1))
        count = data.draw(st.integers(1, VOL // 512 - first))
        offset, length = first * 512, count * 512
        got = self.j.read("disk0", offset, length, seq)
        assert got == self.images[seq][offset : offset + length], f"seq {seq}"

    @invariant()
    def latest_is_exact(self) -> None:
        if self.images:
            assert self.j.read("disk0", 0, VOL) == bytes(self.disk)

    @invariant()
    def window_matches_model(self) -> None:
        w = self.j.window()
        if self.images:
            assert w.last_seq == max(self.images)
            assert w.first_seq <= min(self.images)
        try:
            self.j.read("disk0", 0, 1, w.first_seq - 1 if w.first_seq > 0 else -1)
        except PointNotRetained:
            pass
        else:
            raise AssertionError("a point before the window must not be readable")


JournalModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestJournalModel = JournalModel.TestCase
