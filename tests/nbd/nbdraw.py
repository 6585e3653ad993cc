"""A raw-socket NBD client for tests: pure ``socket`` + ``struct``, written from the spec.

It deliberately does not import ``cdp.nbd.proto``: the constants here are copied from
NetworkBlockDevice/nbd ``doc/proto.md``, so a wrong constant in the server's codec shows up
as a test failure instead of cancelling out. It can send anything (bad magic, lying length
fields, unknown options and commands) and reads replies strictly: a reply that breaks the
protocol (unknown magic, a simple reply to a READ once structured replies were negotiated,
a cookie nobody asked for) raises :class:`ProtocolViolation`.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007

INFO_EXPORT = 0
INFO_NAME = 1
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
WIRE_ERRORS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1


class ProtocolViolation(AssertionError):
    """The server sent something the spec does not allow."""


class Closed(EOFError):
    """The server closed the connection."""


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_payload(name: str | bytes, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x80000000)


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""  # READ: the bytes, holes filled with zeros
    structured: bool = False
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)  # (flags, type, payload)
    message: str = ""

    @property
    def extents(self) -> list[tuple[int, int]]:
        """BLOCK_STATUS descriptors (length, flags) of the first block-status chunk."""
        for _, rtype, payload in self.chunks:
            if rtype == REPLY_TYPE_BLOCK_STATUS:
                body = payload[4:]
                return [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]
        return []


@dataclass
class _Pending:
    cmd: int
    offset: int
    length: int


@dataclass
class _Partial:
    reply: Reply
    buf: bytearray
    covered: list[tuple[int, int]] = field(default_factory=list)


class RawNbd:
    """One connection. Use :meth:`connect_export` for the usual path, or the pieces."""

    def __init__(self, path: str | tuple[str, int], *, timeout: float = 10.0) -> None:
        """``path``: a unix socket path, or a (host, port) TCP address."""
        fam = socket.AF_UNIX if isinstance(path, str) else socket.AF_INET
        self.sock: socket.socket = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.size = 0
        self.tflags = 0
        self.no_zeroes = False
        self.pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._rbuf = bytearray()
        self._partial: dict[int, _Partial] = {}

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self._rbuf) < n:
            try:
                chunk = self.sock.recv(max(65536, n - len(self._rbuf)))
            except ConnectionResetError as e:
                raise Closed("connection reset") from e
            if not chunk:
                raise Closed(f"closed with {len(self._rbuf)} of {n} bytes read")
            self._rbuf += chunk
        out = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return out

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Wait until the server closes (True) or sends more bytes / the timeout passes."""
        if self._rbuf:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        if data:
            self._rbuf += data
            return False
        return True

    def drain(self, quiet: float = 0.05, limit: float = 2.0) -> bytes:
        """Everything the server sends until it is quiet for ``quiet`` s or closes."""
        out = bytearray(self._rbuf)
        self._rbuf.clear()
        end = time.monotonic() + limit
        self.sock.settimeout(quiet)
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    break
                raise
            if not data:
                break
            out += data
        return bytes(out)

    # ------------------------------------------------------------------ handshake
    def greeting(self) -> int:
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolViolation(f"bad greeting {magic:#x} {opt_magic:#x}")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolViolation(f"server is not fixed newstyle (flags {hflags:#x})")
        return int(hflags)

    def client_flags(self, flags: int = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) -> None:
        self.no_zeroes = bool(flags & CLIENT_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def handshake(self, flags: int = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) -> None:
        self.greeting()
        self.client_flags(flags)

    def option_reply(self, expect_option: int | None = None) -> OptionReply:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolViolation(f"bad option reply magic {magic:#x}")
        if expect_option is not None and opt != expect_option:
            raise ProtocolViolation(f"option reply for {opt}, expected {expect_option}")
        return OptionReply(opt, rtype, self.recv_exact(length))

    def option_replies(self, opt: int) -> list[OptionReply]:
        """Replies to ``opt`` up to and including the final one (ACK or an error)."""
        out = []
        while True:
            r = self.option_reply(opt)
            out.append(r)
            if r.type == REP_ACK or r.is_error:
                return out

    def negotiate_structured(self) -> None:
        self.send(option(OPT_STRUCTURED_REPLY))
        r = self.option_reply(OPT_STRUCTURED_REPLY)
        if r.type != REP_ACK:
            raise ProtocolViolation(f"structured replies refused: {r}")
        self.structured = True

    def set_meta_context(self, name: str, queries: tuple[str, ...]) -> dict[int, str]:
        self.send(option(OPT_SET_META_CONTEXT, meta_payload(name, queries)))
        contexts = {}
        for r in self.option_replies(OPT_SET_META_CONTEXT):
            if r.is_error:
                raise ProtocolViolation(f"SET_META_CONTEXT failed: {r}")
            if r.type == REP_META_CONTEXT:
                (cid,) = struct.unpack_from(">I", r.data)
                contexts[cid] = r.data[4:].decode()
        return contexts

    def go(self, name: str, infos: tuple[int, ...] = (), opt: int = OPT_GO) -> list[OptionReply]:
        self.send(option(opt, go_payload(name, infos)))
        replies = self.option_replies(opt)
        for r in replies:
            if r.type == REP_INFO and struct.unpack_from(">H", r.data)[0] == INFO_EXPORT:
                self.size, self.tflags = struct.unpack_from(">QH", r.data, 2)
        return replies

    def export_name(self, name: str | bytes) -> None:
        raw = name.encode() if isinstance(name, str) else name
        self.send(option(OPT_EXPORT_NAME, raw))
        self.size, self.tflags = struct.unpack(">QH", self.recv_exact(10))
        if not self.no_zeroes:
            self.recv_exact(124)

    @classmethod
    def connect_export(
        cls,
        path: str | tuple[str, int],
        name: str,
        *,
        structured: bool = False,
        meta: bool = False,
        timeout: float = 10.0,
    ) -> RawNbd:
        c = cls(path, timeout=timeout)
        try:
            c.handshake()
            if structured:
                c.negotiate_structured()
            if meta:
                c.set_meta_context(name, ("base:allocation",))
            replies = c.go(name)
            if replies[-1].type != REP_ACK:
                raise ProtocolViolation(f"GO {name!r} failed: {replies[-1]}")
        except BaseException:
            c.close()
            raise
        return c

    # ------------------------------------------------------------------ transmission
    def submit(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
        send: bool = True,
    ) -> tuple[int, bytes]:
        """Queue a request; returns (cookie, bytes). With ``send`` the bytes are sent now."""
        if cookie is None:
            cookie = self._next_cookie
            self._next_cookie += 1
        if cmd == CMD_WRITE and length == 0:
            length = len(payload)
        frame = request(cmd, cookie, offset, length, flags) + payload
        if cmd != CMD_DISC:
            if cookie in self.pending:
                raise ValueError(f"cookie {cookie} already outstanding")
            self.pending[cookie] = _Pending(cmd, offset, length)
        if send:
            self.send(frame)
        return cookie, frame

    def reply(self) -> Reply:
        """Read one complete reply to an outstanding request (all chunks of a structured one).

        Chunks of different structured replies may interleave; partial ones are kept until
        their final chunk arrives.
        """
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv_exact(12))
                if cookie in self._partial:
                    raise ProtocolViolation(f"simple reply to {cookie} amid its structured chunks")
                p = self._take(cookie)
                if self.structured and p.cmd == CMD_READ:
                    raise ProtocolViolation(f"simple reply to READ {cookie} after structured")
                if error and error not in WIRE_ERRORS:
                    raise ProtocolViolation(f"error {error} is not an NBD error value")
                data = b""
                if p.cmd == CMD_READ and error == 0:
                    data = self.recv_exact(p.length)
                return Reply(cookie, error, data)
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolViolation(f"bad reply magic {magic:#x}")
            if not self.structured:
                raise ProtocolViolation("structured reply without negotiating it")
            done = self._chunk()
            if done is not None:
                return done

    def _take(self, cookie: int) -> _Pending:
        p = self.pending.pop(cookie, None)
        if p is None:
            raise ProtocolViolation(f"reply for cookie {cookie}, which is not outstanding")
        return p

    def _chunk(self) -> Reply | None:
        flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        payload = self.recv_exact(length)
        p = self.pending.get(cookie)
        if p is None:
            raise ProtocolViolation(f"reply for cookie {cookie}, which is not outstanding")
        st = self._partial.get(cookie)
        if st is None:
            st = self._partial[cookie] = _Partial(
                Reply(cookie, structured=True), bytearray(p.length if p.cmd == CMD_READ else 0)
            )
        rep = st.reply
        rep.chunks.append((flags, rtype, payload))
        if rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
            if length < 6:
                raise ProtocolViolation("short error chunk")
            err, mlen = struct.unpack_from(">IH", payload)
            if err == 0 or err not in WIRE_ERRORS:
                raise ProtocolViolation(f"error chunk with error {err}")
            if 6 + mlen + (8 if rtype == REPLY_TYPE_ERROR_OFFSET else 0) != length:
                raise ProtocolViolation("error chunk length does not match its message")
            rep.error = rep.error or err
            rep.message = payload[6 : 6 + mlen].decode(errors="replace")
        elif rtype == REPLY_TYPE_OFFSET_DATA:
            if p.cmd != CMD_READ:
                raise ProtocolViolation("data chunk for a non-READ request")
            (off,) = struct.unpack_from(">Q", payload)
            data = payload[8:]
            if not data:
                raise ProtocolViolation("empty data chunk")
            self._check_inside(p, off, len(data), st.covered)
            st.buf[off - p.offset : off - p.offset + len(data)] = data
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            if p.cmd != CMD_READ:
                raise ProtocolViolation("hole chunk for a non-READ request")
            off, n = struct.unpack_from(">QI", payload)
            self._check_inside(p, off, n, st.covered)
        elif rtype == REPLY_TYPE_BLOCK_STATUS:
            if p.cmd != CMD_BLOCK_STATUS:
                raise ProtocolViolation("block status chunk for another command")
            if length < 12 or (length - 4) % 8:
                raise ProtocolViolation(f"block status chunk of {length} bytes")
        elif rtype == REPLY_TYPE_NONE:
            if length or not flags & REPLY_FLAG_DONE:
                raise ProtocolViolation("NONE chunk must be empty and final")
        else:
            raise ProtocolViolation(f"unknown chunk type {rtype:#x}")
        if not flags & REPLY_FLAG_DONE:
            return None
        del self._partial[cookie]
        self.pending.pop(cookie)
        if p.cmd == CMD_READ:
            if rep.error == 0 and sum(n for _, n in st.covered) != p.length:
                raise ProtocolViolation("successful READ did not cover the whole range")
            rep.data = bytes(st.buf) if rep.error == 0 else b""
        return rep

    @staticmethod
    def _check_inside(p: _Pending, off: int, n: int, covered: list[tuple[int, int]]) -> None:
        if off < p.offset or off + n > p.offset + p.length:
            raise ProtocolViolation(
                f"chunk [{off}, +{n}) outside the request [{p.offset}, +{p.length})"
            )
        for o, m in covered:
            if off < o + m and o < off + n:
                raise ProtocolViolation("overlapping data chunks")
        covered.append((off, n))

    # ------------------------------------------------------------------ one-shot helpers
    def call(self, cmd: int, offset: int = 0, length: int = 0, **kw: object) -> Reply:
        cookie, _ = self.submit(cmd, offset, length, **kw)  # type: ignore[arg-type]
        r = self.reply()
        if r.cookie != cookie:
            raise ProtocolViolation(f"reply for {r.cookie}, expected {cookie}")
        return r

    def pread(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.call(CMD_READ, offset, length, flags=flags)

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.call(CMD_WRITE, offset, len(data), flags=flags, payload=data)

    def flush(self) -> Reply:
        return self.call(CMD_FLUSH)

    def disconnect(self) -> None:
        self.submit(CMD_DISC)
        self.close()
