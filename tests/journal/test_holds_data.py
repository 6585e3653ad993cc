"""``Journal.holds_data``: False only where a range surely reads as zeros at that seq."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from journal import Journal, JournalOptions
from journal.clock import ManualClock


def test_holds_data_agrees_with_what_a_read_returns(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), options=JournalOptions(segment_size=1 << 20))
    size = 4 << 20
    j.add_volume("v", size)
    rng = random.Random(5)
    seqs = []
    for _ in range(200):
        off = rng.randrange(0, (size - 65536) // 512) * 512
        n = rng.choice([512, 4096, 65536])
        if rng.random() < 0.2:
            seqs.append(j.write_many("v", [(off, None, n, True)]))
        else:
            seqs.append(j.write("v", off, os.urandom(n)))
        if rng.random() < 0.05:
            j.sync()
            j.seal_pending()  # sealed versions answer the same
    empty = full = 0
    for _ in range(400):
        at = rng.choice(seqs)
        off = rng.randrange(0, size // 4096) * 4096
        n = 4096 * rng.choice([1, 1, 4])
        n = min(n, size - off)
        if not j.holds_data("v", off, n, at):
            assert j.read("v", off, n, at) == bytes(n), (off, n, at)
            empty += 1
        else:
            full += 1
    assert empty > 50 and full > 50  # both answers were checked
    s = j.write("v", size - 4096, b"x" * 4096)
    assert j.holds_data("v", size - 4096, 4096, s)
    j.close()


def test_written_blocks_is_holds_data_of_each_block(tmp_path: Path) -> None:
    """The detector learns a MiB of a volume per question: the map must say, block by
    block, what ``holds_data`` says, through seals and folds (base blocks) alike."""
    clock = ManualClock()
    j = Journal.open(str(tmp_path / "j"), clock=clock, options=JournalOptions(segment_size=1 << 18))
    size = (2 << 20) + 4096 * 3  # not a whole number of MiB
    j.add_volume("v", size)
    rng = random.Random(11)
    seqs = []
    for k in range(150):
        clock.advance(1_000_000)
        off = rng.randrange(0, (size - 65536) // 512) * 512
        n = rng.choice([512, 4096, 4096, 8192, 65536])
        if rng.random() < 0.2:
            seqs.append(j.zero("v", off, n, trim=rng.random() < 0.5))
        else:
            seqs.append(j.write("v", off, os.urandom(n)))
        if k % 40 == 39:
            j.seal_pending(100)
            j.apply_retention(keep_ns=40_000_000)  # older writes go into the base
    first = j.window().first_seq
    ones = zeros = 0
    for at in [first, *rng.sample([s for s in seqs if s >= first], 12)]:
        for off, n in [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 4096 * 3), (8192, 40960)]:
            got = j.written_blocks("v", off, n, at, 4096)
            want = bytes(int(j.holds_data("v", b, 4096, at)) for b in range(off, off + n, 4096))
            assert got == want, (off, n, at)
            ones, zeros = ones + got.count(1), zeros + got.count(0)
    assert ones > 100 and zeros > 100  # both answers were checked
    with pytest.raises(ValueError, match="whole 4096-byte blocks"):
        j.written_blocks("v", 512, 4096, first, 4096)
    j.close()


def test_written_blocks_of_zeroes_writes_and_partial_blocks(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), options=JournalOptions())
    j.add_volume("v", 1 << 20)
    s0 = j.zero("v", 0, 65536)  # zeroes over space never written: still empty
    s1 = j.write("v", 8192 + 100, b"x" * 10)  # a few bytes mark their whole block
    s2 = j.write("v", 65536 + 4096, os.urandom(8192))
    s3 = j.zero("v", 65536 + 4096, 4096)  # written, then zeroed: "may hold data", as holds_data
    m = j.written_blocks("v", 0, 20 * 4096, s3, 4096)
    assert m == bytes([0, 0, 1] + [0] * 14 + [1, 1] + [0])
    assert j.written_blocks("v", 0, 20 * 4096, s1, 4096) == bytes([0, 0, 1] + [0] * 17)
    assert j.written_blocks("v", 0, 20 * 4096, s0, 4096) == bytes(20)
    assert j.written_blocks("v", 65536, 4096 * 3, s2, 4096) == bytes([0, 1, 1])
    j.close()
