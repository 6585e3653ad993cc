"""The SQLite index: a derived, rebuildable catalog of what the segments and packs hold.

What SQLite is good at lives here: the segment catalog (seq and time ranges per segment),
checkpoints by name, and the block table (content address -> pack location). Per-write version
history does not: it lives in compact in-memory extent maps rebuilt from segments
(see volmap.py), so a no-change pass never touches one row per block.

Everything here can be dropped and rebuilt from segments and packs (``Journal.rebuild_index``);
``dump()`` gives a canonical view so tests can check a rebuild is identical.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    segment_no: int
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int
    records: int
    size: int
    sealed: bool


@dataclass(frozen=True, slots=True)
class BlockLocation:
    pack: int
    offset: int
    stored_len: int
    raw_len: int


class Index:
    """One connection, one lock: SQLite is called from the sealer and reader threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._create()

    def _create(self) -> None:
        db = self.db
        if "meta" not in db.table_names():
            db.table("meta").create({"key": str, "value": str}, pk="key")
        if "segments" not in db.table_names():
            db.table("segments").create(
                {
                    "segment_no": int,
                    "first_seq": int,
                    "last_seq": int,
                    "first_ts": int,
                    "last_ts": int,
                    "records": int,
                    "size": int,
                    "sealed": int,
                },
                pk="segment_no",
            )
        if "checkpoints" not in db.table_names():
            db.table("checkpoints").create(
                {"seq": int, "ts": int, "name": str, "kind": str}, pk="seq"
            )
            db.table("checkpoints").create_index(["name"])
        if "blocks" not in db.table_names():
            db.execute(
                "CREATE TABLE blocks (id BLOB PRIMARY KEY, pack INTEGER, offset INTEGER,"
                " stored_len INTEGER, raw_len INTEGER) WITHOUT ROWID"
            )
        if "packs" not in db.table_names():
            db.table("packs").create({"pack_no": int, "indexed_size": int}, pk="pack_no")
        if "pack_synced" not in db.table_names():
            # How far each pack was fsynced, committed at every flush while its rows wait
            # to be indexed in a batch: recovery truncates a bad pack tail only past it.
            # Not a catalog of content, so neither cleared by a rebuild nor dumped.
            db.table("pack_synced").create({"pack_no": int, "synced_size": int}, pk="pack_no")

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", [key]).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    # -- segments and checkpoints --------------------------------------------------------
    def put_segment(
        self, e: SegmentEntry, checkpoints: Iterable[tuple[int, int, str, str]]
    ) -> None:
        with self._lock:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT OR REPLACE INTO segments VALUES (?,?,?,?,?,?,?,?)",
                [
                    e.segment_no,
                    e.first_seq,
                    e.last_seq,
                    e.first_ts,
                    e.last_ts,
                    e.records,
                    e.size,
                    int(e.sealed),
                ],
            )
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)", list(checkpoints)
            )
            self.db.execute("COMMIT")

    def segments(self) -> list[SegmentEntry]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM segments ORDER BY segment_no").fetchall()
        return [SegmentEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7])) for r in rows]

    def drop_segments_upto(self, segment_no: int, last_seq: int) -> None:
        with self._lock:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM segments WHERE segment_no <= ?", [segment_no])
            self.db.execute("DELETE FROM checkpoints WHERE seq <= ?", [last_seq])
            self.db.execute("COMMIT")

    def drop_segments(self, numbers: list[int]) -> None:
        """Forget segments that no longer exist (and their checkpoints)."""
        with self._lock:
            self.db.execute("BEGIN")
            for no in numbers:
                row = self.db.execute(
                    "SELECT first_seq, last_seq FROM segments WHERE segment_no=?", [no]
                ).fetchone()
                if row is not None:
                    self.db.execute(
                        "DELETE FROM checkpoints WHERE seq BETWEEN ? AND ?", [row[0], row[1]]
                    )
                self.db.execute("DELETE FROM segments WHERE segment_no=?", [no])
            self.db.execute("COMMIT")

    # -- blocks --------------------------------------------------------------------------
    def lookup_blocks(self, ids: list[bytes]) -> dict[bytes, BlockLocation]:
        out: dict[bytes, BlockLocation] = {}
        with self._lock:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                q = f"SELECT * FROM blocks WHERE id IN ({marks})"
                for r in self.db.execute(q, part).fetchall():
                    out[bytes(r[0])] = BlockLocation(r[1], r[2], r[3], r[4])
        return out

    def add_blocks(
        self,
        rows: list[tuple[bytes, int, int, int, int]],
        pack_sizes: dict[int, int],
        *,
        replace: bool = False,
    ) -> None:
        verb = "REPLACE" if replace else "IGNORE"
        with self._lock:
            self.db.execute("BEGIN")
            self.db.conn.executemany(f"INSERT OR {verb} INTO blocks VALUES (?,?,?,?,?)", rows)
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO packs VALUES (?,?)", list(pack_sizes.items())
            )
            self.db.execute("COMMIT")

    def set_synced(self, sizes: dict[int, int]) -> None:
        with self._lock:
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO pack_synced VALUES (?,?)", list(sizes.items())
            )

    def synced_sizes(self) -> dict[int, int]:
        with self._lock:
            rows = self.db.execute("SELECT pack_no, synced_size FROM pack_synced").fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    def pack_sizes(self) -> dict[int, int]:
        with self._lock:
            rows = self.db.execute("SELECT pack_no, indexed_size FROM packs").fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    def all_blocks(self) -> list[tuple[bytes, int, int, int, int]]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM blocks").fetchall()
        return [(bytes(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def remove_packs(self, packs: list[int]) -> None:
        """Forget packs and every block row that still points into them."""
        with self._lock:
            self.db.execute("BEGIN")
            self.db.conn.executemany("DELETE FROM blocks WHERE pack=?", [(p,) for p in packs])
            self.db.conn.executemany("DELETE FROM packs WHERE pack_no=?", [(p,) for p in packs])
            self.db.conn.executemany(
                "DELETE FROM pack_synced WHERE pack_no=?", [(p,) for p in packs]
            )
            self.db.execute("COMMIT")

    def block_count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM blocks").fetchone()[0])

    # -- whole-index operations ------------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            self.db.execute("BEGIN")
            for t in ("segments", "checkpoints", "blocks", "packs"):
                self.db.execute(f"DELETE FROM {t}")
            self.db.execute("COMMIT")

    def dump(self) -> dict[str, list[Any]]:
        """Canonical content of every derived table, for rebuild-identical checks."""
        out: dict[str, list[Any]] = {}
        with self._lock:
            for t, order in (
                ("segments", "segment_no"),
                ("checkpoints", "seq"),
                ("blocks", "id"),
                ("packs", "pack_no"),
            ):
                out[t] = [tuple(r) for r in self.db.execute(f"SELECT * FROM {t} ORDER BY {order}")]
        return out

    def size_bytes(self) -> int:
        with self._lock:
            page_count = self.db.execute("PRAGMA page_count").fetchone()[0]
            page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int(page_count) * int(page_size)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
