"""Simulated power loss (reliability.md C2, C3): every crash image opens to a durable prefix.

A seeded workload (writes of 512 B..200 KiB, zeroes, checkpoints, syncs, segment rolls,
seal_pending, a snapshot hold, two apply_retention passes, clean reopens) runs on
``FaultyStorage``. An oracle keeps every record by seq and the highest seq covered by a
completed ``sync()`` (acknowledged durable). The storage state is frozen after every mutating
operation; each frozen state is turned into crash images (drop_all, keep_some, reorder,
dirents; one in five without the SQLite index, one in five with the index of an earlier
point) and reopened. Each must:

- open without an exception;
- keep every acknowledged-durable record: last seq >= acked, and every acknowledged hold;
- hold a gap-free prefix of what was appended: seqs first+1..last, each equal to the oracle's;
- read, at several seqs of its window, exactly the oracle's volume contents;
- take new appends, and after ``sync()`` survive a further drop-all crash with all of them.

Seeds are printed in every failure; rerun one with ``CDP_POWER_SEED=<seed>``. With the roll
fsync inline (the default here) a seed replays the same storage operations; tests marked
``threaded`` use the journal's roll thread and add interleavings that do not replay exactly.
The full sweep (every operation, every mode, more seeds) is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import pytest

from journal import Journal, JournalOptions, ManualClock, SegmentCorrupt
from journal.types import CheckpointRecord, Record, VolumeRecord, WriteRecord, ZeroRecord

from .faulty_storage import MUTATING, FaultyStorage, OpRecord, SimulatedCrash, Snapshot

OPTS = JournalOptions(segment_size=64 * 1024, pack_target=256 * 1024, hash_workers=1)
VOLS = {"vda": 768 * 1024, "vdb": 256 * 1024}
SEC = 1_000_000_000
IMAGE_MODES = ("drop_all", "keep_some", "reorder", "dirents")


def LATER() -> ManualClock:  # a clock past anything the workloads wrote
    return ManualClock(1_800_000_000 * SEC)


Op = tuple  # ("vol", name, size) | ("w", vol, off, data) | ("z", vol, off, len) | ("ck", name)


# ---------------------------------------------------------------------- workload and oracle
def make_steps(seed: int, n: int) -> list[tuple]:
    """A deterministic workload: the same seed gives the same storage operations."""
    rng = random.Random(seed)
    steps: list[tuple] = [("vol", "vda", VOLS["vda"]), ("vol", "vdb", VOLS["vdb"]), ("sync",)]
    retention_at = rng.randrange(n // 2, n * 3 // 4)
    reopen_at = rng.randrange(n // 4, n // 2)
    second_retention_at = n - max(3, n // 8)  # right after a reopen: no current pack
    hold_at = rng.randrange(n // 8, n // 3)  # held through the first fold, released before
    release_at = rng.randrange(retention_at + 1, second_retention_at)
    for i in range(n):
        if i == hold_at:
            steps.append(("hold", "snap-a"))
        if i == release_at:
            steps.append(("release", "snap-a"))
        if i == retention_at:
            steps.append(("seal", 100))
            steps.append(("retention", (i // 2) * SEC))
        if i == second_retention_at:
            steps.append(("seal", 100))
            steps.append(("reopen",))
            steps.append(("retention", (i // 4) * SEC))
        if i == reopen_at:
            steps.append(("reopen",))
        r = rng.random()
        if r < 0.55:
            vol = rng.choice(("vda", "vda", "vdb"))
            size = rng.choice((512, 4096, rng.randint(512, 200 * 1024)))
            size = min(size, VOLS[vol])
            off = rng.randrange(0, VOLS[vol] - size + 1)
            if rng.random() < 0.5:
                off -= off % 512
            kind = rng.random()
            if kind < 0.5:
                data = rng.randbytes(size)
            elif kind < 0.8:  # compressible: exercises the zstd path of the block store
                data = (rng.randbytes(rng.randint(1, 64)) * (size // 8 + 1))[:size]
            else:
                data = bytes([rng.randrange(256)]) * size
            steps.append(("w", vol, off, data))
        elif r < 0.63:
            vol = rng.choice(("vda", "vdb"))
            length = rng.randint(1, 96 * 1024)
            length = min(length, VOLS[vol])
            steps.append(("z", vol, rng.randrange(0, VOLS[vol] - length + 1), length))
        elif r < 0.68:
            steps.append(("ck", f"ck{i}"))
        elif r < 0.84:
            steps.append(("sync",))
        elif r < 0.94:
            steps.append(("seal", rng.randint(1, 3)))
        else:
            steps.append(("sync",))
            steps.append(("seal", 2))
    return steps


@dataclass
class Oracle:
    ops: dict[int, Op] = field(default_factory=dict)
    acked: int = 0  # every seq <= acked was covered by a completed sync()
    attempted: int = 0  # the highest seq that may have reached the storage
    returned: int = 0  # the highest seq an append call returned (handed to the OS)
    holds: dict[str, int] = field(default_factory=dict)  # set_hold returned, no release yet
    _cache: dict[int, dict[str, bytes]] = field(default_factory=dict)

    def expect(self, op: Op) -> int:
        self.attempted += 1
        self.ops[self.attempted] = op
        return self.attempted

    def model_at(self, seq: int) -> dict[str, bytes]:
        """Every declared volume's content as of seq (replayed from a cache every 16 seqs)."""
        base = seq - seq % 16
        vols = {k: bytearray(v) for k, v in self._base(base).items()}
        self._replay(vols, base + 1, seq)
        return {k: bytes(v) for k, v in vols.items()}

    def _base(self, b: int) -> dict[str, bytes]:
        got = self._cache.get(b)
        if got is None:
            vols = {k: bytearray(v) for k, v in (self._base(b - 16) if b else {}).items()}
            self._replay(vols, b - 15 if b else 1, b)
            got = self._cache[b] = {k: bytes(v) for k, v in vols.items()}
        return got

    def _replay(self, vols: dict[str, bytearray], lo: int, hi: int) -> None:
        for s in range(lo, hi + 1):
            op = self.ops.get(s)
            if op is None:
                continue
            if op[0] == "vol":
                vols.setdefault(op[1], bytearray(op[2]))
            elif op[0] == "w":
                vols[op[1]][op[2] : op[2] + len(op[3])] = op[3]
            elif op[0] == "z":
                vols[op[1]][op[2] : op[2] + op[3]] = bytes(op[3])

    def check_record(self, rec: Record) -> None:
        op = self.ops.get(rec.seq)
        assert op is not None, f"recovered seq {rec.seq} was never appended"
        if isinstance(rec, WriteRecord):
            assert op[0] == "w", f"seq {rec.seq}: write recovered, {op[0]} appended"
            assert (rec.volume, rec.offset, rec.length) == (op[1], op[2], len(op[3])), rec.seq
            if rec.data is not None:
                assert rec.data == op[3], f"seq {rec.seq}: inline data differs"
        elif isinstance(rec, ZeroRecord):
            assert op[0] == "z" and (rec.volume, rec.offset, rec.length) == op[1:], rec.seq
        elif isinstance(rec, CheckpointRecord):
            assert op[0] == "ck" and rec.name == op[1], rec.seq
        elif isinstance(rec, VolumeRecord):
            assert op[0] == "vol" and (rec.volume, rec.size) == op[1:], rec.seq
        else:  # pragma: no cover
            raise AssertionError(f"unknown record {rec!r}")


