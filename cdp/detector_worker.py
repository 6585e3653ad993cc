"""The corruption detector's own process: scores the writes the daemon's tap puts in the ring.

Started by the daemon (``Daemon._detect``) as ``python -m cdp.detector_worker FD CAPACITY``
with the ring's memfd passed down and its stdin/stdout as the control channel: frames of a
4-byte length and a msgpack map. The worker asks, the daemon answers:

* ``hello`` (daemon -> worker, first): detector config, chunk size, excluded volumes, and
  ``after``, the last seq already scored (the worker ignores records at or before it);
* ``map`` (answered with ``maps``): for each 1 MiB page of a volume the detector holds
  nothing of, a byte per 4 KiB block saying whether it may hold data as of a seq, so that
  blocks never written need no ``prior`` (a fresh volume, or any volume after a restart);
* ``prior`` (worker -> daemon, answered with ``data``): what ranges held before a write,
  for blocks the detector has not seen, all of one batch in one round trip;
* ``back`` (answered with ``recs`` and ``last``): records after a seq, read back from the
  journal when the ring dropped some (a ``Gap``);
* ``det`` (no answer): a detection; the daemon pins the last clean point;
* ``stats`` (no answer): what was scored, for status, and where to resume after a restart.

Why a process: see cdp/detector_feed.py. It exits when its stdin closes (the daemon
stopped, or died: a kill -9 of the daemon never leaves it behind).
"""

from __future__ import annotations

import os
import select
import struct
import sys
import time
from dataclasses import asdict
from typing import Any, BinaryIO

import msgpack

from cdp.detector import BLOCK, PAGE, DetectorConfig, GroupDetector, Observed
from cdp.detector_feed import Gap, Ring, RingReader
from cdp.gc_policy import GcPolicy
from journal import Record, WriteRecord, ZeroRecord

FRAME_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 30


class ChannelClosed(Exception):
    """The other end went away."""


def frame(msg: dict[str, Any]) -> bytes:
    """One message on the channel: its length, then msgpack (both ends use this)."""
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return FRAME_LEN.pack(len(body)) + body


def send(out: BinaryIO, msg: dict[str, Any]) -> None:
    view = memoryview(frame(msg))
    while view:
        n = out.write(view)
        if n is None or n <= 0:
            raise ChannelClosed
        view = view[n:]


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = inp.read(n - len(buf))
        if not got:
            raise ChannelClosed
        buf += got
    return bytes(buf)


def recv(inp: BinaryIO) -> dict[str, Any]:
    (n,) = FRAME_LEN.unpack(_read_exact(inp, FRAME_LEN.size))
    if n > MAX_FRAME:
        raise ChannelClosed
    msg = msgpack.unpackb(_read_exact(inp, n), raw=False)
    if not isinstance(msg, dict):
        raise ChannelClosed
    return msg


def encode_records(recs: list[Record]) -> list[list[Any]]:
    """Writes and zeroes as msgpack-friendly rows (the ``back`` answer)."""
    rows: list[list[Any]] = []
    for r in recs:
        if isinstance(r, WriteRecord) and r.data is not None:
            rows.append([0, r.seq, r.ts, r.volume, r.offset, r.length, bytes(r.data)])
        elif isinstance(r, ZeroRecord):
            rows.append([1, r.seq, r.ts, r.volume, r.offset, r.length, r.trim])
    return rows


def decode_records(rows: list[list[Any]]) -> list[Record]:
    out: list[Record] = []
    for kind, seq, ts, vol, off, n, x in rows:
        if kind == 0:
            out.append(WriteRecord(seq, ts, vol, off, n, x))
        else:
            out.append(ZeroRecord(seq, ts, vol, off, n, bool(x)))
    return out


