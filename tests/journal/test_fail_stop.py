"""Storage errors are fail-stop (reliability.md R10, PostgreSQL fsyncgate).

An EIO from fdatasync may have dropped the dirty pages it was meant to persist (the kernel
marks them clean), so a retried fsync can "succeed" without persisting anything. ``FaultyStorage``
models exactly that. The journal must therefore never retry-and-continue: the failing call
raises, every later write/sync raises ``JournalClosed``, no caller is told "durable" for data
the failed fsync covered, and a reopen (after a power loss, too) gives a valid prefix that
holds every record acknowledged before the failure.
"""

from __future__ import annotations

import contextlib
import errno
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from journal import Journal, JournalClosed, JournalError, JournalOptions, ManualClock
from journal.storage import OsFile, OsStorage

from .faulty_storage import FaultyStorage
from .test_power_loss import LATER, OPTS, SEC, Oracle, abandon, check_image

VOL = 512 * 1024
SMALL = JournalOptions(segment_size=16 * 1024, pack_target=256 * 1024, hash_workers=1)


class Rig:
    """A journal on FaultyStorage plus the oracle of what it acknowledged."""

    def __init__(self, root: str, seed: int = 1, options: JournalOptions | None = None) -> None:
        self.fs = FaultyStorage(root, strict_mkdir=False)
        self.clock = ManualClock()
        self.oracle = Oracle()
        self.rng = random.Random(seed)
        self.j = Journal.open(root, storage=self.fs, clock=self.clock, options=options or OPTS)
        self.append(("vol", "vda", VOL))

    def append(self, op: tuple) -> int:
        self.clock.advance(SEC)
        want = self.oracle.expect(op)
        if op[0] == "vol":
            got = self.j.add_volume(op[1], op[2])
        else:
            got = self.j.write(op[1], op[2], op[3])
        assert got == want
        self.oracle.returned = got
        return got

    def write(self, n: int | None = None) -> int:
        n = n or self.rng.randint(512, 20_000)
        return self.append(("w", "vda", self.rng.randrange(0, VOL - n), self.rng.randbytes(n)))

    def sync(self) -> None:
        target = self.oracle.attempted
        self.j.sync()
        self.oracle.acked = target

    def assert_stopped(self) -> None:
        """Every later write/sync/checkpoint raises JournalClosed."""
        with pytest.raises(JournalClosed):
            self.j.write("vda", 0, b"x" * 512)
        with pytest.raises(JournalClosed):
            self.j.zero("vda", 0, 512)
        with pytest.raises(JournalClosed):
            self.j.checkpoint("after-failure")
        with pytest.raises(JournalClosed):
            self.j.sync()
        assert not self.j.healthy

    def power_loss_then_check(self, mode: str = "drop_all") -> None:
        """Crash image of the current state must reopen to a prefix holding every ack."""
        snap = self.fs.snapshot()
        abandon(self.j)
        img = snap.crash_image(mode, self.rng)
        try:
            check_image(
                img, self.oracle, self.oracle.acked, self.oracle.attempted, LATER(), self.rng
            )
        finally:
            shutil.rmtree(img.root, ignore_errors=True)

    def restart_then_check(self) -> None:
        """A process restart (no power loss): every record write() returned for is there."""
        self.j.close()
        img = self.fs.snapshot().crash_image("process", self.rng)
        try:
            check_image(
                img, self.oracle, self.oracle.returned, self.oracle.attempted, LATER(), self.rng
            )
        finally:
            shutil.rmtree(img.root, ignore_errors=True)


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    r = Rig(str(tmp_path / "j"))
    yield r
    abandon(r.j)


def test_eio_on_fdatasync_stops_the_journal(rig: Rig) -> None:
    for _ in range(5):
        rig.write()
    rig.sync()
    for _ in range(3):
        rig.write()
    fault = rig.fs.fail("sync", path_contains=".hot")
    with pytest.raises(JournalError):
        rig.j.sync()
    assert fault.fired == 1
    rig.assert_stopped()
    rig.power_loss_then_check()


def test_eio_on_fdatasync_is_not_retried(rig: Rig) -> None:
    """After the failed fsync, no later call may reach fsync again and report success."""
    for _ in range(3):
        rig.write()
    rig.fs.fail("sync", path_contains=".hot")
    with pytest.raises(JournalError):
        rig.j.sync()
    syncs = rig.fs.count("sync")
    for _ in range(3):
        with pytest.raises(JournalClosed):
            rig.j.sync()
    assert rig.fs.count("sync") == syncs
    rig.j.close()  # close after a failure must not raise or sync again
    assert rig.fs.count("sync") == syncs


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("partial", [None, 10])
def test_failed_segment_write_stops_the_journal(rig: Rig, err: int, partial: int | None) -> None:
    for _ in range(4):
        rig.write()
    rig.sync()
    rig.write()
    rig.fs.fail("write", err=err, path_contains=".hot", partial=partial)
    rig.clock.advance(SEC)
    rig.oracle.expect(("w", "vda", 0, b"y" * 4096))  # may or may not be on disk
    with pytest.raises(JournalError) as ei:
        rig.j.write("vda", 0, b"y" * 4096)
    assert getattr(ei.value, "errno", None) == err
    rig.assert_stopped()
    rig.restart_then_check()


def test_failed_segment_write_then_power_loss(rig: Rig) -> None:
    for _ in range(4):
        rig.write()
    rig.sync()
    rig.fs.fail("write", err=errno.EIO, path_contains=".hot", partial=100)
    rig.clock.advance(SEC)
    rig.oracle.expect(("w", "vda", 0, b"z" * 8192))
    with pytest.raises(JournalError):
        rig.j.write("vda", 0, b"z" * 8192)
    rig.assert_stopped()
    rig.power_loss_then_check("keep_some")