class InlineExecutor(Executor):
    """Runs the journal's background roll fsync at once, in the caller's thread.

    With it a seed gives the same storage operations every run (so a failure replays from its
    seed); the threaded roll adds interleavings and is exercised with ``threaded=True``.
    """

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except SimulatedCrash:
            raise
        except BaseException as e:
            fut.set_exception(e)
        return fut


def open_journal(fs: FaultyStorage, clock: ManualClock, *, threaded: bool = False) -> Journal:
    j = Journal.open(fs.root, storage=fs, clock=clock, options=OPTS)
    if not threaded and hasattr(j, "_roller"):
        j._roller.shutdown()
        j._roller = InlineExecutor()
    return j


def abandon(j: Journal | None) -> None:
    """Drop a journal as a crash would: no sync, no close of segments; free SQLite/threads."""
    if j is None:
        return
    with contextlib.suppress(Exception):
        j.index.close()
    with contextlib.suppress(Exception):
        j._roller.shutdown(wait=True)  # the background roll fsync, if any
    with contextlib.suppress(Exception):
        j.store._pool.shutdown(wait=True)


def run_workload(
    fs: FaultyStorage,
    steps: list[tuple],
    oracle: Oracle,
    clock: ManualClock,
    *,
    threaded: bool = False,
) -> Journal | None:
    """Run the steps; returns the open journal, or None if the storage 'lost power'."""
    j: Journal | None = None
    try:
        j = open_journal(fs, clock, threaded=threaded)
        for st in steps:
            clock.advance(SEC)
            kind = st[0]
            if kind in ("vol", "w", "z", "ck"):
                want = oracle.expect(st)
                if kind == "vol":
                    got = j.add_volume(st[1], st[2])
                elif kind == "w":
                    got = j.write(st[1], st[2], st[3])
                elif kind == "z":
                    got = j.zero(st[1], st[2], st[3])
                else:
                    got = j.checkpoint(st[1])
                assert got == want, f"journal gave seq {got}, oracle expected {want}"
                oracle.returned = got
            elif kind == "sync":
                target = oracle.attempted
                j.sync()
                oracle.acked = target
            elif kind == "seal":
                j.seal_pending(st[1])
            elif kind == "retention":
                j.apply_retention(keep_ns=st[1])
            elif kind == "hold":
                seq = oracle.returned
                j.set_hold("snapshot", st[1], seq)
                oracle.holds[st[1]] = seq
            elif kind == "release":
                del oracle.holds[st[1]]  # from the call on, either state may survive
                j.release_hold("snapshot", st[1])
            elif kind == "reopen":
                target = oracle.attempted
                j.close()
                oracle.acked = target
                j = None
                j = open_journal(fs, clock, threaded=threaded)
        return j
    except SimulatedCrash:
        abandon(j)
        return None