class Worker:
    """One group's detector, fed from the ring, asking the daemon over the channel."""

    def __init__(
        self, ring: Ring, inp: BinaryIO, out: BinaryIO, hello: dict[str, Any],
        gc_policy: GcPolicy | None = None,
    ) -> None:  # fmt: skip
        self.gc_policy = gc_policy
        self.reader = RingReader(ring)
        self.inp, self.out = inp, out
        self.pos = int(hello["after"])
        self._prefetched: dict[tuple[str, int, int, int], bytes] = {}
        self._stats_at = 0.0
        self._sent_pos = -1
        self.det = GroupDetector(
            int(hello["chunk_size"]),
            DetectorConfig(**hello["config"]),
            self._prior,
            frozenset(hello["excluded"]),
        )

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        send(self.out, msg)
        return recv(self.inp)

    def _prior(self, vol: str, off: int, n: int, seq: int) -> bytes:
        got = self._prefetched.pop((vol, off, n, seq), None)
        if got is None:  # ``needs`` guessed otherwise: one read of its own
            got = self._ask({"t": "prior", "spans": [[vol, off, n, seq]]})["data"][0]
        return got

    def run(self) -> None:
        while True:
            if self.gc_policy is not None:
                self.gc_policy.tick(self.pos)
            items = self.reader.take()
            if not items:
                self._stats(force=False)
                ready, _, _ = select.select([self.inp], [], [], 0.01)
                if ready:  # nothing is expected unasked: the daemon closed the channel
                    recv(self.inp)
                continue
            batch: list[Observed] = []
            for it in items:
                if isinstance(it, Gap):
                    self._score(batch)
                    batch = []
                    self._read_back(it.after, it.upto)
                elif it.seq > self.pos:
                    batch.append(it)
            self._score(batch)
            self.reader.release()  # the batch's data views are done with

    def _read_back(self, after: int, upto: int) -> None:
        after = max(after, self.pos)
        while after < upto:
            ans = self._ask({"t": "back", "after": after, "upto": upto})
            recs: list[Observed] = [r for r in decode_records(ans["recs"]) if after < r.seq <= upto]
            self._score(recs)
            last = int(ans["last"])
            if last <= after:  # nothing more there (folded, or not appended after all)
                break
            after = self.pos = max(self.pos, min(last, upto))

    def _score(self, recs: list[Observed]) -> None:
        if not recs:
            return
        pages = self.det.unknown_pages(recs)
        if pages:  # one question a MiB: blocks never written need no prior read
            step = PAGE * BLOCK
            spans_p = [[v, p * step, step, s] for v, p, s in pages]
            maps = self._ask({"t": "map", "spans": spans_p})["maps"]
            for (v, p, _), m in zip(pages, maps, strict=True):
                self.det.learn_page(v, p, m)
        spans = self.det.needs(recs)
        if spans:
            data = self._ask({"t": "prior", "spans": spans})["data"]
            self._prefetched = dict(zip(map(tuple, spans), data, strict=True))  # type: ignore[arg-type]
        for d in self.det.observe(recs):
            send(self.out, {"t": "det", **asdict(d)})
        self._prefetched = {}
        self.pos = max(self.pos, int(recs[-1].seq))
        self._stats(force=True)

    def _stats(self, force: bool) -> None:
        now = time.monotonic()
        if now - self._stats_at < (0.05 if force or self.pos != self._sent_pos else 1.0):
            return
        self._stats_at, self._sent_pos = now, self.pos
        send(self.out, {"t": "stats", "pos": self.pos, "sampled": self.det.sampled,
                        "sampled_bytes": self.det.sampled_bytes})  # fmt: skip


def main(argv: list[str]) -> int:
    fd, capacity = int(argv[1]), int(argv[2])
    # unbuffered: ``select`` on the fd must see every byte not yet read
    inp, out = os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=0)
    sys.stdout = sys.stderr  # nothing else may write on the channel
    try:
        hello = recv(inp)
        policy = GcPolicy()  # the window's events and the class pages are long-lived
        policy.install()
        Worker(Ring(fd, capacity), inp, out, hello, policy).run()
    except (ChannelClosed, BrokenPipeError, KeyboardInterrupt):
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
