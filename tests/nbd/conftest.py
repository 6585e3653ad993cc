"""Fixtures for the NBD splitter tests: the real ``cdp daemon`` as a subprocess.

:class:`CdpDaemon` writes a config with ``source = "nbd"`` volumes (images under a pytest
tmp folder, sockets under a short ``/tmp`` folder: unix socket paths are limited to 107
bytes), starts ``python -m cdp daemon``, and waits until the API answers and every volume is
onboarded. Its checks are the ones every test repeats:

- :meth:`CdpDaemon.assert_journal_matches_image`: the journal's reconstruction of the latest
  point (``GET /v1/volumes/NAME/image?seq=<group window.last_seq>``) equals the image file,
  byte for byte;
- :meth:`CdpDaemon.assert_export_matches_image`: ``qemu-img compare`` of the image file
  against the export;
- :meth:`CdpDaemon.assert_healthy`: the process runs, status answers, and a fresh qemu-io
  connection writes and reads back a pattern.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DEADLINE_S = 60.0
CHUNK = 1 << 20


def need_tools(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (deploy/packages.txt; scripts/bootstrap)")


def run(cmd: list[str], *, timeout: float = DEADLINE_S, check: bool = True) -> str:
    """Run a client tool; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def qemu_io(target: str | Path, *cmds: str, writeback: bool = False) -> str:
    """``qemu-io -f raw [-t writeback] -c CMD... TARGET`` (a URI or an image file); every
    command must succeed (pattern checks included)."""
    args = ["qemu-io", "-f", "raw", *(["-t", "writeback"] if writeback else [])]
    for c in cmds:
        args += ["-c", c]
    out = run([*args, str(target)])
    assert "fail" not in out.lower(), out
    return out


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


@dataclass
class Volume:
    name: str
    size: int = 32 << 20
    group: str | None = None
    listen: str | None = None  # config address: "unix:PATH" (default <short>/<name>.sock) or H:P
    image: Path | None = None  # default: <root>/<name>.raw (created sparse by the daemon)
    tls_cert: Path | None = None  # NBD TLS (TCP listen only): server certificate chain
    tls_key: Path | None = None
    tls: str | None = None  # "require" | "allow" (config default: "require")


def accepts(address: str) -> bool:
    """A connection to a config address ("unix:PATH" or "HOST:PORT") succeeds."""
    if address.startswith("unix:"):
        fam, target = socket.AF_UNIX, address[5:]
    else:
        host, port = address.rsplit(":", 1)
        fam, target = socket.AF_INET, (host, int(port))  # type: ignore[assignment]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(target)
        except OSError:
            return False
    return True