# ---------------------------------------------------------------------- checking one image
@dataclass
class Point:
    """A frozen storage state and what the oracle knew at that moment."""

    op: OpRecord
    snap: Snapshot
    acked: int
    attempted: int
    returned: int
    holds: dict[str, int] = field(default_factory=dict)


def check_image(
    img: FaultyStorage,
    oracle: Oracle,
    acked: int,
    attempted: int,
    clock: ManualClock,
    rng: random.Random,
    holds: dict[str, int] | None = None,
) -> str:
    """Reopen a crash image and check every promise; returns a one-line summary.

    ``holds``: snapshot holds whose set_hold() had returned (and no release had begun); each
    must survive, and no fold may have passed it.
    """
    j = open_journal(img, clock)  # must not raise
    try:
        w = j.window()
        for name, seq in (holds or {}).items():
            h = j.holds.get(("snapshot", name))
            assert h is not None and h.seq == seq, f"hold {name} at seq {seq} lost: {j.holds}"
            assert w.first_seq <= seq, f"history folded to {w.first_seq}, past hold {name}@{seq}"
        assert w.last_seq >= acked, (
            f"acknowledged-durable seq {acked} lost: recovered last seq {w.last_seq}"
        )
        assert w.last_seq <= attempted, f"seq {w.last_seq} recovered, only {attempted} appended"
        recs = list(j.records(w.first_seq + 1))
        seqs = [r.seq for r in recs]
        assert seqs == list(range(w.first_seq + 1, w.last_seq + 1)), (
            f"not a gap-free prefix: window {w.first_seq}..{w.last_seq}, records "
            f"{seqs[:5]}..{seqs[-5:]}"
        )
        for r in recs:
            oracle.check_record(r)
        lo = max(w.first_seq, 1)
        if w.last_seq >= lo:
            picks = {w.last_seq, lo, min(max(acked, lo), w.last_seq)}
            picks |= {rng.randint(lo, w.last_seq) for _ in range(2)}
            for s in sorted(picks):
                for vol, want in oracle.model_at(s).items():
                    got = j.read(vol, 0, len(want), at=s)
                    assert got == want, f"{vol} at seq {s} differs from the oracle"
        # appends continue, and a further power loss after sync() keeps all of them
        model = oracle.model_at(w.last_seq)
        more: list[tuple[str, int, bytes]] = []
        for vol in model:
            size = len(model[vol])
            n = rng.randint(512, 64 * 1024)
            off = rng.randrange(0, size - n + 1)
            data = rng.randbytes(n)
            clock.advance(SEC)
            j.write(vol, off, data)
            more.append((vol, off, data))
        clock.advance(SEC)
        j.checkpoint("after-recovery")
        j.sync()
        last = j.window().last_seq
        snap = img.snapshot()
    finally:
        abandon(j)
    img2 = snap.crash_image("drop_all", rng)
    try:
        j2 = open_journal(img2, clock)
        try:
            assert j2.window().last_seq == last, "records synced after recovery were lost"
            for vol, off, data in more:
                model[vol] = model[vol][:off] + data + model[vol][off + len(data) :]
            for vol, want in model.items():
                assert j2.read(vol, 0, len(want)) == want, f"{vol} after recovery+append"
            if w.last_seq >= lo:
                for vol, want in oracle.model_at(w.last_seq).items():
                    assert j2.read(vol, 0, len(want), at=w.last_seq) == want
        finally:
            j2.close()
    finally:
        shutil.rmtree(img2.root, ignore_errors=True)
    return f"window {w.first_seq}..{w.last_seq}, acked {acked}, appended {attempted}"


