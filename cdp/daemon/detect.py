"""The daemon's side of the corruption detector: the ring, the worker process, its requests.

Capture hands each write to the ring through the journal's tap (cdp/detector_feed.py); the
worker (cdp/detector_worker.py) scores it in its own process, a few milliseconds later, and
asks this side only for what it cannot know: what a block held before (the journal, once
per block it has not seen) and what the ring dropped (read back with ``read_durable``). On
a detection this side pins the last clean point (cdp/daemon/quarantine.py). A worker that
dies is started again, and resumes from the last seq it reported scored, so every write is
scored once, and the detector never takes capture down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import msgpack

from cdp.daemon.quarantine import Quarantine, pin_clean_point
from cdp.detector import BLOCK, Detection, DetectorConfig
from cdp.detector_feed import DEFAULT_CAPACITY, Ring, RingWriter
from cdp.detector_worker import FRAME_LEN, MAX_FRAME, encode_records, frame
from journal import Journal, JournalError, PointNotRetained, Record, WriteRecord
from journal.journal import TailCursor

log = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0
MAX_STUCK = 3  # restarts without progress before the detector skips the stretch


class _Reopened(Exception):
    """The group's journal was reopened (after a failure): tap the new one from a clean
    start, since a truncated tail may give seqs already seen to new writes."""


@dataclass(slots=True)
class DetectorState:
    """What status shows of a group's detector."""

    sampled: int = 0
    sampled_bytes: int = 0
    scored_seq: int = 0  # every write at or before it was scored
    dropped: int = 0  # tap batches the ring had no room for (read back instead)
    restarts: int = 0  # worker processes started again after one died


class DetectedGroup(Protocol):
    """The part of a consistency group the detector uses."""

    name: str
    journal: Journal
    detector: DetectorState | None
    quarantines: list[Quarantine]


@dataclass(frozen=True, slots=True)
class DetectorSetup:
    """What a group's detector is started with."""

    config: DetectorConfig
    excluded: frozenset[str]  # volumes with ``detect = false``
    chunk_size: int
    lock_ns: int  # how long a pinned clean point stays locked
    clock: Callable[[], int]
    capacity: int | None = None  # of the ring; None: DEFAULT_CAPACITY


async def run_detector(g: DetectedGroup, setup: DetectorSetup, stop: asyncio.Event) -> None:
    """Run the group's detector worker until ``stop``; start it again when it dies."""
    state = g.detector = DetectorState(scored_seq=int(g.journal.window().last_seq))
    first, stuck, at = True, 0, -1
    while not stop.is_set():
        try:
            await _one_worker(g, state, setup, stop, resume=not first)
        except _Reopened:  # a new journal: start over on it at once, nothing lost
            state.scored_seq = min(state.scored_seq, int(g.journal.window().last_seq))
            continue
        except Exception as e:  # the detector never takes capture down
            log.error("detector failed; restarting it", extra={"group": g.name, "err": str(e)})
        first = False
        if stop.is_set():
            break
        state.restarts += 1
        stuck, at = (stuck + 1, at) if state.scored_seq == at else (1, state.scored_seq)
        if stuck >= MAX_STUCK:  # something after ``at`` kills it each time: skip past it
            last = int(g.journal.window().last_seq)
            log.error("detector skipped writes it could not score",
                      extra={"group": g.name, "after_seq": at, "upto_seq": last})  # fmt: skip
            state.scored_seq, stuck = last, 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RESTART_DELAY_S * max(1, min(stuck, 4)))


