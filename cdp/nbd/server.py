"""The NBD export server: an asyncio Protocol that parses the wire itself.

Why a Protocol and not streams: every request is handled inside ``data_received`` on the
loop thread (pwrite to the image, append to the journal, reply), with no task or await per
request. Only FLUSH and FUA wait, in a thread, and they share fsyncs (group commit). Requests
are processed in arrival order, so overlapping writes apply in the order the client sent them.

Bad input: a malformed option gets the spec's error reply; a framing violation (bad magic,
oversized payload) disconnects that client only. Nothing is journaled for a request that is
refused, and a request is either journaled whole or not at all.

TLS (``NBD_OPT_STARTTLS``, TCP only): after the ACK the connection reads nothing more in
plaintext; bytes the client sent after the option before the handshake are a protocol violation
and cost it the connection. A successful handshake swaps in the TLS transport and forgets every
earlier negotiation result (CVE-2021-3716). In ``"require"`` mode (the spec's FORCEDTLS) only
STARTTLS and ABORT are answered before TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import struct
from typing import Any, Literal

from cdp.nbd import proto
from cdp.nbd.export import Export, ExportSet
from cdp.sockpath import prepare_socket_path, remove_socket

log = logging.getLogger(__name__)

_PHASE_FLAGS, _PHASE_OPTIONS, _PHASE_TRANSMISSION, _PHASE_CLOSED, _PHASE_STARTTLS = range(5)
TlsMode = Literal["require", "allow"]
_READING = (_PHASE_FLAGS, _PHASE_OPTIONS, _PHASE_TRANSMISSION)  # phases that parse input
_BEFORE_TLS = (proto.OPT_STARTTLS, proto.OPT_ABORT)  # all FORCEDTLS answers without TLS
CONTEXT_BASE_ALLOCATION = 1
_MAX_PENDING = 256  # queued FUA/FLUSH replies before we stop reading (backpressure)
_MAX_OUT = 32 * 1024 * 1024  # reply bytes queued before we stop parsing requests
HANDSHAKE_TIMEOUT_S = 30.0  # a client that has not chosen an export by then is dropped
_VALID_FLAGS = {
    proto.CMD_READ: proto.CMD_FLAG_FUA | proto.CMD_FLAG_DF,
    proto.CMD_WRITE: proto.CMD_FLAG_FUA,
    proto.CMD_FLUSH: proto.CMD_FLAG_FUA,
    proto.CMD_TRIM: proto.CMD_FLAG_FUA,
    proto.CMD_WRITE_ZEROES: proto.CMD_FLAG_FUA | proto.CMD_FLAG_NO_HOLE,
    proto.CMD_BLOCK_STATUS: proto.CMD_FLAG_REQ_ONE,
    proto.CMD_DISC: 0,
}


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or newer, our certificate, no client certificate.

    Raises:
        OSError: the certificate or key cannot be read or do not match; ``filename`` names
            the pair.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except OSError as e:  # ssl.SSLError included; neither names the file
        reason = e.strerror or getattr(e, "reason", None) or str(e)
        raise OSError(e.errno or 0, f"NBD TLS certificate/key: {reason}", f"{cert}, {key}") from e
    return ctx


class NbdConnection(asyncio.Protocol):
    def __init__(
        self,
        exports: ExportSet,
        tls_context: ssl.SSLContext | None = None,
        tls_mode: TlsMode = "require",
    ) -> None:
        self.exports = exports
        self.tls_context = tls_context
        self.tls_required = tls_context is not None and tls_mode == "require"
        self.tls = False  # the TLS handshake has completed on this connection
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.phase = _PHASE_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None
        self.meta_contexts: set[int] = set()
        self.export: Export | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.peer = "?"
        self._paused = False
        self._writing_paused = False
        self._disc = False
        self._out: list[bytes | memoryview] | None = None
        self._out_bytes = 0
        self._handshake_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.peer = str(transport.get_extra_info("peername") or "unix")
        if self.exports.shutting_down:
            transport.close()
            return
        self._send(proto.server_greeting())
        self._handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        if self.phase in (_PHASE_FLAGS, _PHASE_OPTIONS):
            log.warning("nbd handshake timed out; disconnecting", extra={"peer": self.peer})
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = _PHASE_CLOSED
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.export is not None:
            self.export.connections.discard(self)
        for t in self.tasks:
            t.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._maybe_resume()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._process()
        except proto.ProtocolError as e:
            log.warning(
                "nbd client broke the protocol; disconnecting it",
                extra={"peer": self.peer, "err": str(e)},
            )
            self._abort()
        except Exception:  # a bug must cost one client, never the daemon
            log.exception("nbd connection failed", extra={"peer": self.peer})
            self._abort()

    # ------------------------------------------------------------------ plumbing
    def _backlog(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _send(self, *parts: bytes | memoryview) -> None:
        if self._out is not None:
            self._out.extend(parts)  # sent at the end of the batch, after the journal append
            self._out_bytes += sum(map(len, parts))
        elif self.transport is not None and self.phase != _PHASE_CLOSED:
            self.transport.writelines(parts)

    def _abort(self) -> None:
        self.phase = _PHASE_CLOSED
        self.buf.clear()
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self.phase = _PHASE_CLOSED
        if self.transport is not None:
            self.transport.close()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (
            self._paused
            and not self._disc
            and not self._writing_paused
            and len(self.tasks) < _MAX_PENDING // 2
        ):
            self._paused = False
            if self.transport is not None and self.phase != _PHASE_CLOSED:
                self.transport.resume_reading()
                if self.buf:
                    self.data_received(b"")

    def _process(self) -> None:
        while self.phase in _READING and not self._paused:
            if self.phase == _PHASE_TRANSMISSION:
                self._transmission()
                return
            elif self.phase == _PHASE_OPTIONS:
                if not self._one_option():
                    return
            else:
                if len(self.buf) < 4:
                    return
                (flags,) = struct.unpack_from(">I", self.buf)
                del self.buf[:4]
                if flags & ~(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES):
                    raise proto.ProtocolError(f"unknown client flags {flags:#x}")
                if not flags & proto.FLAG_C_FIXED_NEWSTYLE:
                    raise proto.ProtocolError("client does not speak fixed newstyle")
                self.no_zeroes = bool(flags & proto.FLAG_C_NO_ZEROES)
                self.phase = _PHASE_OPTIONS

    # ------------------------------------------------------------------ handshake
    def _one_option(self) -> bool:
        if len(self.buf) < 16:
            return False
        magic, option, length = proto.OPTION_HEADER.unpack_from(self.buf)
        if magic != proto.IHAVEOPT:
            raise proto.ProtocolError("bad option magic")
        if length > proto.MAX_OPTION_DATA:
            raise proto.ProtocolError(f"option payload of {length} bytes")
        if len(self.buf) < 16 + length:
            return False
        data = bytes(self.buf[16 : 16 + length])
        del self.buf[: 16 + length]
        if self.exports.shutting_down and option != proto.OPT_ABORT:
            self._send(proto.option_error(option, proto.REP_ERR_SHUTDOWN, "server shutting down"))
            return True
        if self.tls_required and not self.tls and option not in _BEFORE_TLS:
            if option == proto.OPT_EXPORT_NAME:  # no error reply exists for it: disconnect
                raise proto.ProtocolError("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
            self._send(proto.option_error(option, proto.REP_ERR_TLS_REQD, "TLS is required"))
            return True
        handler = {
            proto.OPT_EXPORT_NAME: self._opt_export_name,
            proto.OPT_ABORT: self._opt_abort,
            proto.OPT_LIST: self._opt_list,
            proto.OPT_INFO: self._opt_info_go,
            proto.OPT_GO: self._opt_info_go,
            proto.OPT_STRUCTURED_REPLY: self._opt_structured,
            proto.OPT_LIST_META_CONTEXT: self._opt_meta,
            proto.OPT_SET_META_CONTEXT: self._opt_meta,
            proto.OPT_STARTTLS: self._opt_starttls,
        }.get(option)
        if handler is None:
            self._send(proto.option_error(option, proto.REP_ERR_UNSUP, "unsupported"))
            return True
        handler(option, data)
        return True

    def _tflags(self, export: Export) -> int:
        f = (
            proto.TF_HAS_FLAGS
            | proto.TF_SEND_FLUSH
            | proto.TF_SEND_FUA
            | proto.TF_SEND_TRIM
            | proto.TF_SEND_WRITE_ZEROES
        )
        if self.structured:
            f |= proto.TF_SEND_DF
        if export.read_only:
            f |= proto.TF_READ_ONLY
        return f

    def _opt_export_name(self, option: int, data: bytes) -> None:
        try:
            name = proto.decode_string(data, "export name")
        except ValueError as e:
            raise proto.ProtocolError(str(e)) from e
        export = self.exports.exports.get(name)
        if export is None:  # the spec leaves no way to send an error here
            raise proto.ProtocolError(f"unknown export {name!r}")
        reply = struct.pack(">QH", export.size, self._tflags(export))
        if not self.no_zeroes:
            reply += bytes(124)
        self._send(reply)
        self._enter(export)

    def _opt_abort(self, option: int, data: bytes) -> None:
        self._send(proto.option_reply(option, proto.REP_ACK))
        self._close()

    def _opt_starttls(self, option: int, data: bytes) -> None:
        if data:
            self._send(proto.option_error(option, proto.REP_ERR_INVALID, "STARTTLS takes no data"))
            return
        if self.tls_context is None:
            self._send(proto.option_error(option, proto.REP_ERR_POLICY, "TLS is not configured"))
            return
        if self.tls:
            self._send(proto.option_error(option, proto.REP_ERR_INVALID, "TLS is already on"))
            return
        if self.buf:  # plaintext sent before the handshake: CVE-2021-3716's injection
            raise proto.ProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        transport = self.transport
        assert transport is not None
        self._send(proto.option_reply(option, proto.REP_ACK))
        self.phase = _PHASE_STARTTLS
        transport.pause_reading()  # nothing more is read in plaintext; start_tls resumes it
        task = asyncio.get_running_loop().create_task(self._start_tls(transport, self.tls_context))
        self.tasks.add(task)

    async def _start_tls(self, transport: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                new = await loop.start_tls(
                    transport,
                    self,
                    ctx,
                    server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                )
            except Exception as e:  # bad handshake, timeout, reset: costs this client only
                log.warning(
                    "nbd TLS handshake failed; disconnecting",
                    extra={"peer": self.peer, "err": str(e) or type(e).__name__},
                )
                new = None
            if self.phase != _PHASE_STARTTLS:
                return  # the connection went away during the handshake
            if new is None:
                self.phase = _PHASE_CLOSED
                transport.abort()
                return
            self.transport = new
            self.tls = True
            # CVE-2021-3716: nothing negotiated in plaintext survives into the TLS session.
            self.structured = False
            self.meta_export = None
            self.meta_contexts = set()
            self.export = None
            self.phase = _PHASE_OPTIONS
            log.info("nbd client switched to TLS", extra={"peer": self.peer})
            if self.buf:  # decrypted options that arrived with the end of the handshake
                self.data_received(b"")
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.tasks.discard(task)

    def _opt_list(self, option: int, data: bytes) -> None:
        if data:
            self._send(proto.option_error(option, proto.REP_ERR_INVALID, "LIST takes no data"))
            return
        for name in sorted(self.exports.exports):
            raw = name.encode()
            self._send(
                proto.option_reply(option, proto.REP_SERVER, struct.pack(">I", len(raw)) + raw)
            )
        self._send(proto.option_reply(option, proto.REP_ACK))

    def _opt_info_go(self, option: int, data: bytes) -> None:
        try:
            req = proto.decode_go(data)
        except ValueError as e:
            self._send(proto.option_error(option, proto.REP_ERR_INVALID, str(e)))
            return
        export = self.exports.exports.get(req.name)
        if export is None:
            self._send(
                proto.option_error(option, proto.REP_ERR_UNKNOWN, f"no export named {req.name!r}")
            )
            return
        self._send(
            proto.option_reply(
                option, proto.REP_INFO, proto.info_export(export.size, self._tflags(export))
            )
        )
        self._send(
            proto.option_reply(
                option, proto.REP_INFO, proto.info_block_size(1, 4096, proto.MAX_REQUEST)
            )
        )
        if proto.INFO_NAME in req.infos:
            self._send(proto.option_reply(option, proto.REP_INFO, proto.info_name(req.name)))
        self._send(proto.option_reply(option, proto.REP_ACK))
        if option == proto.OPT_GO:
            if self.meta_export != req.name:
                self.meta_contexts = set()
            self._enter(export)

    def _opt_structured(self, option: int, data: bytes) -> None:
        if data:
            self._send(proto.option_error(option, proto.REP_ERR_INVALID, "takes no data"))
            return
        self.structured = True
        self._send(proto.option_reply(option, proto.REP_ACK))

    def _opt_meta(self, option: int, data: bytes) -> None:
        if not self.structured:
            self._send(
                proto.option_error(
                    option, proto.REP_ERR_INVALID, "negotiate structured replies first"
                )
            )
            return
        try:
            req = proto.decode_meta_context(data)
        except ValueError as e:
            self._send(proto.option_error(option, proto.REP_ERR_INVALID, str(e)))
            return
        if req.export not in self.exports.exports:
            self._send(
                proto.option_error(option, proto.REP_ERR_UNKNOWN, f"no export named {req.export!r}")
            )
            return
        queries = req.queries
        if option == proto.OPT_LIST_META_CONTEXT and not queries:
            queries = (proto.BASE_ALLOCATION,)
        chosen = set()
        for q in queries:
            if q == proto.BASE_ALLOCATION or (
                option == proto.OPT_LIST_META_CONTEXT and q == "base:"
            ):
                chosen.add(CONTEXT_BASE_ALLOCATION)
        for cid in sorted(chosen):
            self._send(proto.meta_context_reply(option, cid, proto.BASE_ALLOCATION))
        self._send(proto.option_reply(option, proto.REP_ACK))
        if option == proto.OPT_SET_META_CONTEXT:
            self.meta_export, self.meta_contexts = req.export, chosen

    def _enter(self, export: Export) -> None:
        self.export = export
        export.connections.add(self)
        export.stats.connections += 1
        self.phase = _PHASE_TRANSMISSION
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        log.info(
            "nbd client attached",
            extra={"volume": export.name, "peer": self.peer, "structured": self.structured},
        )

    # ------------------------------------------------------------------ transmission
    def _transmission(self) -> None:
        """Handle every complete request in the buffer as one batch.

        Writes go to the image as they come (so later reads in the batch see them) and are
        queued for the journal; at the end the queue is appended with one writev, and only
        then are the batch's replies sent, with one send.
        """
        ex = self.export
        assert ex is not None
        buf = self.buf
        out: list[bytes | memoryview] = []
        self._out = out
        mv = memoryview(buf)
        views: list[memoryview] = []
        pos = 0
        try:
            while self.phase == _PHASE_TRANSMISSION and not self._paused and not self._disc:
                if len(buf) - pos < 28:
                    break
                if self._out_bytes + self._backlog() > _MAX_OUT:
                    self._pause()  # replies wait to be read: stop reading requests too
                    break
                magic, flags, cmd, cookie, offset, length = proto.REQUEST.unpack_from(buf, pos)
                if magic != proto.REQUEST_MAGIC:
                    raise proto.ProtocolError(f"bad request magic {magic:#x}")
                if cmd == proto.CMD_WRITE:
                    if length > proto.MAX_REQUEST:
                        raise proto.ProtocolError(f"write payload of {length} bytes")
                    if len(buf) - pos < 28 + length:
                        break
                    payload = mv[pos + 28 : pos + 28 + length]
                    views.append(payload)
                    pos += 28 + length
                    self._write(flags, cookie, offset, payload)
                else:
                    pos += 28
                    self._command(cmd, flags, cookie, offset, length)
        finally:
            try:
                ex.commit()
            finally:
                for v in views:
                    v.release()
                mv.release()
                if self.phase == _PHASE_CLOSED:
                    buf.clear()
                else:
                    del buf[:pos]
                self._out = None
                self._out_bytes = 0
                if out and self.transport is not None:
                    self.transport.writelines(out)
                if self._paused and not self._writing_paused:
                    asyncio.get_running_loop().call_soon(self._maybe_resume)

    def _error(self, cookie: int, err: int, msg: str, *, is_read: bool = False) -> None:
        if self.structured:
            self._send(proto.structured_error(cookie, err, msg))
        else:
            self._send(proto.simple_reply(cookie, err))

    def _ok(self, cookie: int) -> None:
        if self.structured:
            self._send(proto.structured_none(cookie))
        else:
            self._send(proto.simple_reply(cookie))

    def _write(self, flags: int, cookie: int, offset: int, payload: memoryview) -> None:
        ex = self.export
        assert ex is not None
        length = len(payload)
        if flags & ~_VALID_FLAGS[proto.CMD_WRITE]:
            self._error(cookie, proto.EINVAL, "unknown flag for write")
        elif ex.read_only:
            self._error(cookie, proto.EPERM, "read-only export")
        elif offset + length > ex.size:
            self._error(cookie, proto.ENOSPC, "write past the end of the export")
        elif length == 0:
            self._ok(cookie)
        else:
            err = ex.write(offset, payload)
            if err:
                self._error(cookie, err, "write failed")
            elif flags & proto.CMD_FLAG_FUA:
                self._after_flush(cookie)
            else:
                self._ok(cookie)

    def _command(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        ex = self.export
        assert ex is not None
        valid = _VALID_FLAGS.get(cmd)
        if valid is None:
            self._error(cookie, proto.EINVAL, f"unknown command {cmd}")
            return
        if flags & ~valid or (flags & proto.CMD_FLAG_DF and not self.structured):
            self._error(cookie, proto.EINVAL, "flag not valid for this command")
            return
        if cmd == proto.CMD_DISC:
            self._disconnect()
            return
        if cmd == proto.CMD_FLUSH:
            self._after_flush(cookie)
            return
        if offset + length > ex.size:
            err = proto.ENOSPC if cmd == proto.CMD_WRITE_ZEROES else proto.EINVAL
            self._error(cookie, err, "request past the end of the export", is_read=True)
            return
        if cmd == proto.CMD_READ:
            if length > proto.MAX_REQUEST:
                self._error(cookie, proto.EINVAL, "read larger than the maximum block size")
                return
            self._read(cookie, offset, length)
            return
        if cmd == proto.CMD_BLOCK_STATUS:
            if CONTEXT_BASE_ALLOCATION not in self.meta_contexts:
                self._error(cookie, proto.EINVAL, "no meta context negotiated")
                return
            if length == 0:
                self._error(cookie, proto.EINVAL, "zero-length block status")
                return
            extents = ex.block_status(offset, length)
            if flags & proto.CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            self._send(proto.block_status_chunk(cookie, CONTEXT_BASE_ALLOCATION, extents))
            return
        # TRIM and WRITE_ZEROES
        if ex.read_only:
            self._error(cookie, proto.EPERM, "read-only export")
            return
        if length == 0:
            self._ok(cookie)
            return
        err = ex.zero(
            offset, length, trim=cmd == proto.CMD_TRIM, no_hole=bool(flags & proto.CMD_FLAG_NO_HOLE)
        )
        if err:
            self._error(cookie, err, "zeroing failed")
        elif flags & proto.CMD_FLAG_FUA:
            self._after_flush(cookie)
        else:
            self._ok(cookie)

    def _read(self, cookie: int, offset: int, length: int) -> None:
        ex = self.export
        assert ex is not None
        try:
            data = ex.read(offset, length) if length else b""
        except OSError as e:
            self._error(cookie, proto.EIO, f"read failed: {e.strerror}", is_read=True)
            return
        if self.structured:
            if not length:
                self._send(proto.structured_none(cookie))
                return
            self._send(
                proto.structured_header(
                    cookie, proto.REPLY_TYPE_OFFSET_DATA, 8 + length, done=True
                ),
                struct.pack(">Q", offset),
                data,
            )
        else:
            self._send(proto.simple_reply(cookie), data)

    def _after_flush(self, cookie: int) -> None:
        """Reply once everything processed so far is durable (FLUSH, or FUA on a write)."""
        ex = self.export
        assert ex is not None
        task = asyncio.get_running_loop().create_task(self._flush_then_reply(ex, cookie))
        self.tasks.add(task)
        if len(self.tasks) >= _MAX_PENDING:
            self._pause()

    async def _flush_then_reply(self, ex: Export, cookie: int) -> None:
        try:
            try:
                await ex.flush()
            except OSError as e:
                log.error("flush failed", extra={"volume": ex.name, "err": str(e)})
                self._error(cookie, proto.EIO, "flush failed")
            else:
                self._ok(cookie)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.tasks.discard(task)
            self._maybe_resume()
            if self._disc and not self.tasks:
                self._close()

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: finish outstanding requests, send no reply, close."""
        self._disc = True
        self.phase = _PHASE_CLOSED if not self.tasks else self.phase
        if not self.tasks:
            self._close()
        else:
            self._pause()


class NbdServer:
    """Listens on one address and serves the exports given to it."""

    def __init__(
        self,
        exports: ExportSet,
        tls_context: ssl.SSLContext | None = None,
        tls_mode: TlsMode = "require",
    ) -> None:
        self.exports = exports
        self.tls_context = tls_context
        self.tls_mode: TlsMode = tls_mode
        self.server: asyncio.base_events.Server | None = None
        self.path: str | None = None

    def _connection(self) -> NbdConnection:
        return NbdConnection(self.exports, self.tls_context, self.tls_mode)

    async def start_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        prepare_socket_path(path)
        self.server = await loop.create_unix_server(self._connection, path)
        os.chmod(path, 0o660)
        self.path = path

    async def start_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._connection, host, port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight flushes finish, then close every connection."""
        self.exports.shutting_down = True
        if self.server is not None:
            self.server.close()
        conns: list[Any] = [c for e in self.exports.exports.values() for c in e.connections]
        pending = [t for c in conns for t in c.tasks]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for c in conns:
            c._close()
        if self.server is not None:
            await self.server.wait_closed()
        if self.path:
            remove_socket(self.path)
