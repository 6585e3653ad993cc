"""B2: bad requests from a raw-socket client (reliability.md B2 and the §3 (c) checklist).

Each case speaks to the daemon's export with :class:`nbdraw.RawNbd` and checks the spec's
answer: an error value (the nbdkit-verified table of B2), or a hard disconnect where the spec
allows one. After every case:

- the daemon still runs and its status API answers;
- a fresh, well-behaved connection (qemu-io) writes and reads back a pattern;
- cases that send no valid write journaled nothing (the window's last seq did not move),
  so no half record was journaled;
- the journal's reconstruction of the latest point equals the image file.

Over the whole module the daemon's RSS grows by less than 16 MiB.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbdraw as n
import pytest
from conftest import CdpDaemon, Volume, need_tools, running_daemon
from nbdraw import RawNbd

pytestmark = pytest.mark.integration

NAME = "neg0"
SIZE = 8 << 20
MARK = b"\x5c" * 4096  # what a refused write at MARK_AT must not replace
MARK_AT = 1 << 20


@dataclass
class Env:
    sock: str
    name: str
    size: int


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdpDaemon]:
    need_tools("qemu-img", "qemu-io")
    root = tmp_path_factory.mktemp("negative")
    with running_daemon(root, [Volume(NAME, SIZE)]) as d:
        with RawNbd.connect_export(d.sock(NAME), NAME) as c:
            assert c.pwrite(MARK_AT, MARK, flags=n.CMD_FLAG_FUA).error == 0
        d.assert_healthy(NAME)
        assert d.proc is not None
        d.rss_start_kib = _rss_kib(d.proc.pid)  # type: ignore[attr-defined]
        yield d
        d.assert_log_clean()


@pytest.fixture
def env(daemon: CdpDaemon) -> Env:
    return Env(daemon.sock(NAME), NAME, SIZE)


def connect(env: Env, *, structured: bool = False, meta: bool = False) -> RawNbd:
    return RawNbd.connect_export(env.sock, env.name, structured=structured, meta=meta)


def still_serves(c: RawNbd) -> None:
    """The same connection still parses requests: a read of the marker block works."""
    r = c.pread(MARK_AT, len(MARK))
    assert r.error == 0 and r.data == MARK


def hello(env: Env, flags: int = n.CLIENT_FIXED_NEWSTYLE | n.CLIENT_NO_ZEROES) -> RawNbd:
    c = RawNbd(env.sock, timeout=10)
    c.handshake(flags)
    return c


# ---------------------------------------------------------------------- transmission: errors

ERROR_CASES: dict[str, tuple[Callable[[RawNbd, Env], n.Reply], int]] = {
    "write past end": (lambda c, e: c.pwrite(e.size, b"\1" * 4096), n.ENOSPC),
    "write straddling end": (lambda c, e: c.pwrite(e.size - 2048, b"\1" * 4096), n.ENOSPC),
    "write offset wraps 2^64": (lambda c, e: c.pwrite(2**64 - 512, b"\1" * 1024), n.ENOSPC),
    "read past end": (lambda c, e: c.pread(e.size, 4096), n.EINVAL),
    "read straddling end": (lambda c, e: c.pread(e.size - 1, 2), n.EINVAL),
    "read offset wraps 2^64": (lambda c, e: c.pread(2**64 - 512, 1024), n.EINVAL),
    "trim past end": (lambda c, e: c.call(n.CMD_TRIM, e.size, 4096), n.EINVAL),
    "trim straddling end": (lambda c, e: c.call(n.CMD_TRIM, e.size - 512, 4096), n.EINVAL),
    "write_zeroes past end": (lambda c, e: c.call(n.CMD_WRITE_ZEROES, e.size, 4096), n.ENOSPC),
    "unknown command 0x7f": (lambda c, e: c.call(0x7F, 0, 4096), n.EINVAL),
    "CACHE not advertised": (lambda c, e: c.call(n.CMD_CACHE, 0, 4096), n.EINVAL),
    "write with unknown flag 0x8000": (
        lambda c, e: c.pwrite(MARK_AT, b"\xff" * 4096, flags=0x8000),
        n.EINVAL,
    ),
    "read with unknown flag 0x8000": (lambda c, e: c.pread(0, 512, flags=0x8000), n.EINVAL),
    "trim with NO_HOLE (not valid for trim)": (
        lambda c, e: c.call(n.CMD_TRIM, MARK_AT, 4096, flags=n.CMD_FLAG_NO_HOLE),
        n.EINVAL,
    ),
    "write_zeroes with FAST_ZERO (not advertised)": (
        lambda c, e: c.call(n.CMD_WRITE_ZEROES, MARK_AT, 4096, flags=n.CMD_FLAG_FAST_ZERO),
        n.EINVAL,
    ),
    "block status without a meta context": (
        lambda c, e: c.call(n.CMD_BLOCK_STATUS, 0, 4096),
        n.EINVAL,
    ),
}


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_reply(daemon: CdpDaemon, env: Env, case: str, structured: bool) -> None:
    send, want = ERROR_CASES[case]
    seq = daemon.last_seq(NAME)
    with connect(env, structured=structured) as c:
        r = send(c, env)
        assert r.error == want, f"{case}: got error {r.error} ({r.message!r}), want {want}"
        still_serves(c)  # the connection survived and is still in step
        c.disconnect()
    assert daemon.last_seq(NAME) == seq, f"{case} journaled something"
    after_each(daemon)


def after_each(daemon: CdpDaemon) -> None:
    daemon.assert_healthy(NAME)
    daemon.assert_journal_matches_image(NAME)


# ---------------------------------------------------------------------- transmission: accepted


def test_read_with_fua_is_accepted(daemon: CdpDaemon, env: Env) -> None:
    with connect(env) as c:
        r = c.pread(MARK_AT, 4096, flags=n.CMD_FLAG_FUA)
        assert r.error == 0 and r.data == MARK
    after_each(daemon)


def test_flush_with_fua_is_accepted(daemon: CdpDaemon, env: Env) -> None:
    with connect(env) as c:
        assert c.call(n.CMD_FLUSH, flags=n.CMD_FLAG_FUA).error == 0
        still_serves(c)
    after_each(daemon)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_df_flag_needs_structured_replies(daemon: CdpDaemon, env: Env, structured: bool) -> None:
    with connect(env, structured=structured) as c:
        r = c.pread(MARK_AT, 4096, flags=n.CMD_FLAG_DF)
        if structured:
            assert c.tflags & n.TF_SEND_DF
            assert r.error == 0 and r.data == MARK
            data_chunks = [ch for ch in r.chunks if ch[1] == n.REPLY_TYPE_OFFSET_DATA]
            assert len(data_chunks) == 1, "DF: the data must come in one chunk"
        else:
            assert not c.tflags & n.TF_SEND_DF, "SEND_DF advertised without structured replies"
            assert r.error == n.EINVAL
        still_serves(c)
    after_each(daemon)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_zero_length_requests_keep_the_connection(
    daemon: CdpDaemon, env: Env, structured: bool
) -> None:
    seq = daemon.last_seq(NAME)
    with connect(env, structured=structured) as c:
        assert c.pread(0, 0).error == 0
        assert c.pwrite(MARK_AT, b"").error == 0
        assert c.call(n.CMD_TRIM, MARK_AT, 0).error == 0
        assert c.call(n.CMD_WRITE_ZEROES, MARK_AT, 0).error == 0
        assert c.pwrite(env.size, b"").error == 0  # empty write at the very end
        assert c.pread(env.size, 0).error == 0
        still_serves(c)
    assert daemon.last_seq(NAME) == seq, "an empty request was journaled"
    after_each(daemon)


def test_block_status_with_meta_context(daemon: CdpDaemon, env: Env) -> None:
    with connect(env, structured=True, meta=True) as c:
        r = c.call(n.CMD_BLOCK_STATUS, 0, env.size)
        assert r.error == 0
        ext = r.extents
        assert ext and all(length > 0 for length, _ in ext)
        assert sum(length for length, _ in ext) <= env.size
        one = c.call(n.CMD_BLOCK_STATUS, 0, env.size, flags=n.CMD_FLAG_REQ_ONE)
        assert one.error == 0 and len(one.extents) == 1 and one.extents[0][0] <= env.size
        past = c.call(n.CMD_BLOCK_STATUS, env.size, 4096)
        assert past.error == n.EINVAL
        zero = c.call(n.CMD_BLOCK_STATUS, 0, 0)
        assert zero.error in (0, n.EINVAL)  # unspecified; must not disconnect
        still_serves(c)
    after_each(daemon)


def test_refused_write_leaves_the_data(daemon: CdpDaemon, env: Env) -> None:
    """An unknown-flag write of new data at MARK_AT: refused, payload skipped, data kept."""
    with connect(env) as c:
        r = c.pwrite(MARK_AT, b"\x00" * 4096, flags=n.CMD_FLAG_FUA | 0x4000)
        assert r.error == n.EINVAL
        still_serves(c)
    after_each(daemon)


def test_disc_finishes_pipelined_writes(daemon: CdpDaemon, env: Env) -> None:
    """T6: NBD_CMD_DISC after pipelined writes: every write is applied, no reply to DISC."""
    off = 3 << 20
    with RawNbd(env.sock) as c:
        c.handshake()
        c.go(env.name)
        frames = b""
        for i in range(8):
            flags = n.CMD_FLAG_FUA if i % 3 == 0 else 0
            frames += c.submit(
                n.CMD_WRITE, off + i * 4096, payload=bytes([i + 1]) * 4096, flags=flags, send=False
            )[1]
        frames += n.request(n.CMD_DISC, 999, 0, 0)
        c.send(frames)
        for _ in range(8):
            assert c.reply().error == 0
        assert c.closed_by_server(), "the server did not close after DISC"
    with connect(env) as c:
        for i in range(8):
            assert c.pread(off + i * 4096, 4096).data == bytes([i + 1]) * 4096
    after_each(daemon)


# ---------------------------------------------------------------------- transmission: disconnects


def _bad_magic(c: RawNbd, e: Env) -> None:
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, n.CMD_READ, 1, 0, 512))


def _write_2_31(c: RawNbd, e: Env) -> None:
    c.send(n.request(n.CMD_WRITE, 1, 0, 2**31) + b"\xaa" * 65536)


def _write_over_max(c: RawNbd, e: Env) -> None:
    c.send(n.request(n.CMD_WRITE, 1, 0, (32 << 20) + 1) + b"\xaa" * 4096)


def _option_after_go(c: RawNbd, e: Env) -> None:
    c.send(n.option(n.OPT_LIST) + n.option(n.OPT_ABORT))  # >= one 28-byte request header


def _disc_with_length(c: RawNbd, e: Env) -> None:
    c.send(n.request(n.CMD_DISC, 1, 0, 4096))


DISCONNECT_CASES: dict[str, Callable[[RawNbd, Env], None]] = {
    "bad request magic": _bad_magic,
    "write length 2^31": _write_2_31,
    "write length 32 MiB + 1": _write_over_max,
    "option after GO": _option_after_go,
    "DISC with non-zero length": _disc_with_length,
}


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("case", list(DISCONNECT_CASES))
def test_framing_violation_disconnects(
    daemon: CdpDaemon, env: Env, case: str, structured: bool
) -> None:
    seq = daemon.last_seq(NAME)
    with connect(env, structured=structured) as c:
        DISCONNECT_CASES[case](c, env)
        assert c.closed_by_server(), f"{case}: the server kept the connection"
    assert daemon.last_seq(NAME) == seq, f"{case} journaled something"
    after_each(daemon)


@pytest.mark.parametrize("sent", [0, 1, 2047, 4095])
def test_truncated_write_journals_nothing(daemon: CdpDaemon, env: Env, sent: int) -> None:
    """A write whose payload never fully arrives is neither applied nor journaled."""
    seq = daemon.last_seq(NAME)
    with connect(env) as c:
        c.send(n.request(n.CMD_WRITE, 7, MARK_AT, 4096) + b"\x01" * sent)
    with connect(env) as c:
        still_serves(c)
    assert daemon.last_seq(NAME) == seq
    after_each(daemon)


# ---------------------------------------------------------------------- handshake


def test_unknown_client_flags_disconnect(daemon: CdpDaemon, env: Env) -> None:
    c = RawNbd(env.sock)
    with c:
        c.greeting()
        c.client_flags(n.CLIENT_FIXED_NEWSTYLE | 0x40)
        assert c.closed_by_server()
    after_each(daemon)


def test_client_without_fixed_newstyle_disconnects(daemon: CdpDaemon, env: Env) -> None:
    with RawNbd(env.sock) as c:
        c.greeting()
        c.client_flags(0)
        assert c.closed_by_server()
    after_each(daemon)


def test_greeting_is_fixed_newstyle_with_no_zeroes(daemon: CdpDaemon, env: Env) -> None:
    with RawNbd(env.sock) as c:
        flags = c.greeting()
        assert flags & n.FLAG_FIXED_NEWSTYLE
        assert flags & ~(n.FLAG_FIXED_NEWSTYLE | n.FLAG_NO_ZEROES) == 0


@pytest.mark.parametrize("size", [65536, 0])
def test_unknown_option_gets_unsup_and_next_option_parses(
    daemon: CdpDaemon, env: Env, size: int
) -> None:
    """H2: unknown option 0xffff (with a 64 KiB payload): ERR_UNSUP, payload skipped."""
    with hello(env) as c:
        c.send(n.option(0xFFFF, b"\x42" * size))
        r = c.option_reply(0xFFFF)
        assert r.type == n.REP_ERR_UNSUP
        c.send(n.option(n.OPT_LIST))
        replies = c.option_replies(n.OPT_LIST)
        names = [x.data[4:].decode() for x in replies if x.type == n.REP_SERVER]
        assert env.name in names
        assert c.go(env.name)[-1].type == n.REP_ACK
        still_serves(c)
    after_each(daemon)


@pytest.mark.parametrize("length", [65537, 2**32 - 1])
def test_abusive_option_length_disconnects(daemon: CdpDaemon, env: Env, length: int) -> None:
    with hello(env) as c:
        c.send(struct.pack(">QII", n.IHAVEOPT, 0xFFFF, length) + b"\0" * 1024)
        assert c.closed_by_server()
    after_each(daemon)


def test_bad_option_magic_disconnects(daemon: CdpDaemon, env: Env) -> None:
    with hello(env) as c:
        c.send(struct.pack(">QII", 0x1122334455667788, n.OPT_LIST, 0))
        assert c.closed_by_server()
    after_each(daemon)


GO_ERRORS = {
    "name of 4097 bytes": (n.go_payload("x" * 4097), {n.REP_ERR_INVALID, n.REP_ERR_UNKNOWN}),
    "unknown name of 4096 bytes": (n.go_payload("y" * 4096), {n.REP_ERR_UNKNOWN}),
    "unknown export": (n.go_payload("nope"), {n.REP_ERR_UNKNOWN}),
    "trailing data": (n.go_payload(NAME) + b"\0", {n.REP_ERR_INVALID}),
    "info count too large": (n.go_payload(NAME)[:-2] + b"\0\x05", {n.REP_ERR_INVALID}),
    "name length past payload": (struct.pack(">I", 100) + b"abc\0\0", {n.REP_ERR_INVALID}),
    "payload too short": (b"\0\0", {n.REP_ERR_INVALID}),
    "empty payload": (b"", {n.REP_ERR_INVALID}),
    "name not UTF-8": (n.go_payload(b"\xff\xfe"), {n.REP_ERR_INVALID, n.REP_ERR_UNKNOWN}),
    "name with NUL": (n.go_payload(b"neg\x000"), {n.REP_ERR_INVALID, n.REP_ERR_UNKNOWN}),
}


@pytest.mark.parametrize("opt", [n.OPT_GO, n.OPT_INFO], ids=["GO", "INFO"])
@pytest.mark.parametrize("case", list(GO_ERRORS))
def test_go_and_info_errors(daemon: CdpDaemon, env: Env, case: str, opt: int) -> None:
    payload, allowed = GO_ERRORS[case]
    with hello(env) as c:
        c.send(n.option(opt, payload))
        r = c.option_reply(opt)
        assert r.type in allowed, f"{case}: reply {r.type:#x}"
        assert len(r.data) <= 4096
        # the negotiation goes on: a correct GO now works
        assert c.go(env.name)[-1].type == n.REP_ACK
        still_serves(c)
    after_each(daemon)


@pytest.mark.parametrize(
    "name", [b"nope", b"x" * 4097, b"\xff\xfe", b""], ids=["unknown", "4097", "utf8", "empty"]
)
def test_export_name_unknown_disconnects(daemon: CdpDaemon, env: Env, name: bytes) -> None:
    """H6: NBD_OPT_EXPORT_NAME has no error reply, so an unknown export ends the session."""
    with hello(env) as c:
        c.send(n.option(n.OPT_EXPORT_NAME, name))
        assert c.closed_by_server()
    after_each(daemon)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_known(daemon: CdpDaemon, env: Env, no_zeroes: bool) -> None:
    """H6: the reply is size + flags (+ 124 zero bytes unless NO_ZEROES was agreed)."""
    flags = n.CLIENT_FIXED_NEWSTYLE | (n.CLIENT_NO_ZEROES if no_zeroes else 0)
    with hello(env, flags) as c:
        c.export_name(env.name)  # reads the 124 zero bytes when not no_zeroes
        assert c.size == env.size
        assert c.tflags & n.TF_HAS_FLAGS
        still_serves(c)  # so the padding length was right
    after_each(daemon)


def test_info_then_go_agree_and_no_padding_after_go(daemon: CdpDaemon, env: Env) -> None:
    """H7: INFO and GO with the same parameters give the same information; H13 block sizes."""
    with hello(env) as c:
        info = c.go(env.name, (n.INFO_BLOCK_SIZE, n.INFO_NAME), opt=n.OPT_INFO)
        go = c.go(env.name, (n.INFO_BLOCK_SIZE, n.INFO_NAME))
        assert [(r.type, r.data) for r in info] == [(r.type, r.data) for r in go]
        assert c.size == env.size
        tf = c.tflags
        assert tf & n.TF_HAS_FLAGS and tf & n.TF_SEND_FLUSH and tf & n.TF_SEND_FUA
        assert tf & n.TF_SEND_TRIM and tf & n.TF_SEND_WRITE_ZEROES
        assert not tf & (n.TF_CAN_MULTI_CONN | n.TF_READ_ONLY | n.TF_SEND_CACHE)
        assert not tf & n.TF_SEND_FAST_ZERO
        blocks = [r.data for r in go if r.type == n.REP_INFO and r.data[:2] == b"\0\3"]
        assert len(blocks) == 1
        mn, pref, mx = struct.unpack(">III", blocks[0][2:])
        assert mn & (mn - 1) == 0 and mn <= 65536
        assert pref & (pref - 1) == 0 and pref >= max(mn, 512) and mx >= pref
        still_serves(c)  # nothing was sent after the final ACK
    after_each(daemon)


def test_option_errors_keep_negotiating(daemon: CdpDaemon, env: Env) -> None:
    """H8/H9 and friends: each refused option gets an error and negotiation continues."""
    with hello(env) as c:
        c.send(n.option(n.OPT_STRUCTURED_REPLY, b"x"))
        assert c.option_reply(n.OPT_STRUCTURED_REPLY).type == n.REP_ERR_INVALID
        c.send(n.option(n.OPT_SET_META_CONTEXT, n.meta_payload(env.name, ("base:allocation",))))
        assert c.option_reply(n.OPT_SET_META_CONTEXT).type == n.REP_ERR_INVALID
        c.send(n.option(n.OPT_LIST, b"junk"))
        assert c.option_reply(n.OPT_LIST).type == n.REP_ERR_INVALID
        c.send(n.option(n.OPT_STARTTLS))
        assert c.option_reply(n.OPT_STARTTLS).is_error  # TLS is not configured
        c.negotiate_structured()
        # meta context: bad payload, unknown export, unknown namespace (ignored: no context)
        c.send(n.option(n.OPT_SET_META_CONTEXT, b"\0\0\0\x09neg"))
        assert c.option_reply(n.OPT_SET_META_CONTEXT).type == n.REP_ERR_INVALID
        c.send(n.option(n.OPT_SET_META_CONTEXT, n.meta_payload("nope", ("base:allocation",))))
        assert c.option_reply(n.OPT_SET_META_CONTEXT).is_error
        assert c.set_meta_context(env.name, ("qemu:nothing", "x-unknown:y")) == {}
        assert c.go(env.name)[-1].type == n.REP_ACK
        # no context was selected, so BLOCK_STATUS is refused
        assert c.call(n.CMD_BLOCK_STATUS, 0, 4096).error == n.EINVAL
        still_serves(c)
    after_each(daemon)


def test_list_and_abort(daemon: CdpDaemon, env: Env) -> None:
    with hello(env) as c:
        c.send(n.option(n.OPT_LIST))
        replies = c.option_replies(n.OPT_LIST)
        assert [r.data[4:].decode() for r in replies if r.type == n.REP_SERVER] == [env.name]
        c.send(n.option(n.OPT_ABORT))
        r = c.option_reply(n.OPT_ABORT)
        assert r.type == n.REP_ACK
        assert c.closed_by_server()
    after_each(daemon)


@pytest.mark.parametrize("cut", [1, 10, 18, 20, 25, 30])
def test_client_vanishes_mid_handshake(daemon: CdpDaemon, env: Env, cut: int) -> None:
    """Flags + GO, cut after ``cut`` bytes: the server just drops the connection."""
    frames = struct.pack(">I", 3) + n.option(n.OPT_GO, n.go_payload(env.name))
    with RawNbd(env.sock) as c:
        c.greeting()
        c.send(frames[:cut])
    after_each(daemon)


def test_rss_bounded(daemon: CdpDaemon) -> None:
    """B2: the daemon's RSS grows by less than 16 MiB over the whole suite (runs last)."""
    assert daemon.proc is not None
    grown = _rss_kib(daemon.proc.pid) - daemon.rss_start_kib  # type: ignore[attr-defined]
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB"


# ---------------------------------------------------------------------- reference oracle

NBDKIT_ADVERTISES = {  # nbdkit memory supports these, so it accepts them; we do not
    "CACHE not advertised",
    "write_zeroes with FAST_ZERO (not advertised)",
}


@pytest.fixture(scope="module")
def nbdkit_memory() -> Iterator[str]:
    need_tools("nbdkit")
    folder = tempfile.mkdtemp(prefix="cdpnbd-", dir="/tmp")
    sock = f"{folder}/nbdkit.sock"
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--unix", sock, "--exit-with-parent", "memory", str(SIZE)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < end, "nbdkit did not start"
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("case", sorted(set(ERROR_CASES) - NBDKIT_ADVERTISES))
def test_error_table_matches_nbdkit(nbdkit_memory: str, case: str, structured: bool) -> None:
    """B2's reference oracle: nbdkit memory gives the error value we expect of ours."""
    send, want = ERROR_CASES[case]
    env = Env(nbdkit_memory, NAME, SIZE)  # nbdkit serves any export name
    with RawNbd.connect_export(nbdkit_memory, NAME, structured=structured) as c:
        assert send(c, env).error == want