async def _one_worker(
    g: DetectedGroup, state: DetectorState, setup: DetectorSetup, stop: asyncio.Event,
    resume: bool,
) -> None:  # fmt: skip
    capacity = setup.capacity or DEFAULT_CAPACITY
    ring = Ring.create(capacity)
    j = g.journal
    after = state.scored_seq if resume else int(j.window().last_seq)
    writer = RingWriter(ring, after, setup.excluded)
    writer.mark_gap()  # whatever lands before the tap is set is read back
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cdp.detector_worker", str(ring.fd), str(capacity),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(ring.fd,),
            start_new_session=True,  # a Ctrl-C of the daemon's group stops it through us
        )  # fmt: skip
    except BaseException:
        ring.close()
        raise
    assert proc.stdin is not None and proc.stdout is not None
    chan_in, chan_out = proc.stdout, proc.stdin
    tapped: Journal | None = None
    failed = 0
    state.scored_seq = after
    server = _Server()
    try:
        _send(chan_out, {"t": "hello", "after": after, "chunk_size": setup.chunk_size,
                         "excluded": sorted(setup.excluded),
                         "config": asdict(setup.config)})  # fmt: skip
        await chan_out.drain()
        j.set_tap(writer.tap)
        tapped = j
        reading = asyncio.ensure_future(_recv(chan_in))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({reading, stopping}, timeout=0.2,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if stopping in done:
                    return
                if g.journal is not tapped:  # reopened after a failure
                    raise _Reopened
                state.dropped = writer.dropped
                if writer.failed > failed:  # a bug in the tap: its writes are read back
                    failed = writer.failed
                    log.error("detector tap failed; reading back", extra={"group": g.name})
                if reading not in done:
                    if writer.gap:  # writes paused with a gap pending: place it now
                        writer.flush_gap(int(tapped.window().last_seq))
                    continue
                msg = reading.result()
                if msg is None:
                    raise RuntimeError(f"detector worker exited (code {proc.returncode})")
                reading = asyncio.ensure_future(_recv(chan_in))
                reply = await _handle(g, state, tapped, server, msg, setup)
                if reply is not None:
                    _send(chan_out, reply)
                    await chan_out.drain()
        finally:
            for t in (reading, stopping):
                t.cancel()
    finally:
        if tapped is not None:
            tapped.set_tap(None)
        writer.close()  # a tap already under way in another thread finishes first
        with contextlib.suppress(Exception):
            chan_out.close()  # the worker exits when its stdin closes
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        ring.close()


class _Server:
    """Per-worker read state: the cursor of a read back that goes on in steps."""

    def __init__(self) -> None:
        self.cursor: TailCursor | None = None
        self.cursor_at = -1


async def _handle(
    g: DetectedGroup,
    state: DetectorState,
    j: Journal,
    server: _Server,
    msg: dict[str, Any],
    setup: DetectorSetup,
) -> dict[str, Any] | None:
    t = msg.get("t")
    if t == "prior":
        return {"data": await asyncio.to_thread(_priors, j, msg["spans"])}
    if t == "map":
        return {"maps": await asyncio.to_thread(_maps, j, msg["spans"])}
    if t == "back":
        return await asyncio.to_thread(_read_back, j, server, int(msg["after"]),
                                       int(msg["upto"]))  # fmt: skip
    if t == "stats":
        state.sampled, state.sampled_bytes = int(msg["sampled"]), int(msg["sampled_bytes"])
        state.scored_seq = max(state.scored_seq, int(msg["pos"]))
        return None
    if t == "det":
        fields = {k: v for k, v in msg.items() if k != "t"}
        d = Detection(**{**fields, "volumes": tuple(fields["volumes"])})
        q = await asyncio.to_thread(pin_clean_point, j, g.name, d, now_ns=setup.clock(),
                                    lock_ns=setup.lock_ns)  # fmt: skip
        g.quarantines.append(q)
        return None
    raise RuntimeError(f"detector worker sent an unknown message {t!r}")


def _priors(j: Journal, spans: list[list[Any]]) -> list[bytes]:
    """What each range held as of its seq; b"" for zeroes, never written or not retained
    (the detector takes all three as empty space)."""
    out: list[bytes] = []
    first = int(j.window().first_seq)
    for vol, off, n, seq in spans:
        try:
            n = min(n, j.volume_size(vol) - off)  # whole blocks: the last may pass the end
            if seq < first or n <= 0 or not j.holds_data(vol, off, n, seq):
                out.append(b"")
            else:
                out.append(j.read(vol, off, n, seq))
        except (JournalError, KeyError, ValueError):  # folded, closed, volume gone
            out.append(b"")
    return out


def _maps(j: Journal, spans: list[list[Any]]) -> list[bytes]:
    """Per range, a byte per 4 KiB block: 1 where it may hold data as of its seq, 0 where it
    reads as zeros (``_priors`` takes not retained, folded meanwhile and unknown volumes as
    empty space; so does this)."""
    out: list[bytes] = []
    first = int(j.window().first_seq)
    for vol, off, n, seq in spans:
        try:
            size = j.volume_size(vol)
            inside = max(0, min(n, size - off + BLOCK - 1)) // BLOCK * BLOCK
            got = b""
            if seq >= first and inside:
                got = j.written_blocks(vol, off, inside, seq, BLOCK)
        except (JournalError, KeyError, ValueError):
            got = b""
        out.append(got + bytes(n // BLOCK - len(got)))  # past the end: never written
    return out


def _read_back(j: Journal, server: _Server, after: int, upto: int) -> dict[str, Any]:
    """Records after ``after`` up to ``upto``, about 32 MiB at a time."""
    cursor = server.cursor if server.cursor_at == after else None
    try:
        back, cursor = j.read_durable(after + 1, max_bytes=32 << 20, cursor=cursor, sync=False)
    except PointNotRetained:  # folded meanwhile: go on from the oldest point still there
        first = int(j.window().first_seq)
        back, cursor = j.read_durable(first + 1, max_bytes=32 << 20, sync=False)
    back = [r for r in back if r.seq <= upto]
    if not back:
        return {"recs": [], "last": after}
    server.cursor, server.cursor_at = cursor, int(back[-1].seq)
    return {"recs": encode_records(_inline(j, back)), "last": int(back[-1].seq)}


def _inline(j: Journal, recs: list[Record]) -> list[Record]:
    """Writes already sealed (refs) get their data back from the block store."""
    out: list[Record] = []
    for r in recs:
        if isinstance(r, WriteRecord) and r.data is None:
            blocks = j.get_blocks(list(r.refs))
            r = WriteRecord(
                r.seq, r.ts, r.volume, r.offset, r.length,
                b"".join(blocks[x.block_id] for x in r.refs), (), r.wall,
            )  # fmt: skip
        out.append(r)
    return out


def _send(w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    w.write(frame(msg))


async def _recv(r: asyncio.StreamReader) -> dict[str, Any] | None:
    """The worker's next message; None when it closed the channel (exited)."""
    try:
        (n,) = FRAME_LEN.unpack(await r.readexactly(FRAME_LEN.size))
        if n > MAX_FRAME:
            return None
        msg = msgpack.unpackb(await r.readexactly(n), raw=False)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return msg if isinstance(msg, dict) else None
