"""Point-in-time reads of overlapping sector-aligned writes match a model at every seq.

The reader resolves aligned chunks with a per-sector bit mask and switches to byte ranges at
the first unaligned version; these cases (a newer write splitting an older one into several
runs, zeros, base blocks after a fold, inline and sealed data, an unaligned write among
aligned ones) are what the general model test reaches only rarely.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from journal import Journal, JournalOptions, ManualClock

VOL = 64 * 1024
OPTS = JournalOptions(segment_size=24 * 1024, chunk_size=8 * 1024, pack_target=64 * 1024)

_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, VOL // 512 - 1), st.integers(1, 40)),
    st.tuples(st.just("zero"), st.integers(0, VOL // 512 - 1), st.integers(1, 40)),
    st.tuples(st.just("odd"), st.integers(0, VOL - 1), st.integers(1, 3000)),
    st.tuples(st.just("seal"), st.just(0), st.just(0)),
    st.tuples(st.just("fold"), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=40), reads=st.data())
def test_reads_match_model(ops: list[tuple[str, int, int]], reads: st.DataObject) -> None:
    folder = tempfile.mkdtemp(prefix="cdp-plan-")
    clock = ManualClock()
    j = Journal.open(folder, clock=clock, options=OPTS)
    try:
        images = {j.add_volume("disk0", VOL): bytes(VOL)}
        disk = bytearray(VOL)
        for n, (kind, a, b) in enumerate(ops):
            clock.advance(1_000_000)
            if kind == "seal":
                j.seal_pending(100)
                continue
            if kind == "fold":
                j.seal_pending(100)
                j.apply_retention(keep_ns=3_000_000)
                first = j.window().first_seq
                images = {s: img for s, img in images.items() if s >= first}
                continue
            offset, length = (a * 512, b * 512) if kind != "odd" else (a, b)
            length = min(length, VOL - offset)
            if kind == "zero":
                seq = j.zero("disk0", offset, length)
                disk[offset : offset + length] = bytes(length)
            else:
                data = bytes([n % 251 + 1]) * length
                seq = j.write("disk0", offset, data)
                disk[offset : offset + length] = data
            images[seq] = bytes(disk)
        for _ in range(8):
            points = sorted(images)  # which points the fold kept depends on segment rolls
            seq = points[reads.draw(st.integers(0, 1 << 16)) % len(points)]
            if reads.draw(st.booleans()):
                first = reads.draw(st.integers(0, VOL // 512 - 1))
                offset = first * 512
                length = reads.draw(st.integers(1, VOL // 512 - first)) * 512
            else:
                offset = reads.draw(st.integers(0, VOL - 1))
                length = reads.draw(st.integers(1, VOL - offset))
            got = j.read("disk0", offset, length, seq)
            assert got == images[seq][offset : offset + length], (seq, offset, length)
    finally:
        j.close()
        shutil.rmtree(folder, ignore_errors=True)
