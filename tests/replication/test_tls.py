"""Replication over TLS, with mutual TLS as the sender's credential (openssl-made certs)."""

from __future__ import annotations

import asyncio
import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from journal import Journal
from replicator.receiver import Receiver, TokenFile
from replicator.sender import Sender, Target

from .conftest import SMALL, TOKEN, random_writes, running, same_at, until

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(root: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=root,
    )  # fmt: skip


def _leaf(root: Path, ca: str, name: str, usage: str, san: str) -> None:
    (root / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
        "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=root,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=root,
    )  # fmt: skip


@dataclass
class Tls:
    root: Path
    url: str
    receiver: Receiver

    def client(self, cert: str | None, *, ca: str = "ca") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root / f"{ca}.pem"))
        if cert:
            ctx.load_cert_chain(str(self.root / f"{cert}.pem"), str(self.root / f"{cert}-key.pem"))
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/bootstrap installs it)")
    root = tmp_path_factory.mktemp("certs")
    _ca(root, "ca")
    _ca(root, "other-ca")
    _leaf(root, "ca", "receiver", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    _leaf(root, "ca", "primary1", "clientAuth", "DNS:primary1")
    _leaf(root, "ca", "intruder", "clientAuth", "DNS:intruder")
    _leaf(root, "other-ca", "forged", "clientAuth", "DNS:primary1")
    return root


@pytest.fixture
async def tls(certs: Path, tmp_path: Path) -> AsyncIterator[Tls]:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    rcv = Receiver(
        str(tmp_path / "dr"),
        TokenFile(str(tokens)),
        journal_options=SMALL,
        mtls=True,
        client_names=("primary1",),
    )
    await asyncio.to_thread(rcv.open)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certs / "receiver.pem"), str(certs / "receiver-key.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(certs / "ca.pem"))
    runner = web.AppRunner(rcv.make_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Tls(certs, f"https://127.0.0.1:{port}", rcv)
    finally:
        await runner.cleanup()
        await asyncio.to_thread(rcv.close)


async def _ship(tls: Tls, primary: Journal, ctx: ssl.SSLContext, url: str | None = None) -> Sender:
    s = Sender(
        Target("dr1", url or tls.url, TOKEN, ssl=ctx, request_timeout_s=5), "g1", lambda: primary
    )
    async with running(s):
        await until(lambda: s.state != "starting", "a first attempt")
        await asyncio.sleep(0.5)
    return s


async def test_mutual_tls_replicates(tls: Tls, primary: Journal) -> None:
    await asyncio.to_thread(random_writes, primary, random.Random(2), 60)
    s = Sender(
        Target("dr1", tls.url, TOKEN, ssl=tls.client("primary1"), request_timeout_s=5),
        "g1",
        lambda: primary,
    )
    async with running(s):
        await until(lambda: s.acked_seq >= primary.window().last_seq, "replicated over TLS")
    await asyncio.to_thread(same_at, primary, tls.receiver.groups["g1"].journal, s.acked_seq)


@pytest.mark.parametrize(
    ("cert", "ca", "why"),
    [
        (None, "ca", "no client certificate"),
        ("forged", "ca", "a client certificate from another CA"),
        ("intruder", "ca", "a client certificate not on the allow-list"),
        ("primary1", "other-ca", "a receiver certificate the sender does not trust"),
    ],
)
async def test_refused_without_the_right_certificates(
    tls: Tls, primary: Journal, cert: str | None, ca: str, why: str
) -> None:
    primary.write("vm1-disk0", 0, b"secret" * 1000)
    s = await _ship(tls, primary, tls.client(cert, ca=ca))
    assert s.acked_seq == 0, why
    assert s.state in ("disconnected", "refused"), (why, s.state, s.detail)
    g = tls.receiver.groups.get("g1")
    assert g is None or g.durable_seq == 0, why


async def test_plain_http_to_the_tls_port_is_refused(tls: Tls, primary: Journal) -> None:
    primary.write("vm1-disk0", 0, b"x" * 4096)
    s = Sender(
        Target("dr1", tls.url.replace("https", "http"), TOKEN, request_timeout_s=3),
        "g1",
        lambda: primary,
    )
    async with running(s):
        await asyncio.sleep(1.0)
    assert s.acked_seq == 0 and s.state == "disconnected"
    assert "g1" not in tls.receiver.groups or tls.receiver.groups["g1"].durable_seq == 0