class CdpDaemon:
    def __init__(
        self,
        root: Path,
        short: Path,
        volumes: list[Volume],
        *,
        event_loop: str = "uvloop",
        fsize_limit: int | None = None,
    ) -> None:
        self.root = root
        self.short = short
        self.volumes = {v.name: v for v in volumes}
        for v in volumes:
            if v.image is None:
                v.image = root / f"{v.name}.raw"
            if v.listen is None:
                v.listen = f"unix:{short / v.name}.sock"
        self.api = str(short / "api.sock")
        self.config = root / "cdp.toml"
        self.log_path = root / "daemon.log"
        self.event_loop = event_loop
        self.fsize_limit = fsize_limit  # RLIMIT_FSIZE of the daemon: writes past it fail
        self.proc: subprocess.Popen[bytes] | None = None
        self._wait_onboarded = True
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            "[daemon]",
            f'state_dir = "{self.root / "state"}"',
            f'api = "unix:{self.api}"',
            'log_level = "info"',
            f'event_loop = "{self.event_loop}"',
            "",
        ]
        for v in self.volumes.values():
            lines += [
                "[[volume]]",
                f'name = "{v.name}"',
                f"size = {v.size}",
                'source = "nbd"',
                f'image = "{v.image}"',
                f'listen = "{v.listen}"',
            ]
            if v.group:
                lines.append(f'group = "{v.group}"')
            if v.tls_cert is not None:
                lines.append(f'tls_cert = "{v.tls_cert}"')
            if v.tls_key is not None:
                lines.append(f'tls_key = "{v.tls_key}"')
            if v.tls is not None:
                lines.append(f'tls = "{v.tls}"')
            lines.append("")
        self.config.write_text("\n".join(lines))

    # ------------------------------------------------------------------ process
    def start(self, *, wait_onboarded: bool = True) -> CdpDaemon:
        """Start and wait until the API answers and every export accepts (and, with
        ``wait_onboarded``, every volume is onboarded)."""
        self._wait_onboarded = wait_onboarded
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp", "daemon", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "CDP_CONFIG": ""},
                preexec_fn=self._limits if self.fsize_limit else None,
            )
        self.wait_for(self._ready, "the daemon to serve and onboard every volume")
        return self

    def _limits(self) -> None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG (or is short)
        assert self.fsize_limit is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, self.fsize_limit))

    def _ready(self) -> bool:
        self.assert_running()
        try:
            st = self.status()
        except OSError:
            return False
        vols = {v["name"]: v for v in st["volumes"]}
        for v in self.volumes.values():
            state = vols.get(v.name, {}).get("onboarding", {}).get("state")
            if self._wait_onboarded and state != "done":
                return False
            assert v.listen is not None
            if not accepts(v.listen):
                return False
        return True

    def wait_for(self, check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
        end = time.monotonic() + deadline_s
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_running(self) -> None:
        if not self.running():
            rc = self.proc.returncode if self.proc else None
            raise AssertionError(f"the daemon is not running (exit {rc})\n{self.log_tail()}")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the daemon ignored SIGTERM\n{self.log_tail()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log().splitlines()
        except OSError:
            return "(no daemon log)"
        return "daemon log (tail):\n" + "\n".join(lines[-n:])

    def assert_log_clean(self) -> None:
        """No unhandled exception: the server logs one as "nbd connection failed" + traceback."""
        text = self.log()
        for bad in ("Traceback", "nbd connection failed", "request crashed"):
            assert bad not in text, f"{bad!r} in the daemon log:\n{text[-6000:]}"

    # ------------------------------------------------------------------ API
    def http(self, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        c = _UnixHTTP(self.api, timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def status(self) -> dict[str, Any]:
        code, _, body = self.http("/v1/status")
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def volume_status(self, name: str) -> dict[str, Any]:
        vols: list[dict[str, Any]] = self.status()["volumes"]
        return next(v for v in vols if v["name"] == name)

    def last_seq(self, name: str) -> int:
        st = self.status()
        group = next(v for v in st["volumes"] if v["name"] == name)["group"]
        return int(next(g for g in st["groups"] if g["name"] == group)["window"]["last_seq"])

    @contextlib.contextmanager
    def journal_image(self, name: str, seq: int | None = None) -> Iterator[Any]:
        """The HTTP response streaming the journal's image of ``name`` at ``seq`` (latest)."""
        if seq is None:
            seq = self.last_seq(name)
        c = _UnixHTTP(self.api, 60)
        try:
            c.request("GET", f"/v1/volumes/{name}/image?seq={seq}")
            r = c.getresponse()
            if r.status != 200:
                raise AssertionError(f"image of {name} at {seq}: {r.status} {r.read()[:500]!r}")
            assert r.getheader("X-Cdp-Seq") == str(seq)
            yield r
        finally:
            c.close()

    def save_journal_image(self, name: str, out: Path, seq: int | None = None) -> None:
        with self.journal_image(name, seq) as r, open(out, "wb") as f:
            while chunk := r.read(CHUNK):
                f.write(chunk)

    def assert_journal_matches_image(self, name: str) -> int:
        """The journal's latest point equals the image file, byte for byte; returns the seq."""
        v = self.volumes[name]
        assert v.image is not None
        seq = self.last_seq(name)
        with self.journal_image(name, seq) as r, open(v.image, "rb") as img:
            assert int(r.getheader("Content-Length")) == v.size
            off = 0
            while True:
                want = img.read(CHUNK)
                got = r.read(CHUNK)
                if want != got:
                    n = min(len(want), len(got))
                    first = next((i for i in range(n) if want[i] != got[i]), n)
                    raise AssertionError(
                        f"{name}: journal at seq {seq} differs from the image at byte "
                        f"{off + first} (image {want[first : first + 16].hex()}, "
                        f"journal {got[first : first + 16].hex()})"
                    )
                if not want:
                    break
                off += len(want)
            assert off == v.size, f"image is {off} bytes, volume {v.size}"
        return seq

    def uri(self, name: str) -> str:
        listen = self.volumes[name].listen
        assert listen is not None
        if listen.startswith("unix:"):
            return f"nbd+unix:///{name}?socket={listen[5:]}"
        return f"nbd://{listen}/{name}"

    def sock(self, name: str) -> str:
        """The unix socket path of a volume's export."""
        listen = self.volumes[name].listen
        assert listen is not None and listen.startswith("unix:"), listen
        return listen[5:]

    def assert_export_matches_image(self, name: str) -> None:
        v = self.volumes[name]
        out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(v.image), self.uri(name)])
        assert "Images are identical" in out, out

    def assert_consistent(self, name: str) -> None:
        self.assert_journal_matches_image(name)
        self.assert_export_matches_image(name)

    def assert_healthy(self, name: str, *, offset: int = 0, pattern: int = 0xA5) -> None:
        """Alive, status answers, and a fresh well-behaved client writes and reads back."""
        self.assert_running()
        self.status()
        out = run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                f"write -P {pattern:#x} {offset} 4k",
                "-c",
                f"read -P {pattern:#x} {offset} 4k",
                self.uri(name),
            ]
        )
        assert "failed" not in out.lower(), out


@contextlib.contextmanager
def running_daemon(
    root: Path, volumes: list[Volume], *, wait_onboarded: bool = True, **kw: Any
) -> Iterator[CdpDaemon]:
    """A started daemon with its sockets in a fresh short /tmp folder; stopped afterwards."""
    short = Path(tempfile.mkdtemp(prefix="cdpnbd-", dir="/tmp"))
    d = CdpDaemon(root, short, volumes, **kw)
    try:
        d.start(wait_onboarded=wait_onboarded)
        yield d
    finally:
        try:
            if d.running():
                d.stop()
        finally:
            d.kill()
            shutil.rmtree(short, ignore_errors=True)
