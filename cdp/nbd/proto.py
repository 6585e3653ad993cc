"""The NBD wire protocol, pure: constants and bytes <-> values, no I/O.

From NetworkBlockDevice/nbd doc/proto.md (fixed newstyle handshake, structured replies,
meta contexts). Shared by the export server and the client that the CBT poller and the
tests use. Every decoder is total: malformed input gives a ProtocolError, never a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
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

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    0: "read",
    1: "write",
    2: "disc",
    3: "flush",
    4: "trim",
    5: "cache",
    6: "write_zeroes",
    7: "block_status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# errors (the only values allowed on the wire)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

MAX_STRING = 4096
MAX_OPTION_DATA = 64 * 1024  # larger option payloads are treated as abuse (disconnect)
MAX_REQUEST = 32 * 1024 * 1024  # largest payload we accept; advertised as max block size

HANDSHAKE = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def server_greeting() -> bytes:
    return HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: int, message: str = "") -> bytes:
    return option_reply(option, reply, message.encode()[:MAX_STRING])


def info_export(size: int, tflags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, tflags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def decode_string(data: bytes | memoryview, what: str) -> str:
    if len(data) > MAX_STRING:
        raise ValueError(f"{what} longer than {MAX_STRING} bytes")
    try:
        s = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8") from e
    if "\x00" in s:
        raise ValueError(f"{what} contains NUL")
    return s


@dataclass(frozen=True, slots=True)
class GoRequest:
    name: str
    infos: tuple[int, ...]


def decode_go(data: bytes | memoryview) -> GoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO payload; ValueError when malformed (-> NBD_REP_ERR_INVALID)."""
    if len(data) < 6:
        raise ValueError("option payload too short")
    (n,) = struct.unpack_from(">I", data, 0)
    if 4 + n + 2 > len(data):
        raise ValueError("export name length runs past the payload")
    name = decode_string(data[4 : 4 + n], "export name")
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        raise ValueError("information request list does not match the payload length")
    infos = struct.unpack_from(f">{count}H", data, 4 + n + 2)
    return GoRequest(name, tuple(infos))


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    export: str
    queries: tuple[str, ...]


def decode_meta_context(data: bytes | memoryview) -> MetaContextRequest:
    if len(data) < 8:
        raise ValueError("option payload too short")
    (n,) = struct.unpack_from(">I", data, 0)
    if 4 + n + 4 > len(data):
        raise ValueError("export name length runs past the payload")
    export = decode_string(data[4 : 4 + n], "export name")
    pos = 4 + n
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("query list runs past the payload")
        (qn,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qn > len(data):
            raise ValueError("query runs past the payload")
        queries.append(decode_string(data[pos : pos + qn], "meta context query"))
        pos += qn
    if pos != len(data):
        raise ValueError("trailing bytes after the query list")
    return MetaContextRequest(export, tuple(queries))


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode())


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_header(cookie: int, rtype: int, length: int, *, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype, cookie, length
    )


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    body = struct.pack(">IH", error, len(msg)) + msg
    return structured_header(cookie, REPLY_TYPE_ERROR, len(body), done=True) + body


def structured_none(cookie: int) -> bytes:
    return structured_header(cookie, REPLY_TYPE_NONE, 0, done=True)


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", n, flags) for n, flags in extents
    )
    return structured_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done=True) + body
