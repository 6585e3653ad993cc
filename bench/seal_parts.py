"""What the parts of sealing cost per 4 KiB block, alone: the numbers behind its design.

* SQLite block rows: random 32-byte keys (BLAKE3 ids) into the same WITHOUT ROWID table the
  index uses, sorted per commit, at several rows per commit. Random keys dirty nearly every
  B-tree page a commit touches, so the cost per row falls as commits grow: why the block
  store indexes in batches (``BlockStore.index_batch``).
* zstd level 1 on a random 4 KiB block and on 512 bytes (its per-call setup), and BLAKE3 of
  4 KiB: why small blocks get an early abort (``_compress_run``).

    .venv/bin/python bench/seal_parts.py            # CPU µs per row / per call
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time

import blake3
import zstandard

SCHEMA = (
    "CREATE TABLE blocks (id BLOB PRIMARY KEY, pack INTEGER, offset INTEGER,"
    " stored_len INTEGER, raw_len INTEGER) WITHOUT ROWID"
)


def index_cost(folder: str, per_commit: int, total: int) -> float:
    """µs of CPU per row over the second half of ``total`` rows, ``per_commit`` a commit."""
    path = os.path.join(folder, f"index-{per_commit}.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(SCHEMA)
    n, cpu, timed = 0, 0.0, 0
    while n < total:
        rows = [(os.urandom(32), 1, k * 4200, 4100, 4096) for k in range(per_commit)]
        rows.sort()
        c0 = time.process_time()
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO blocks VALUES (?,?,?,?,?)", rows)
        conn.execute("COMMIT")
        if n >= total // 2:
            cpu += time.process_time() - c0
            timed += per_commit
        n += per_commit
    conn.close()
    return cpu / timed * 1e6


def per_call(fn: object, items: list[bytes]) -> float:
    c0 = time.process_time()
    for x in items:
        fn(x)  # type: ignore[operator]
    return (time.process_time() - c0) / len(items) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=640_000, help="rows per index run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as d:
        for per_commit in (16_384, 65_536, 131_072):
            total = max(a.rows, 2 * per_commit)
            us = index_cost(d, per_commit, total)
            print(f"index rows, {per_commit:>7,} a commit, table to {total:,}: {us:5.2f} µs/row")
    blocks = [os.urandom(4096) for _ in range(20_000)]
    z = zstandard.ZstdCompressor(level=1)
    print(f"zstd -1, random 4 KiB:  {per_call(z.compress, blocks):5.2f} µs")
    print(f"zstd -1, random 512 B:  {per_call(z.compress, [b[:512] for b in blocks]):5.2f} µs")
    print(
        f"BLAKE3, 4 KiB:          {per_call(lambda x: blake3.blake3(x).digest(), blocks):5.2f} µs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
