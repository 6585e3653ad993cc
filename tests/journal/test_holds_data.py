"""``Journal.holds_data``: False only where a range surely reads as zeros at that seq."""

from __future__ import annotations

import os
import random
from pathlib import Path

from journal import Journal, JournalOptions


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