def check_point(
    pt: Point,
    mode: str,
    oracle: Oracle,
    rng: random.Random,
    *,
    index: str = "as-is",
    stale_from: Point | None = None,
) -> None:
    """Check one crash image of a frozen state.

    ``index``: "as-is" keeps the SQLite index as it was at the crash; "deleted" removes it;
    "stale" puts back the index as it was at the earlier point ``stale_from`` (with
    ``PRAGMA synchronous=NORMAL`` a power loss may roll back the last WAL commits, so the
    index can lag behind the segments and packs; it is a cache and must be reconciled).
    """
    img = pt.snap.crash_image(mode, rng)
    try:
        if index != "as-is":
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(img.root, "index.sqlite" + suffix))
        if index == "stale":
            assert stale_from is not None
            for rel, data in stale_from.snap.real.items():
                if rel.startswith("index.sqlite") and not rel.endswith("-shm"):
                    with open(os.path.join(img.root, rel), "wb") as f:
                        f.write(data)
        check_image(img, oracle, pt.acked, pt.attempted, LATER(), rng, pt.holds)
    finally:
        shutil.rmtree(img.root, ignore_errors=True)


def record_points(
    root: str, seed: int, n_steps: int, strict_mkdir: bool, *, threaded: bool = False
) -> tuple[Oracle, list[Point], FaultyStorage]:
    """Run the workload once, freezing the storage after every mutating operation."""
    oracle = Oracle()
    points: list[Point] = []
    fs = FaultyStorage(root, strict_mkdir=strict_mkdir)

    def after(st: FaultyStorage, rec: OpRecord) -> None:
        if rec.kind in MUTATING:
            points.append(
                Point(
                    rec,
                    st.snapshot(),
                    oracle.acked,
                    oracle.attempted,
                    oracle.returned,
                    dict(oracle.holds),
                )
            )

    fs.after_op = after
    j = run_workload(fs, make_steps(seed, n_steps), oracle, ManualClock(), threaded=threaded)
    assert j is not None
    fs.after_op = None
    abandon(j)
    return oracle, points, fs


