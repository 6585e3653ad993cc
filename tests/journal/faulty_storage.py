"""An in-memory ``journal.storage.Storage`` that models a volatile page cache, for crash tests.

What it models (the LazyFS / SQLite crash-VFS / ALICE view of a file system):

- Every file (an inode) has *durable* content plus a list of not-yet-synced operations
  (appends, truncates). Reads see everything; ``File.sync()`` makes the file's data durable,
  not its directory entry.
- Directory entries (create, mkdir, rename/replace, remove) are volatile until
  ``sync_dir`` of their folder. With ``strict_mkdir=False`` folder creation is durable at once.
- ``File.truncate`` is durable at once by default, like ``OsFile.truncate`` (which fsyncs);
  ``truncate_syncs=False`` keeps it volatile.
- A failed fsync (injected EIO) drops the file's unsynced operations from the durable view for
  good while reads still see them (Linux "fsyncgate"): a later fsync succeeds without
  persisting them.

Every operation is counted (``ops``, ``oplog``), so a test can crash "after op k":
``crash_after=k`` makes operation k+1 and everything after it raise ``SimulatedCrash`` (a
``BaseException``, so no ``except Exception`` in the code under test can swallow it).
``fail(kind, nth, err)`` makes the nth matching operation raise ``OSError(err)``.

``crash_image(mode, rng)`` returns a NEW storage holding one possible state after power loss:

- ``"drop_all"``: only durable data and durable directory entries;
- ``"keep_some"``: per file a random prefix of the unsynced operations, the last kept append
  possibly torn (cut at a 512-byte boundary, at a random byte, or its tail zero-filled); per
  folder a random prefix of the unsynced directory operations;
- ``"reorder"``: per file a random subset of the unsynced appends (or of their 512-byte
  sectors) lands; earlier ones that did not land are zero-filled holes; folders as above;
- ``"dirents"``: file data kept whole or as a random prefix; any subset of the unsynced
  directory operations kept (in order), the rest lost;
- ``"process"``: everything the page cache holds (a kill -9, not a power loss).

The journal keeps its SQLite index with the real sqlite3 module, outside this layer, so a
``FaultyStorage`` has a real ``root`` folder: every path it serves lies under it, ``makedirs``
also creates the folder on disk, and a crash image copies the real files (the index) as they
are into the new root.
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MODES = ("drop_all", "keep_some", "reorder", "dirents", "process")
MUTATING = frozenset(
    {"makedirs", "create", "append", "sync", "truncate", "replace", "remove", "sync_dir"}
)
SECTOR = 512


class SimulatedCrash(BaseException):
    """Raised by every storage operation after the crash point: the machine lost power."""


class _Dir:
    """The namespace value of a folder."""

    def __repr__(self) -> str:
        return "<dir>"


DIR = _Dir()

# An unsynced file operation: ("append", offset, data) or ("truncate", size, b"").
FileOp = tuple[str, int, bytes]


class _Inode:
    __slots__ = ("data", "durable", "lost", "no", "pending")

    def __init__(self, no: int, durable: bytes = b"") -> None:
        self.no = no
        self.durable = durable  # on stable storage
        self.data = bytearray(durable)  # what reads see (the page cache)
        self.pending: list[FileOp] = []  # since the last sync, in order
        self.lost = False  # a failed fsync dropped operations: data != durable + pending


def apply_ops(base: bytes, ops: Sequence[FileOp]) -> bytearray:
    buf = bytearray(base)
    for kind, n, data in ops:
        if kind == "truncate":
            if n < len(buf):
                del buf[n:]
            else:
                buf.extend(bytes(n - len(buf)))
        else:
            end = n + len(data)
            if end > len(buf):
                buf.extend(bytes(end - len(buf)))
            buf[n:end] = data
    return buf


@dataclass
class Fault:
    """Fail the ``nth`` operation of ``kind`` (on a path containing ``path_contains``)."""

    kind: str
    nth: int = 1
    err: int = errno_mod.EIO
    path_contains: str | None = None
    partial: int | None = None  # for appends: bytes that reach the file before the error
    repeat: bool = False  # keep failing every later matching operation too
    seen: int = 0
    fired: int = 0

    def matches(self, kind: str, path: str) -> bool:
        if kind != self.kind:
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass
class OpRecord:
    n: int
    kind: str
    path: str
    failed: bool = False


class FaultyFile:
    def __init__(self, path: str, storage: FaultyStorage, inode: _Inode) -> None:
        self.path = path
        self._st = storage
        self._ino = inode
        self.closed = False

    def append(self, parts: Sequence[bytes | memoryview]) -> int:
        data = b"".join(bytes(p) for p in parts)
        st, ino = self._st, self._ino
        with st._lock:
            fault = st._begin("append", self.path)
            off = len(ino.data)
            if fault is not None:
                if fault.partial:
                    piece = data[: fault.partial]
                    ino.data += piece
                    ino.pending.append(("append", off, piece))
                raise st._error(fault, self.path)
            ino.data += data
            ino.pending.append(("append", off, data))
            st._end("append", self.path)
            return off

    def pread(self, size: int, offset: int) -> bytes:
        with self._st._lock:
            self._st._begin("pread", self.path)
            out = bytes(self._ino.data[offset : offset + size])
            self._st._end("pread", self.path)
            return out

    def size(self) -> int:
        with self._st._lock:
            self._st._begin("size", self.path)
            n = len(self._ino.data)
            self._st._end("size", self.path)
            return n

    def sync(self) -> None:
        st = self._st
        st._hook("sync", self.path)
        with st._lock:
            fault = st._begin("sync", self.path)
            if fault is not None:
                st._fsync_failed(self._ino)
                raise st._error(fault, self.path)
            st._sync_inode(self._ino)
            st._end("sync", self.path)

    def forget(self, upto: int) -> None:
        """A caching hint: the simulated disk has no page cache to drop, and content is unchanged.

        Not an operation of the crash schedule, so adding calls to it moves no crash point.
        """

    def truncate(self, size: int) -> None:
        st, ino = self._st, self._ino
        with st._lock:
            fault = st._begin("truncate", self.path)
            if fault is not None:
                raise st._error(fault, self.path)
            op: FileOp = ("truncate", size, b"")
            ino.data = apply_ops(bytes(ino.data), [op])
            ino.pending.append(op)
            if st.truncate_syncs:
                st._sync_inode(ino)
            st._end("truncate", self.path)

    def close(self) -> None:
        with self._st._lock:
            self._st._begin("close", self.path)
            self.closed = True
            self._st._end("close", self.path)


class FaultyStorage:
    """See the module docstring. All paths must lie under ``root`` (a real folder)."""

    def __init__(
        self,
        root: str,
        *,
        strict_mkdir: bool = True,
        truncate_syncs: bool = True,
        crash_after: int | None = None,
    ) -> None:
        self.root = os.path.normpath(os.path.abspath(root))
        os.makedirs(self.root, exist_ok=True)
        self.strict_mkdir = strict_mkdir
        self.truncate_syncs = truncate_syncs
        self.crash_after = crash_after
        self.crashed = False
        self.ops = 0
        self.mutations = 0
        self.oplog: list[OpRecord] = []
        self.faults: list[Fault] = []
        self.after_op: Callable[[FaultyStorage, OpRecord], None] | None = None
        self.before_op: Callable[[str, str], None] | None = None  # called without the lock
        self._lock = threading.RLock()
        self._cur: dict[str, _Inode | _Dir] = {}
        self._dur: dict[str, _Inode | _Dir] = {}
        self._dirops: list[tuple[Any, ...]] = []
        self._next_ino = 1
        self._real_cache: dict[str, tuple[int, int, bytes]] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _hook(self, kind: str, path: str) -> None:
        if self.before_op is not None:
            self.before_op(kind, path)

    def _begin(self, kind: str, path: str) -> Fault | None:
        if self.crashed or (self.crash_after is not None and self.ops >= self.crash_after):
            self.crashed = True
            raise SimulatedCrash(f"power lost after storage op {self.ops}")
        self.ops += 1
        rec = OpRecord(self.ops, kind, path)
        self.oplog.append(rec)
        for f in self.faults:
            if f.matches(kind, path):
                f.seen += 1
                if f.seen == f.nth or (f.repeat and f.seen > f.nth):
                    f.fired += 1
                    rec.failed = True
                    return f
        return None

    def _end(self, kind: str, path: str) -> None:
        if kind in MUTATING:
            self.mutations += 1
        if self.after_op is not None:
            self.after_op(self, self.oplog[-1])

    def _error(self, fault: Fault, path: str) -> OSError:
        return OSError(fault.err, os.strerror(fault.err), path)

    def fail(
        self,
        kind: str,
        nth: int = 1,
        err: int = errno_mod.EIO,
        *,
        path_contains: str | None = None,
        partial: int | None = None,
        repeat: bool = False,
    ) -> Fault:
        """Make the nth ``kind`` operation (``"write"`` is an alias of ``"append"``) fail."""
        f = Fault("append" if kind == "write" else kind, nth, err, path_contains, partial, repeat)
        self.faults.append(f)
        return f

    def count(self, kind: str, path_contains: str = "") -> int:
        return sum(1 for r in self.oplog if r.kind == kind and path_contains in r.path)

    def _norm(self, path: str, *, ancestor_ok: bool = False) -> str:
        """Absolute path under root; the root's ancestors (durable, never changed) on request."""
        p = os.path.normpath(os.path.abspath(path))
        if p != self.root and not p.startswith(self.root + os.sep):
            if ancestor_ok and (self.root + os.sep).startswith(p.rstrip(os.sep) + os.sep):
                return p
            raise ValueError(f"{path} is outside the storage root {self.root}")
        return p

    def _outside(self, p: str) -> bool:
        return p != self.root and not p.startswith(self.root + os.sep)

    def _is_dir(self, ns: dict[str, _Inode | _Dir], p: str) -> bool:
        return p == self.root or ns.get(p) is DIR

    def _new_inode(self, durable: bytes = b"") -> _Inode:
        ino = _Inode(self._next_ino, durable)
        self._next_ino += 1
        return ino

    def _sync_inode(self, ino: _Inode) -> None:
        ino.durable = bytes(apply_ops(ino.durable, ino.pending))
        ino.pending = []
        if not ino.lost:
            assert ino.durable == ino.data

    def _fsync_failed(self, ino: _Inode) -> None:
        # fsyncgate: the kernel marks the pages clean; what they held never becomes durable.
        ino.pending = []
        ino.lost = True

    def _file(self, path: str) -> _Inode:
        node = self._cur.get(path)
        if node is None:
            raise FileNotFoundError(errno_mod.ENOENT, "No such file", path)
        if isinstance(node, _Dir):
            raise IsADirectoryError(errno_mod.EISDIR, "Is a directory", path)
        return node

    def _simple(self, kind: str, path: str) -> None:
        fault = self._begin(kind, path)
        if fault is not None:
            raise self._error(fault, path)

    # ------------------------------------------------------------------ the Storage protocol
    def open(self, path: str, *, create: bool = False) -> FaultyFile:
        p = self._norm(path)
        with self._lock:
            if create:
                self._simple("create", p)
                if not self._is_dir(self._cur, os.path.dirname(p)):
                    raise FileNotFoundError(errno_mod.ENOENT, "No such folder", path)
                if p in self._cur:
                    raise FileExistsError(errno_mod.EEXIST, "File exists", path)
                ino = self._new_inode()
                self._cur[p] = ino
                self._dirops.append(("create", p, ino))
                self._end("create", p)
            else:
                self._simple("open", p)
                ino = self._file(p)
                self._end("open", p)
            return FaultyFile(p, self, ino)

    def read_all(self, path: str) -> bytes:
        p = self._norm(path)
        with self._lock:
            self._simple("read", p)
            out = bytes(self._file(p).data)
            self._end("read", p)
            return out

    def exists(self, path: str) -> bool:
        p = self._norm(path, ancestor_ok=True)
        with self._lock:
            self._simple("exists", p)
            out = p == self.root or p in self._cur or self._outside(p)
            self._end("exists", p)
            return out

    def listdir(self, path: str) -> list[str]:
        p = self._norm(path)
        with self._lock:
            self._simple("listdir", p)
            if not self._is_dir(self._cur, p):
                raise FileNotFoundError(errno_mod.ENOENT, "No such folder", path)
            out = sorted(os.path.basename(q) for q in self._cur if os.path.dirname(q) == p)
            self._end("listdir", p)
            return out

    def makedirs(self, path: str) -> None:
        p = self._norm(path, ancestor_ok=True)
        with self._lock:
            self._simple("makedirs", p)
            if self._outside(p):
                self._end("makedirs", p)
                return
            chain = []
            q = p
            while q != self.root:
                chain.append(q)
                q = os.path.dirname(q)
            for d in reversed(chain):
                node = self._cur.get(d)
                if node is None:
                    self._cur[d] = DIR
                    if self.strict_mkdir:
                        self._dirops.append(("mkdir", d))
                    else:
                        self._dur[d] = DIR
                elif node is not DIR:
                    raise FileExistsError(errno_mod.EEXIST, "Not a folder", d)
            os.makedirs(p, exist_ok=True)
            self._end("makedirs", p)

    def replace(self, src: str, dst: str) -> None:
        s, d = self._norm(src), self._norm(dst)
        with self._lock:
            fault = self._begin("replace", d)
            if fault is not None:
                raise self._error(fault, d)
            ino = self._file(s)
            if self._cur.get(d) is DIR:
                raise IsADirectoryError(errno_mod.EISDIR, "Is a directory", dst)
            del self._cur[s]
            self._cur[d] = ino
            self._dirops.append(("rename", s, d, ino))
            self._end("replace", d)

    def remove(self, path: str) -> None:
        p = self._norm(path)
        with self._lock:
            self._simple("remove", p)
            ino = self._file(p)
            del self._cur[p]
            self._dirops.append(("remove", p, ino))
            self._end("remove", p)

    def sync_dir(self, path: str) -> None:
        p = self._norm(path, ancestor_ok=True)
        self._hook("sync_dir", p)
        with self._lock:
            self._simple("sync_dir", p)
            if self._outside(p):  # the root's ancestors are durable already
                self._end("sync_dir", p)
                return
            if not self._is_dir(self._cur, p):
                raise FileNotFoundError(errno_mod.ENOENT, "No such folder", path)
            for q in [q for q in self._dur if os.path.dirname(q) == p]:
                if q not in self._cur:
                    del self._dur[q]
            for q, node in self._cur.items():
                if os.path.dirname(q) == p:
                    self._dur[q] = node
            self._dirops = [op for op in self._dirops if p not in _op_folders(op)]
            self._end("sync_dir", p)

    # ------------------------------------------------------------------ crafting and inspection
    def write_file(self, path: str, data: bytes) -> None:
        """Put a file with durable content and entry in place (to craft a crash state)."""
        p = self._norm(path)
        with self._lock:
            node = self._cur.get(p)
            if isinstance(node, _Inode):
                node.durable, node.data, node.pending, node.lost = data, bytearray(data), [], False
            else:
                node = self._new_inode(data)
            self._cur[p] = self._dur[p] = node

    def delete_file(self, path: str) -> None:
        """Remove a file and its entry durably (to craft a crash state)."""
        p = self._norm(path)
        with self._lock:
            self._cur.pop(p, None)
            self._dur.pop(p, None)

    def files(self) -> dict[str, bytes]:
        """What a reader sees now: relative path -> content (files only)."""
        with self._lock:
            return {
                os.path.relpath(p, self.root): bytes(n.data)
                for p, n in self._cur.items()
                if isinstance(n, _Inode)
            }

    def durable_files(self) -> dict[str, bytes]:
        """What survives if power is lost now and nothing unsynced reaches the disk."""
        return self.snapshot().crash_image_files("drop_all", random.Random(0))

    def snapshot(self) -> Snapshot:
        """A frozen copy of the whole state (cheap: file contents are shared, not copied)."""
        with self._lock:
            inodes: dict[int, _Inode] = {}
            for ns in (self._cur, self._dur):
                for node in ns.values():
                    if isinstance(node, _Inode):
                        inodes[node.no] = node
            for op in self._dirops:
                for x in op:
                    if isinstance(x, _Inode):
                        inodes[x.no] = x
            frozen = {
                no: _FrozenInode(
                    ino.durable, tuple(ino.pending), bytes(ino.data) if ino.lost else None
                )
                for no, ino in inodes.items()
            }
            return Snapshot(
                root=self.root,
                cur={p: _ref(n) for p, n in self._cur.items()},
                dur={p: _ref(n) for p, n in self._dur.items()},
                dirops=tuple(_freeze_op(op) for op in self._dirops),
                inodes=frozen,
                real=self._read_real_files(),
                strict_mkdir=self.strict_mkdir,
                truncate_syncs=self.truncate_syncs,
                ops=self.ops,
            )

    def crash_image(
        self, mode: str, rng: random.Random, *, root: str | None = None
    ) -> FaultyStorage:
        return self.snapshot().crash_image(mode, rng, root=root)

    def _read_real_files(self) -> dict[str, bytes]:
        """Every real file under root (the SQLite index), content cached by (mtime, size)."""
        out: dict[str, bytes] = {}
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, self.root)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                cached = self._real_cache.get(rel)
                if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
                    out[rel] = cached[2]
                    continue
                try:
                    with open(full, "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                self._real_cache[rel] = (st.st_mtime_ns, st.st_size, data)
                out[rel] = data
        return out


# ---------------------------------------------------------------------- snapshots and images
@dataclass(frozen=True)
class _FrozenInode:
    durable: bytes
    pending: tuple[FileOp, ...]
    full: bytes | None  # set when a failed fsync made the cache differ from durable+pending

    def current(self) -> bytes:
        return self.full if self.full is not None else bytes(apply_ops(self.durable, self.pending))


def _ref(node: _Inode | _Dir) -> int | _Dir:
    return node if isinstance(node, _Dir) else node.no


def _freeze_op(op: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.no if isinstance(x, _Inode) else x for x in op)


def _op_folders(op: tuple[Any, ...]) -> set[str]:
    if op[0] == "rename":
        return {os.path.dirname(op[1]), os.path.dirname(op[2])}
    return {os.path.dirname(op[1])}


@dataclass(frozen=True)
class Snapshot:
    root: str
    cur: dict[str, int | _Dir]
    dur: dict[str, int | _Dir]
    dirops: tuple[tuple[Any, ...], ...]
    inodes: dict[int, _FrozenInode]
    real: dict[str, bytes]
    strict_mkdir: bool
    truncate_syncs: bool
    ops: int
    notes: list[str] = field(default_factory=list)

    # -- namespace after the crash
    def _namespace(self, mode: str, rng: random.Random) -> dict[str, int | _Dir]:
        if mode == "process":
            return dict(self.cur)
        ns = dict(self.dur)
        if mode == "drop_all" or not self.dirops:
            return ns
        if mode == "dirents":
            keep = [rng.random() < 0.5 for _ in self.dirops]
        else:  # a prefix per folder: ordered metadata journaling (ext4, xfs)
            folders = sorted({f for op in self.dirops for f in _op_folders(op)})
            cut = {f: rng.random() for f in folders}
            seen: dict[str, int] = {}
            counts: dict[str, int] = {}
            for op in self.dirops:
                for f in _op_folders(op):
                    counts[f] = counts.get(f, 0) + 1
            keep = []
            for op in self.dirops:
                ok = True
                for f in _op_folders(op):
                    seen[f] = seen.get(f, 0) + 1
                    ok = ok and seen[f] <= int(cut[f] * (counts[f] + 1))
                keep.append(ok)
        for op, k in zip(self.dirops, keep, strict=True):
            if k:
                self._apply_dirop(ns, op)
        return ns

    def _apply_dirop(self, ns: dict[str, int | _Dir], op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "mkdir":
            ns.setdefault(op[1], DIR)
        elif kind == "create":
            ns.setdefault(op[1], op[2])
        elif kind == "rename":
            if ns.get(op[1]) == op[3]:
                del ns[op[1]]
                ns[op[2]] = op[3]
        elif kind == "remove" and ns.get(op[1]) == op[2]:
            del ns[op[1]]

    def _reachable(self, ns: dict[str, int | _Dir], p: str) -> bool:
        q = os.path.dirname(p)
        while q != self.root:
            if ns.get(q) is not DIR:
                return False
            q = os.path.dirname(q)
        return True

    # -- file content after the crash
    def _content(self, fi: _FrozenInode, mode: str, rng: random.Random) -> bytes:
        if mode == "process":
            return fi.current()
        if mode == "drop_all" or not fi.pending:
            return fi.durable
        if mode == "dirents":
            mode = rng.choice(["all", "keep_some", "keep_some"])
            if mode == "all":  # every unsynced operation landed (a lost fsync's never do)
                return bytes(apply_ops(fi.durable, fi.pending))
        if mode == "keep_some":
            return self._prefix(fi, rng)
        return self._reorder(fi, rng)

    def _prefix(self, fi: _FrozenInode, rng: random.Random) -> bytes:
        n = rng.randint(0, len(fi.pending))
        ops = list(fi.pending[:n])
        if ops and ops[-1][0] == "append" and rng.random() < 0.6:
            _, off, data = ops[-1]
            end = off + len(data)
            bounds = [b for b in range((off // SECTOR + 1) * SECTOR, end, SECTOR)]
            how = rng.choice(["sector", "byte", "zeros"])
            cut = rng.choice(bounds) if bounds and how != "byte" else rng.randrange(off, end)
            if how == "zeros":  # the size reached the disk, the data did not (all or part)
                ops[-1] = ("append", off, data[: cut - off] + bytes(end - cut))
            else:
                ops[-1] = ("append", off, data[: cut - off])
        return bytes(apply_ops(fi.durable, ops))

    def _reorder(self, fi: _FrozenInode, rng: random.Random) -> bytes:
        p_land = rng.choice([0.3, 0.5, 0.8])
        by_sector = rng.random() < 0.5
        buf = bytearray(fi.durable)
        for kind, off, data in fi.pending:
            if kind == "truncate":
                buf = apply_ops(bytes(buf), [(kind, off, data)])
                continue
            if not by_sector:
                if rng.random() < p_land:
                    buf = apply_ops(bytes(buf), [(kind, off, data)])
                continue
            end = off + len(data)
            pos = off
            while pos < end:
                nxt = min((pos // SECTOR + 1) * SECTOR, end)
                if rng.random() < p_land:
                    if nxt > len(buf):
                        buf.extend(bytes(nxt - len(buf)))
                    buf[pos:nxt] = data[pos - off : nxt - off]
                pos = nxt
        return bytes(buf)

    def crash_image_files(self, mode: str, rng: random.Random) -> dict[str, bytes]:
        ns = self._namespace(mode, rng)
        out: dict[str, bytes] = {}
        done: dict[int, bytes] = {}
        for p in sorted(ns):
            node = ns[p]
            if isinstance(node, _Dir) or not self._reachable(ns, p):
                continue
            if node not in done:
                done[node] = self._content(self.inodes[node], mode, rng)
            out[os.path.relpath(p, self.root)] = done[node]
        return out

    def crash_image(
        self,
        mode: str,
        rng: random.Random,
        *,
        root: str | None = None,
        keep_real_files: bool = True,
    ) -> FaultyStorage:
        """A new storage holding one possible post-power-loss state (see the module doc)."""
        if mode not in MODES:
            raise ValueError(f"unknown crash mode {mode!r}; one of {MODES}")
        if root is None:
            root = tempfile.mkdtemp(prefix="crash-", dir=os.path.dirname(self.root))
        new = FaultyStorage(
            root, strict_mkdir=self.strict_mkdir, truncate_syncs=self.truncate_syncs
        )
        ns = self._namespace(mode, rng)
        made: dict[int, _Inode] = {}
        for p in sorted(ns):
            node = ns[p]
            if not self._reachable(ns, p):
                continue
            q = os.path.join(new.root, os.path.relpath(p, self.root))
            if isinstance(node, _Dir):
                new._cur[q] = new._dur[q] = DIR
                os.makedirs(q, exist_ok=True)
                continue
            ino = made.get(node)
            if ino is None:
                ino = new._new_inode(self._content(self.inodes[node], mode, rng))
                made[node] = ino
            new._cur[q] = new._dur[q] = ino
        if keep_real_files:
            for rel, data in self.real.items():
                if rel.endswith("-shm"):
                    continue  # shared memory of a live connection, rebuilt by SQLite
                q = os.path.join(new.root, rel)
                os.makedirs(os.path.dirname(q), exist_ok=True)
                with open(q, "wb") as f:
                    f.write(data)
        return new
