"""NBD over TCP with TLS (``NBD_OPT_STARTTLS``): real clients, downgrade and injection attempts.

One daemon per event loop (uvloop and asyncio: their transports differ) serves two TCP
exports with a throwaway CA's server certificate: ``forced`` (``tls = "require"``, the spec's
FORCEDTLS) and ``optional`` (``tls = "allow"``). Checked:

- qemu-io with ``tls-creds-x509`` writes and reads back; the journal equals the image;
  ``nbdinfo nbds://...?tls-certificates=DIR`` lists the export (skipped when libnbd refuses
  local files in URIs);
- a plaintext qemu-io is refused by the forced export and the daemon keeps serving;
- raw frames: STARTTLS with data gets ``NBD_REP_ERR_INVALID``, GO before TLS gets
  ``NBD_REP_ERR_TLS_REQD``, EXPORT_NAME before TLS disconnects, plaintext pipelined after
  STARTTLS disconnects (CVE-2021-3716), and structured replies / meta contexts negotiated
  before STARTTLS are forgotten after it (a READ gets a simple reply).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbdraw as raw
import pytest
from conftest import CdpDaemon, Volume, need_tools, qemu_io, run, running_daemon

HOST = "127.0.0.1"


@dataclass
class TlsSetup:
    daemon: CdpDaemon
    ca_dir: Path  # holds ca-cert.pem, the layout qemu's and libnbd's X.509 clients expect
    ports: dict[str, int]

    def addr(self, name: str) -> tuple[str, int]:
        return HOST, self.ports[name]

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_dir / "ca-cert.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(root: Path) -> tuple[Path, Path, Path]:
    """A CA (``ca/ca-cert.pem``) and a server certificate for 127.0.0.1 signed by it."""
    ca = root / "ca"
    ca.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca-key.pem", "-out", "ca/ca-cert.pem", "-subj", "/CN=cdp test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=root,
    )  # fmt: skip
    (root / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=root,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca/ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server-cert.pem",
        cwd=root,
    )  # fmt: skip
    return ca, root / "server-cert.pem", root / "server-key.pem"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def tls_setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsSetup]:
    need_tools("openssl", "qemu-io")
    root = tmp_path_factory.mktemp(f"tls-{request.param}")
    ca, cert, key = make_certs(root)
    ports = {"forced": free_port(), "optional": free_port()}
    vols = [
        Volume("forced", listen=f"{HOST}:{ports['forced']}", tls_cert=cert, tls_key=key),
        Volume(
            "optional",
            listen=f"{HOST}:{ports['optional']}",
            tls_cert=cert,
            tls_key=key,
            tls="allow",
        ),
    ]
    with running_daemon(root, vols, event_loop=request.param) as d:
        yield TlsSetup(d, ca, ports)
        d.assert_running()
        d.assert_log_clean()


def qemu_io_tls(
    setup: TlsSetup, name: str, *cmds: str, tls: bool = True
) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io"]
    opts = (
        f"driver=nbd,server.type=inet,server.host={HOST},server.port={setup.ports[name]},"
        f"export={name}"
    )
    if tls:
        args += ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={setup.ca_dir}"]
        opts += ",tls-creds=tls0"
    for c in cmds:
        args += ["-c", c]
    args += ["--image-opts", opts]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------------- real clients
def test_qemu_io_over_tls(tls_setup: TlsSetup) -> None:
    p = qemu_io_tls(tls_setup, "forced", "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "fail" not in out.lower(), out
    tls_setup.daemon.assert_journal_matches_image("forced")
    assert "nbd client switched to TLS" in tls_setup.daemon.log()


def test_nbdinfo_over_tls(tls_setup: TlsSetup) -> None:
    need_tools("nbdinfo")
    port = tls_setup.ports["forced"]
    uri = f"nbds://{HOST}:{port}/forced?tls-certificates={tls_setup.ca_dir}"
    out = run(["nbdinfo", "--json", uri], check=False, timeout=30)
    if "local file access" in out or "not allowed" in out:
        pytest.skip(f"this nbdinfo does not allow tls-certificates in a URI: {out.strip()}")
    assert '"export-size": 33554432' in out, out


def test_plaintext_client_refused(tls_setup: TlsSetup) -> None:
    p = qemu_io_tls(tls_setup, "forced", "read 0 4k", tls=False)
    assert p.returncode != 0, p.stdout + p.stderr
    tls_setup.daemon.assert_running()
    # "allow" serves plaintext; the forced export still serves TLS clients
    qemu_io(f"nbd://{HOST}:{tls_setup.ports['optional']}/optional", "write -P 0x11 0 4k")
    p = qemu_io_tls(tls_setup, "forced", "read -P 0x5a 0 4k")
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------------- raw frames
def starttls(c: raw.RawNbd, setup: TlsSetup) -> None:
    c.send(raw.option(raw.OPT_STARTTLS))
    r = c.option_reply(raw.OPT_STARTTLS)
    assert r.type == raw.REP_ACK, r
    assert not c._rbuf, "server sent bytes after the STARTTLS ACK"
    c.sock = setup.client_context().wrap_socket(c.sock, server_hostname=HOST)
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_starttls_with_data_is_invalid(tls_setup: TlsSetup) -> None:
    with raw.RawNbd(tls_setup.addr("forced")) as c:
        c.handshake()
        c.send(raw.option(raw.OPT_STARTTLS, b"x"))
        assert c.option_reply(raw.OPT_STARTTLS).type == raw.REP_ERR_INVALID
        starttls(c, tls_setup)  # the connection is still usable
        assert c.go("forced")[-1].type == raw.REP_ACK


def test_forced_tls_refuses_options_before_starttls(tls_setup: TlsSetup) -> None:
    with raw.RawNbd(tls_setup.addr("forced")) as c:
        c.handshake()
        for opt, data in (
            (raw.OPT_GO, raw.go_payload("forced")),
            (raw.OPT_INFO, raw.go_payload("forced")),
            (raw.OPT_LIST, b""),
            (raw.OPT_STRUCTURED_REPLY, b""),
        ):
            c.send(raw.option(opt, data))
            assert c.option_reply(opt).type == raw.REP_ERR_TLS_REQD
        c.send(raw.option(raw.OPT_EXPORT_NAME, b"forced"))
        assert c.closed_by_server()
    tls_setup.daemon.assert_running()


def test_plaintext_pipelined_after_starttls_disconnects(tls_setup: TlsSetup) -> None:
    with raw.RawNbd(tls_setup.addr("optional")) as c:
        c.handshake()
        c.send(raw.option(raw.OPT_STARTTLS) + raw.option(raw.OPT_STRUCTURED_REPLY))
        data = c.drain(limit=5)
        # at most the ACK, never an answer to the injected option, then the close
        assert len(data) <= 20, data
        assert c.closed_by_server()


def test_negotiation_state_reset_by_starttls(tls_setup: TlsSetup) -> None:
    with raw.RawNbd(tls_setup.addr("optional")) as c:
        c.handshake()
        c.negotiate_structured()
        assert c.set_meta_context("optional", ("base:allocation",))
        starttls(c, tls_setup)
        c.structured = False  # a structured reply from here on is a violation
        c.send(raw.option(raw.OPT_STARTTLS))  # already in TLS
        assert c.option_reply(raw.OPT_STARTTLS).type == raw.REP_ERR_INVALID
        replies = c.go("optional")
        assert replies[-1].type == raw.REP_ACK, replies
        assert not c.tflags & raw.TF_SEND_DF  # DF is only offered with structured replies
        c.submit(raw.CMD_READ, 0, 4096)
        r = c.reply()
        assert not r.structured and r.error == 0
        assert r.data == b"\x11" * 4096
        c.submit(raw.CMD_BLOCK_STATUS, 0, 4096)  # the meta context went with the plaintext
        r = c.reply()
        assert r.error == raw.EINVAL
        c.submit(raw.CMD_WRITE, 8192, payload=b"\x22" * 4096, flags=raw.CMD_FLAG_FUA)
        assert c.reply().error == 0
        c.submit(raw.CMD_DISC)
    tls_setup.daemon.assert_journal_matches_image("optional")


def test_starttls_without_tls_configured_is_policy(tmp_path: Path) -> None:
    port = free_port()
    with running_daemon(tmp_path, [Volume("plain", listen=f"{HOST}:{port}")]) as d:
        with raw.RawNbd((HOST, port)) as c:
            c.handshake()
            c.send(raw.option(raw.OPT_STARTTLS))
            assert c.option_reply(raw.OPT_STARTTLS).type == raw.REP_ERR_POLICY
            assert c.go("plain")[-1].type == raw.REP_ACK
        d.assert_running()
