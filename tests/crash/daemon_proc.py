"""Run the real daemon as a subprocess for crash tests (kill -9, restart)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DaemonProc:
    config: Path
    sock_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return str(self.sock_dir / "api.sock")

    def nbd(self, volume: str = "disk0") -> str:
        return str(self.sock_dir / f"{volume}.sock")

    def start(self, *, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp", "daemon", "--config", str(self.config)],
                stdout=logf,
                stderr=logf,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                st = self.status()
            except OSError:
                time.sleep(0.05)
                continue
            if all(v["onboarding"]["state"] == "done" for v in st["volumes"]):
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready:\n{self.log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def _http(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(self.api)
        req = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
        )
        s.sendall(req.encode() + body)
        chunks = []
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            chunks.append(b)
        s.close()
        raw = b"".join(chunks)
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        if b"transfer-encoding: chunked" in head.lower():
            out = bytearray()
            while rest:
                line, _, rest = rest.partition(b"\r\n")
                n = int(line, 16)
                if n == 0:
                    break
                out += rest[:n]
                rest = rest[n + 2 :]
            rest = bytes(out)
        return status, rest

    def status(self) -> dict:  # type: ignore[type-arg]
        code, body = self._http("GET", "/v1/status")
        if code != 200:
            raise OSError(f"status {code}")
        return json.loads(body)  # type: ignore[no-any-return]

    def journal_image(self, volume: str = "disk0", *, recovered: bool = False) -> bytes:
        """The journal's reconstruction of a point, through the daemon API.

        ``recovered``: the last record that survived the crash, before the restart's
        onboarding scan journaled any difference it found between the image and the journal.
        """
        st = self.status()
        group = next(v["group"] for v in st["volumes"] if v["name"] == volume)
        g = next(g for g in st["groups"] if g["name"] == group)
        seq = g["recovery"]["last_seq"] if recovered else g["window"]["last_seq"]
        code, body = self._http("GET", f"/v1/volumes/{urllib.parse.quote(volume)}/image?seq={seq}")
        assert code == 200, body[:200]
        return body


def make_daemon(tmp: Path, size: str = "16MiB", image: Path | None = None) -> DaemonProc:
    sock_dir = Path(tempfile.mkdtemp(prefix="cdp-", dir="/tmp"))
    img = image or tmp / "disk0.raw"
    cfg = tmp / "cdp.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp / "state"}"\napi = "unix:{sock_dir / "api.sock"}"\n'
        f'log_format = "json"\n\n'
        f'[[volume]]\nname = "disk0"\nsize = "{size}"\nsource = "nbd"\n'
        f'image = "{img}"\nlisten = "unix:{sock_dir / "disk0.sock"}"\n'
    )
    os.makedirs(tmp / "state", exist_ok=True)
    return DaemonProc(cfg, sock_dir, tmp / "daemon.log")
