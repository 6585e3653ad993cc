"""A small asyncio NBD client (fixed newstyle, structured replies, base:allocation).

Used by the CBT poller (to read dirty extents from qemu-storage-daemon) and by tests that need
to log exactly which writes were acknowledged. Requests may be pipelined: each call sends its
request and awaits the reply that carries its cookie.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from dataclasses import dataclass

from cdp.nbd import proto


class NbdError(Exception):
    """The server answered a request with an error (``errno`` is the NBD error value)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(f"NBD error {errno}{': ' + message if message else ''}")
        self.errno = errno


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    flags: int


class NbdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer
        self._cookies = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self.info: ExportInfo | None = None
        self.structured = False
        self.meta_context_id: int | None = None
        self._lost: ConnectionError | None = None

    # ------------------------------------------------------------------ connecting
    @classmethod
    async def connect_unix(
        cls, path: str, export: str, *, meta_contexts: tuple[str, ...] = ()
    ) -> NbdClient:
        r, w = await asyncio.open_unix_connection(path, limit=1 << 26)
        c = cls(r, w)
        await c._handshake(export, meta_contexts)
        return c

    @classmethod
    async def connect_tcp(
        cls, host: str, port: int, export: str, *, meta_contexts: tuple[str, ...] = ()
    ) -> NbdClient:
        r, w = await asyncio.open_connection(host, port, limit=1 << 26)
        c = cls(r, w)
        await c._handshake(export, meta_contexts)
        return c

    async def _option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self._w.write(proto.OPTION_HEADER.pack(proto.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rtype, length = proto.OPTION_REPLY.unpack(
                await self._r.readexactly(proto.OPTION_REPLY.size)
            )
            if magic != proto.OPT_REPLY_MAGIC or opt != option:
                raise proto.ProtocolError("bad option reply")
            body = await self._r.readexactly(length) if length else b""
            if rtype & (1 << 31):
                raise NbdError(rtype, body.decode(errors="replace"))
            replies.append((rtype, body))
            if rtype == proto.REP_ACK:
                return replies

    async def _handshake(self, export: str, meta_contexts: tuple[str, ...]) -> None:
        nbdmagic, ihaveopt, _flags = proto.HANDSHAKE.unpack(
            await self._r.readexactly(proto.HANDSHAKE.size)
        )
        if nbdmagic != proto.NBDMAGIC or ihaveopt != proto.IHAVEOPT:
            raise proto.ProtocolError("not an NBD server")
        self._w.write(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
        await self._option(proto.OPT_STRUCTURED_REPLY)
        self.structured = True
        name = export.encode()
        if meta_contexts:
            q = b"".join(struct.pack(">I", len(m.encode())) + m.encode() for m in meta_contexts)
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta_contexts)) + q
            for rtype, body in await self._option(proto.OPT_SET_META_CONTEXT, data):
                if rtype == proto.REP_META_CONTEXT:
                    self.meta_context_id = struct.unpack_from(">I", body)[0]
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        for rtype, body in await self._option(proto.OPT_GO, go):
            if rtype == proto.REP_INFO and struct.unpack_from(">H", body)[0] == proto.INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", body[:12])
                self.info = ExportInfo(export, size, flags)
        if self.info is None:
            raise proto.ProtocolError("server sent no export information")
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    # ------------------------------------------------------------------ replies
    async def _read_replies(self) -> None:
        try:
            while True:
                head = await self._r.readexactly(4)
                (magic,) = struct.unpack(">I", head)
                if magic == proto.SIMPLE_REPLY_MAGIC:
                    err, cookie = struct.unpack(">IQ", await self._r.readexactly(12))
                    self._finish(cookie, err, b"")
                    continue
                if magic != proto.STRUCTURED_REPLY_MAGIC:
                    raise proto.ProtocolError(f"bad reply magic {magic:#x}")
                flags, rtype, cookie, length = struct.unpack(">HHQI", await self._r.readexactly(16))
                body = await self._r.readexactly(length) if length else b""
                fut = self._waiting.get(cookie)
                if rtype == proto.REPLY_TYPE_ERROR or rtype == proto.REPLY_TYPE_ERROR_OFFSET:
                    err = struct.unpack_from(">I", body)[0]
                    self._finish(cookie, err, b"")
                    continue
                if fut is not None and not fut.done():
                    acc = getattr(fut, "_cdp_acc", None)
                    if acc is None:
                        acc = bytearray()
                        fut._cdp_acc = acc  # type: ignore[attr-defined]
                    if rtype == proto.REPLY_TYPE_OFFSET_DATA:
                        acc += body[8:]
                    elif rtype == proto.REPLY_TYPE_OFFSET_HOLE:
                        acc += bytes(struct.unpack_from(">QI", body)[1])
                    elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
                        acc += body
                if flags & proto.REPLY_FLAG_DONE:
                    acc2 = getattr(fut, "_cdp_acc", b"") if fut is not None else b""
                    self._finish(cookie, 0, bytes(acc2))
        except (asyncio.IncompleteReadError, ConnectionError, proto.ProtocolError) as e:
            self._lost = ConnectionError(f"connection lost: {e}")
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection lost: {e}"))
            self._waiting.clear()

    def _finish(self, cookie: int, err: int, data: bytes) -> None:
        fut = self._waiting.pop(cookie, None)
        if fut is None or fut.done():
            return
        if err:
            fut.set_exception(NbdError(err))
        else:
            fut.set_result(data)

    async def _request(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes | memoryview = b""
    ) -> bytes:
        if self._lost is not None:
            raise self._lost
        cookie = next(self._cookies)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[cookie] = fut
        self._w.writelines(
            [proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, cmd, cookie, offset, length), payload]
        )
        return await fut

    # ------------------------------------------------------------------ commands
    async def read(self, offset: int, length: int) -> bytes:
        return await self._request(proto.CMD_READ, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        await self._request(
            proto.CMD_WRITE, offset, len(data), proto.CMD_FLAG_FUA if fua else 0, data
        )

    async def flush(self) -> None:
        await self._request(proto.CMD_FLUSH, 0, 0)

    async def zero(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._request(
            proto.CMD_WRITE_ZEROES, offset, length, proto.CMD_FLAG_FUA if fua else 0
        )

    async def trim(self, offset: int, length: int) -> None:
        await self._request(proto.CMD_TRIM, offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents of the negotiated meta context from ``offset``."""
        body = await self._request(proto.CMD_BLOCK_STATUS, offset, length)
        out = []
        for pos in range(4, len(body), 8):
            out.append(struct.unpack_from(">II", body, pos))
        return [(int(a), int(b)) for a, b in out]

    async def close(self) -> None:
        try:
            self._w.write(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_DISC, 0, 0, 0))
            await self._w.drain()
        except ConnectionError:
            pass
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._w.close()