@dataclass
class Failures:
    seed: int
    items: list[str] = field(default_factory=list)
    checked: int = 0

    @contextlib.contextmanager
    def case(self, what: str) -> Iterator[None]:
        self.checked += 1
        try:
            yield
        except SimulatedCrash:
            raise
        except Exception as e:
            self.items.append(f"{what}: {type(e).__name__}: {e}")

    def assert_none(self) -> None:
        if self.items:
            kinds: dict[str, int] = {}
            for it in self.items:
                key = it.split(": ", 1)[1][:90]
                kinds[key] = kinds.get(key, 0) + 1
            summary = "\n".join(
                f"  {n} x {k}" for k, n in sorted(kinds.items(), key=lambda x: -x[1])
            )
            first = "\n".join("  " + it for it in self.items[:8])
            raise AssertionError(
                f"seed {self.seed} (rerun: CDP_POWER_SEED={self.seed}): {len(self.items)} of "
                f"{self.checked} crash images failed\nby kind:\n{summary}\nfirst:\n{first}"
            )


def seeds(default: list[int]) -> list[int]:
    env = os.environ.get("CDP_POWER_SEED")
    return [int(s) for s in env.split(",")] if env else default


def sweep(
    tmp_path,
    seed: int,
    n_steps: int,
    points_wanted: int | None,
    modes: tuple[str, ...],
    *,
    rotate: bool,
    strict_mkdir: bool,
    threaded: bool = False,
) -> Failures:
    """Check crash images of (a stride over) every mutating op of one workload.

    ``rotate``: one mode per point, rotating; otherwise every mode at every point. One image
    in five loses its SQLite index (open() must rebuild it), one in five gets the index of an
    earlier point (a lagging cache open() must reconcile).
    """
    oracle, points, fs = record_points(
        str(tmp_path / "run"), seed, n_steps, strict_mkdir, threaded=threaded
    )
    kinds = {p.op.kind for p in points}
    assert {"append", "sync", "sync_dir", "create", "replace", "remove"} <= kinds
    rng = random.Random(seed * 7919)
    fails = Failures(seed)
    stride = max(1, len(points) // points_wanted) if points_wanted else 1
    chosen = points[::stride]
    if chosen[-1] is not points[-1]:
        chosen.append(points[-1])
    n = 0
    for pt in chosen:
        for mode in [modes[n % len(modes)]] if rotate else modes:
            n += 1
            index = {4: "deleted", 2: "stale"}.get(n % 5, "as-is")
            stale_from = points[rng.randrange(0, points.index(pt) + 1)]
            what = (
                f"seed {seed} op {pt.op.n} ({pt.op.kind} "
                f"{os.path.relpath(pt.op.path, fs.root)}) mode {mode} index {index}"
                f"{f' of op {stale_from.op.n}' if index == 'stale' else ''}"
            )
            with fails.case(what):
                check_point(pt, mode, oracle, rng, index=index, stale_from=stale_from)
    return fails


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize(
    ("seed", "threaded"), [(s, s % 2 == 0) for s in seeds([11, 12])], ids=lambda v: str(v)
)
def test_crash_after_every_kth_operation(tmp_path, seed: int, threaded: bool) -> None:
    """C2/C3: a stride over every mutating storage op, each in a rotating crash mode.

    Odd seeds run the roll fsync inline (the op sequence replays exactly from the seed), even
    seeds on the journal's roll thread (more interleavings, not exactly replayable).
    """
    sweep(
        tmp_path, seed, 70, 60, IMAGE_MODES, rotate=True, strict_mkdir=False, threaded=threaded
    ).assert_none()


@pytest.mark.parametrize("seed", seeds([21]))
def test_crash_at_random_points_stops_the_process(tmp_path, seed: int) -> None:
    """A real stop: operation k+1 raises, the journal object is dropped mid-call."""
    steps = make_steps(seed, 50)
    probe = FaultyStorage(str(tmp_path / "probe"), strict_mkdir=False)
    j = run_workload(probe, steps, Oracle(), ManualClock(), threaded=True)
    abandon(j)
    total = probe.ops
    rng = random.Random(seed)
    fails = Failures(seed)
    for n in range(8):
        k = rng.randrange(1, total)
        fs = FaultyStorage(str(tmp_path / f"run{n}"), strict_mkdir=False, crash_after=k)
        oracle = Oracle()
        j = run_workload(fs, steps, oracle, ManualClock(), threaded=True)
        abandon(j)
        assert j is None, "no crash happened"
        assert fs.ops == k
        for mode in rng.sample(IMAGE_MODES, 2):
            img = fs.crash_image(mode, rng)
            with fails.case(f"seed {seed} crash after op {k} mode {mode}"):
                check_image(img, oracle, oracle.acked, oracle.attempted, LATER(), rng, oracle.holds)
            shutil.rmtree(img.root, ignore_errors=True)
    fails.assert_none()


def _small_journal(
    tmp_path, seed: int
) -> tuple[FaultyStorage, Journal, ManualClock, Oracle, random.Random]:
    """A journal of 16 KiB segments on simulated storage: a few writes roll it."""
    root = str(tmp_path / "run")
    fs = FaultyStorage(root, strict_mkdir=False)
    clock, oracle, rng = ManualClock(), Oracle(), random.Random(seed)
    opts = JournalOptions(segment_size=16 * 1024, pack_target=256 * 1024, hash_workers=1)
    return fs, Journal.open(root, storage=fs, clock=clock, options=opts), clock, oracle, rng


def _appender(j: Journal, clock: ManualClock, oracle: Oracle) -> Callable[[tuple], None]:
    """``append(op)``: one volume declaration or write, checked against the oracle."""

    def append(op: tuple) -> None:
        clock.advance(SEC)
        want = oracle.expect(op)
        got = j.add_volume(*op[1:]) if op[0] == "vol" else j.write(*op[1:])
        assert got == want
        oracle.returned = got

    return append


def _start_synced(
    j: Journal, append: Callable[[tuple], None], oracle: Oracle, rng: random.Random
) -> None:
    """A volume and one write, synced: what every later crash must keep."""
    append(("vol", "vda", VOLS["vda"]))
    append(("w", "vda", 0, rng.randbytes(6000)))
    j.sync()
    oracle.acked = oracle.attempted


@pytest.mark.parametrize("next_seg", ["header only", "header and torn frame"])
def test_rolled_segment_loses_its_tail_before_the_roll_fsync(tmp_path, next_seg: str) -> None:
    """The roll fsync runs on a thread: power can fail before it, after the next segment's
    header reached the disk. Then segment N ends early (its unsynced records are lost) and
    segment N+1 starts at a seq beyond that end. Recovery must drop N+1 (nothing in it was
    ever synced) and continue at N's end; and the journal must open again after new syncs.
    """
    root = str(tmp_path / "run")
    fs = FaultyStorage(root, strict_mkdir=False)
    clock, oracle, rng = ManualClock(), Oracle(), random.Random(7)
    opts = JournalOptions(segment_size=16 * 1024, pack_target=256 * 1024, hash_workers=1)
    j = Journal.open(root, storage=fs, clock=clock, options=opts)
    main, release = threading.current_thread(), threading.Event()

    def hold_roll_fsync(kind: str, path: str) -> None:
        if kind == "sync" and threading.current_thread() is not main:
            release.wait(10)

    fs.before_op = hold_roll_fsync

    append = _appender(j, clock, oracle)
    _start_synced(j, append, oracle, rng)
    append(("w", "vda", 8192, rng.randbytes(6000)))
    append(("w", "vda", 16384, rng.randbytes(6000)))  # rolls segment 1; its fsync is held
    hot = sorted(p for p in fs.files() if p.endswith(".hot"))
    assert hot == ["segments/000000000001.hot", "segments/000000000002.hot"], hot
    snap = fs.snapshot()
    release.set()
    abandon(j)
    durable = snap.crash_image_files("drop_all", rng)
    cached = snap.crash_image_files("process", rng)
    img = snap.crash_image("process", rng)
    try:
        seg1, seg2 = (os.path.join(img.root, h) for h in hot)
        img.write_file(seg1, durable[hot[0]])  # seqs 3.. never reached the disk
        keep = 56 if next_seg == "header only" else 56 + 30
        img.write_file(seg2, cached[hot[1]][:keep])  # segment 2 header (first seq 4) did
        check_image(img, oracle, oracle.acked, oracle.attempted, LATER(), rng)
    finally:
        shutil.rmtree(img.root, ignore_errors=True)


def test_a_new_segment_whose_name_was_lost_is_dropped_with_what_follows(tmp_path) -> None:
    """A new segment's folder fsync runs on the roll thread, after appends to it begin. Power
    can fail before it, and a filesystem may keep a later segment's name but not that one
    (the "dirents" crash mode). Then a whole segment is missing: nothing in it or after it
    was ever synced, so recovery drops what follows; a durability note in a later segment
    vouching only for older segments is no evidence against that. (Found by the slow sweep,
    seed 102.)
    """
    fs, j, clock, oracle, rng = _small_journal(tmp_path, 8)
    main = threading.current_thread()
    hold, held, go_on, release = (threading.Event() for _ in range(4))

    def hold_folder_fsync(kind: str, path: str) -> None:
        if not hold.is_set() or threading.current_thread() is main:
            return
        if kind == "sync":  # segment 1's roll fsync: until segment 3 exists
            go_on.wait(10)
        elif kind == "sync_dir":  # segment 2's folder fsync: until the crash
            held.set()
            release.wait(10)

    fs.before_op = hold_folder_fsync

    append = _appender(j, clock, oracle)
    _start_synced(j, append, oracle, rng)
    hold.set()
    for k in range(1, 8):  # rolls into segment 2, then 3
        append(("w", "vda", k * 8192, rng.randbytes(6000)))
    # Segment 1's roll fsync completes now, so its note ("segments up to 1 are durable")
    # goes into segment 3; segment 2's folder fsync, queued after it, is held.
    go_on.set()
    assert held.wait(10)
    hot = sorted(p for p in fs.files() if p.endswith(".hot"))
    assert len(hot) >= 3, hot
    snap = fs.snapshot()
    release.set()
    abandon(j)
    img = snap.crash_image("process", rng)
    try:
        img.remove(os.path.join(img.root, hot[1]))  # segment 2's name never reached the disk
        check_image(img, oracle, oracle.acked, oracle.attempted, LATER(), rng)
    finally:
        shutil.rmtree(img.root, ignore_errors=True)


def test_a_note_for_any_missing_segment_proves_damage(tmp_path) -> None:
    """Two segments gone, and a later one holds a note that the first of them was durable: its
    folder fsync had run, so losing it is damage, never a torn tail to drop quietly."""
    fs, j, clock, oracle, rng = _small_journal(tmp_path, 12)
    main = threading.current_thread()
    hold, two, three, release = (threading.Event() for _ in range(4))

    def hold_roll_fsyncs(kind: str, path: str) -> None:
        if not hold.is_set() or kind != "sync" or threading.current_thread() is main:
            return
        if path.endswith("000000000002.hot"):
            two.wait(10)  # segment 2's roll fsync: until segment 4 exists
        elif path.endswith("000000000003.hot"):
            three.set()
            release.wait(10)  # segment 3's: until the crash

    fs.before_op = hold_roll_fsyncs
    append = _appender(j, clock, oracle)
    _start_synced(j, append, oracle, rng)
    hold.set()
    k = 1
    while not any(p.endswith("000000000004.hot") for p in fs.files()):
        append(("w", "vda", k * 8192, rng.randbytes(6000)))
        k += 1
    two.set()  # the note "segments up to 2 are durable" goes into segment 4
    assert three.wait(10)
    snap = fs.snapshot()
    release.set()
    abandon(j)
    img = snap.crash_image("process", rng)
    try:
        for n in (2, 3):
            img.remove(os.path.join(img.root, f"segments/{n:012d}.hot"))
        with pytest.raises(SegmentCorrupt, match="a segment is missing"):
            open_journal(img, ManualClock())
    finally:
        shutil.rmtree(img.root, ignore_errors=True)


def test_kill9_keeps_every_appended_record(tmp_path) -> None:
    """A process crash (page cache survives) loses nothing that write() returned for."""
    oracle, points, _fs = record_points(str(tmp_path / "run"), 5, 40, strict_mkdir=False)
    rng = random.Random(5)
    fails = Failures(5)
    for pt in points[:: max(1, len(points) // 25)]:
        img = pt.snap.crash_image("process", rng)
        with fails.case(f"op {pt.op.n} ({pt.op.kind})"):
            check_image(img, oracle, pt.returned, pt.attempted, LATER(), rng, pt.holds)
        shutil.rmtree(img.root, ignore_errors=True)
    fails.assert_none()


@pytest.mark.parametrize("seed", seeds([41]))
def test_crash_during_recovery(tmp_path, seed: int) -> None:
    """A second power loss at any storage op of open() repairing the first crash image."""
    oracle, points, _fs = record_points(str(tmp_path / "run"), seed, 50, strict_mkdir=False)
    rng = random.Random(seed)
    fails = Failures(seed)
    for pt in rng.sample(points, 10):
        mode = rng.choice(("keep_some", "reorder", "dirents"))
        img = pt.snap.crash_image(mode, rng)
        inner: list[tuple[OpRecord, Snapshot]] = []

        def after(st: FaultyStorage, rec: OpRecord) -> None:
            if rec.kind in MUTATING:
                inner.append((rec, st.snapshot()))  # noqa: B023 - used before the next loop

        img.after_op = after
        with fails.case(f"seed {seed} op {pt.op.n} mode {mode}: first reopen"):
            j = open_journal(img, LATER())
            img.after_op = None
            abandon(j)
        for rec, snap in inner:
            mode2 = rng.choice(IMAGE_MODES)
            img2 = snap.crash_image(mode2, rng)
            with fails.case(
                f"seed {seed} op {pt.op.n} mode {mode}, then recovery op {rec.n} ({rec.kind} "
                f"{os.path.relpath(rec.path, img.root)}) mode {mode2}"
            ):
                check_image(img2, oracle, pt.acked, pt.attempted, LATER(), rng, pt.holds)
            shutil.rmtree(img2.root, ignore_errors=True)
        shutil.rmtree(img.root, ignore_errors=True)
    assert fails.checked > 10
    fails.assert_none()


def test_new_folders_are_durable_before_use(tmp_path) -> None:
    """ALICE: a folder created by makedirs survives power loss only once its parent is synced.

    The journal creates ``packs/`` (and ``segments/``), then creates and fsyncs files inside
    them and fsyncs those folders; unless the journal root is fsynced after the mkdir, a power
    loss can drop the whole folder with every block that sealed segments reference.
    """
    fs = FaultyStorage(str(tmp_path / "run"), strict_mkdir=True)
    clock = ManualClock()
    oracle = Oracle()
    j = open_journal(fs, clock)
    rng = random.Random(31)
    for st in [("vol", "vda", VOLS["vda"])] + [
        ("w", "vda", i * 64 * 1024, rng.randbytes(64 * 1024)) for i in range(4)
    ]:
        clock.advance(SEC)
        seq = oracle.expect(st)
        assert (j.add_volume(*st[1:]) if st[0] == "vol" else j.write(*st[1:])) == seq
    j.sync()
    oracle.acked = oracle.returned = oracle.attempted
    assert j.seal_pending(100) > 0
    snap = fs.snapshot()
    abandon(j)
    img = snap.crash_image("drop_all", rng)
    try:
        assert "packs" in img.listdir(img.root) and img.listdir(os.path.join(img.root, "packs")), (
            "the packs/ folder did not survive power loss although sealed segments "
            "(fsynced and renamed into place) reference blocks inside it"
        )
        check_image(img, oracle, oracle.acked, oracle.attempted, LATER(), rng)
    finally:
        shutil.rmtree(img.root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds([101, 102, 103, 104]))
def test_crash_sweep_every_op_every_mode(tmp_path, seed: int) -> None:
    """Every mutating op x every mode; odd seeds inline roll fsync, even seeds threaded."""
    sweep(
        tmp_path,
        seed,
        90,
        None,
        IMAGE_MODES,
        rotate=False,
        strict_mkdir=False,
        threaded=seed % 2 == 0,
    ).assert_none()


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds([201, 202]))
def test_crash_sweep_strict_folders(tmp_path, seed: int) -> None:
    sweep(tmp_path, seed, 90, 300, IMAGE_MODES, rotate=True, strict_mkdir=True).assert_none()