def test_eio_creating_the_next_segment_stops_the_journal(tmp_path) -> None:
    """The folder fsync of a new segment fails (on the roll thread, off the append path):
    sync() must not report success, and the journal stops."""
    rig = Rig(str(tmp_path / "j"), options=SMALL)  # rolls after a few writes
    rig.sync()
    rig.fs.fail("sync_dir", path_contains="segments")
    try:
        for _ in range(20):
            rig.write(6000)
    except JournalClosed:
        pass  # the roll thread's failure reached a later append first
    with pytest.raises(JournalError):
        rig.sync()
    assert rig.fs.faults[0].fired, "a second segment should have been created"
    rig.assert_stopped()
    rig.restart_then_check()


def test_eio_on_the_roll_fsync_stops_the_journal(tmp_path) -> None:
    """The roll fsync (of the segment being closed) fails: sync() must not report success."""
    rig = Rig(str(tmp_path / "j"), options=SMALL)
    rig.sync()
    rig.fs.fail("sync", path_contains="000000000001.hot")
    try:
        for _ in range(20):
            rig.write(6000)
            if rig.fs.faults[0].fired:
                break
    except JournalClosed:
        pass  # the roll thread's failure reached a later append first
    with pytest.raises(JournalError):
        rig.sync()
    assert rig.fs.faults[0].fired, "the first segment should have rolled"
    rig.assert_stopped()
    rig.power_loss_then_check()


def test_group_commit_waiter_is_not_told_durable_after_failed_fsync(rig: Rig) -> None:
    """Two callers share one fdatasync; it fails; neither may return as if durable.

    The leader raises. A caller that waited for the leader's fsync (its records were covered
    by that fsync) must raise too: neither return at once as if durable, nor take over as
    leader and retry the fsync (after fsyncgate a retried fsync succeeds without persisting).
    """
    for _ in range(3):
        rig.write()
    entered, release = threading.Event(), threading.Event()

    def hold_the_fsync(kind: str, path: str) -> None:
        if kind == "sync" and path.endswith(".hot") and not entered.is_set():
            entered.set()
            assert release.wait(10)

    rig.fs.before_op = hold_the_fsync
    rig.fs.fail("sync", path_contains=".hot")
    results: dict[str, BaseException | None] = {}

    def call_sync(name: str) -> None:
        try:
            rig.j.sync()
            results[name] = None
        except BaseException as e:
            results[name] = e

    leader = threading.Thread(target=call_sync, args=("leader",))
    leader.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=call_sync, args=("waiter",))
    waiter.start()
    deadline = time.monotonic() + 10
    while not rig.j._sync_cv._waiters:  # type: ignore[attr-defined]  # the waiter is parked
        assert time.monotonic() < deadline, "the second sync() never waited for the first"
        time.sleep(0.001)
    release.set()
    leader.join(10)
    waiter.join(10)
    assert isinstance(results["leader"], JournalError)
    assert isinstance(results["waiter"], JournalError), (
        "sync() returned normally to a caller whose records the failed fdatasync covered "
        f"(got {results['waiter']!r})"
    )


def test_eio_on_pack_fsync_while_sealing_is_fail_stop(tmp_path) -> None:
    """A failed pack fsync during seal_pending must not be retried and trusted later."""
    rig = Rig(str(tmp_path / "j"), options=SMALL)
    for _ in range(8):
        rig.write(6000)
    rig.sync()
    rig.fs.fail("sync", path_contains=".pack")
    with pytest.raises((JournalError, OSError)):
        rig.j.seal_pending(100)
    rig.assert_stopped()


def test_eio_on_pack_fsync_then_retry_loses_nothing(tmp_path) -> None:
    """fsyncgate through the sealer: after a failed pack fsync, retrying the seal must not
    make sealed segments reference blocks whose bytes never reached the disk."""
    rig = Rig(str(tmp_path / "j"), options=SMALL)
    for _ in range(8):
        rig.write(6000)
    rig.sync()
    rig.fs.fail("sync", path_contains=".pack")
    with pytest.raises((JournalError, OSError)):
        rig.j.seal_pending(100)
    with contextlib.suppress(JournalError, OSError):
        rig.j.seal_pending(100)  # what a background sealer loop would do next
    rig.power_loss_then_check()


class _SlowHotSync(OsFile):
    """A hot segment whose fdatasync takes a while, as on a disk busy with writeback."""

    def sync(self) -> None:
        time.sleep(0.3)
        super().sync()


class _SlowHotStorage(OsStorage):
    def open(self, path: str, *, create: bool = False) -> OsFile:
        f = super().open(path, create=create)
        if path.endswith(".hot"):
            fd, f._fd = f._fd, -1  # hand the descriptor over to the slow kind
            return _SlowHotSync(path, fd)
        return f


def test_seal_pending_finds_a_segment_whose_roll_is_still_fsyncing(tmp_path: Path) -> None:
    """A roll fsyncs in the roll thread; sealing right after the write that rolled used to
    find nothing (test_snapshots failed so under CI load). It now waits for that roll."""
    opts = JournalOptions(segment_size=64 * 1024)
    j = Journal.open(str(tmp_path / "j"), storage=_SlowHotStorage(), options=opts)
    j.add_volume("v", 1 << 20)
    for k in range(20):  # 80 KiB: the first segment rolls
        j.write("v", k * 4096, bytes([k + 1]) * 4096)
    assert j.seal_pending(10) >= 1
    assert j.read("v", 0, 4096) == b"\1" * 4096
    j.close()
