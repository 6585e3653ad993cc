"""Several exports: one per volume, each independent (issue 4: "multiple exports").

- Daemon: two ``source = "nbd"`` volumes of one consistency group, each on its own socket
  (the config refuses two volumes on one ``listen`` address, docs/config.md). Each socket
  lists its own export only; writes to one never show in the other; both volumes share the
  group's seq and each journal reconstruction equals its image.
- One socket serving two exports: the server supports it (``Daemon._start_exports`` groups
  volumes by address), so it is tested in-process with :class:`cdp.nbd.server.NbdServer`,
  two :class:`cdp.nbd.export.Export` and one real journal: NBD_OPT_LIST lists both, and
  each export is independent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nbdraw as n
import pytest
from conftest import Volume, need_tools, qemu_io, run, running_daemon
from nbdraw import RawNbd

from cdp.nbd.export import Export, ExportSet
from cdp.nbd.server import NbdServer
from journal import Journal

pytestmark = pytest.mark.integration

T = TypeVar("T")
SIZES = {"a": 8 << 20, "b": 4 << 20}


def listed(sock: str) -> list[str]:
    with RawNbd(sock) as c:
        c.handshake()
        c.send(n.option(n.OPT_LIST))
        replies = c.option_replies(n.OPT_LIST)
        names = [r.data[4:].decode() for r in replies if r.type == n.REP_SERVER]
        c.send(n.option(n.OPT_ABORT))
        return names


def test_two_volumes_one_group_two_sockets(tmp_path: Path) -> None:
    need_tools("qemu-io", "qemu-img", "nbdinfo")
    vols = [Volume(name, size, group="vm1") for name, size in SIZES.items()]
    with running_daemon(tmp_path, vols) as d:
        for name in SIZES:
            assert listed(d.sock(name)) == [name]
            other = "b" if name == "a" else "a"
            with RawNbd(d.sock(name)) as c:  # the other volume is not served here
                c.handshake()
                assert c.go(other)[-1].type == n.REP_ERR_UNKNOWN
            info = json.loads(run(["nbdinfo", "--json", d.uri(name)]))
            assert info["exports"][0]["export-size"] == SIZES[name]
        qemu_io(d.uri("a"), "write -P 0xaa 0 1M", "write -P 0xab 3M 64k")
        qemu_io(d.uri("b"), "write -P 0xbb 0 512k", "discard 1M 1M")
        qemu_io(d.uri("a"), "read -P 0xaa 0 1M", "read -P 0 1M 1M")
        qemu_io(d.uri("b"), "read -P 0xbb 0 512k", "read -P 0 512k 512k")
        with RawNbd.connect_export(d.sock("b"), "b") as c:  # b ends where a goes on
            assert c.pwrite(3 << 20, b"\1" * 65536).error == 0
            assert c.pwrite(4 << 20, b"\1").error == n.ENOSPC
        seqs = {d.last_seq(name) for name in SIZES}
        assert len(seqs) == 1, f"volumes of one group must share one seq: {seqs}"
        for name in SIZES:
            d.assert_consistent(name)
        status = d.status()
        assert [g["volumes"] for g in status["groups"]] == [["a", "b"]]
        d.assert_log_clean()


class InProcessServer:
    """NbdServer with two exports on one unix socket, on an event loop in a thread."""

    def __init__(self, root: Path, sock: str) -> None:
        self.root = root
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.journal = Journal.open(str(root / "journal"))
        for name, size in SIZES.items():
            self.journal.add_volume(name, size)
        self.journal.sync()
        self.exports = ExportSet()
        self.server: NbdServer | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self) -> None:
        async def start() -> None:
            for name, size in SIZES.items():
                ex = Export(name, size, str(self.root / f"{name}.raw"), lambda: self.journal)
                ex.open()
                self.exports.exports[name] = ex
            self.server = NbdServer(self.exports)
            await self.server.start_unix(self.sock)

        self.call(start())

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.stop()
            for ex in self.exports.exports.values():
                await ex.flush()
                ex.close()

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.journal.close()

    def assert_journal_matches_image(self, name: str) -> None:
        async def read() -> bytes:
            return await asyncio.to_thread(self.journal.read, name, 0, SIZES[name])

        assert self.call(read()) == (self.root / f"{name}.raw").read_bytes(), name


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[InProcessServer]:
    short = Path(tempfile.mkdtemp(prefix="cdpnbd-", dir="/tmp"))
    s = InProcessServer(tmp_path, str(short / "shared.sock"))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_two_exports_on_one_socket(shared: InProcessServer) -> None:
    need_tools("qemu-io", "nbdinfo")
    sock = shared.sock
    assert listed(sock) == ["a", "b"]
    out = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"])
    assert sorted(e["export-name"] for e in json.loads(out)["exports"]) == ["a", "b"]
    uri = {name: f"nbd+unix:///{name}?socket={sock}" for name in SIZES}
    qemu_io(uri["a"], "write -P 0x0a 0 1M", "write -P 0x0a 6M 64k")
    qemu_io(uri["b"], "write -P 0x0b 512k 1M")
    # concurrent clients on both exports of the one socket
    with (
        RawNbd.connect_export(sock, "a") as ca,
        RawNbd.connect_export(sock, "b", structured=True) as cb,
    ):
        assert ca.size == SIZES["a"] and cb.size == SIZES["b"]
        for i in range(16):
            ca.submit(n.CMD_WRITE, 2 << 20 | i * 4096, payload=bytes([0xA0 + i]) * 4096)
            cb.submit(n.CMD_WRITE, 2 << 20 | i * 4096, payload=bytes([0xB0 + i]) * 4096)
        for _ in range(16):
            assert ca.reply().error == 0 and cb.reply().error == 0
        assert ca.flush().error == 0 and cb.flush().error == 0
        for i in range(16):
            assert ca.pread(2 << 20 | i * 4096, 4096).data == bytes([0xA0 + i]) * 4096
            assert cb.pread(2 << 20 | i * 4096, 4096).data == bytes([0xB0 + i]) * 4096
        assert cb.pwrite(SIZES["b"], b"x").error == n.ENOSPC  # b's own size applies
        assert ca.pwrite(SIZES["b"], b"x").error == 0
    qemu_io(uri["a"], "read -P 0x0a 0 512k", "read -P 0x0a 6M 64k")
    qemu_io(uri["b"], "read -P 0 0 512k", "read -P 0x0b 512k 1M")
    with RawNbd(sock) as c:
        c.handshake()
        assert c.go("c")[-1].type == n.REP_ERR_UNKNOWN
    for name in SIZES:
        shared.assert_journal_matches_image(name)
