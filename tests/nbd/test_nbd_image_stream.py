"""The API's image stream of an nbd volume when the reader goes away mid-stream (a Ctrl-C
during ``cdp restore``): the export hold is released, the daemon keeps serving, and the log
does not report a crash (``request crashed`` is what the API logs for bugs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CdpDaemon, Volume, need_tools, qemu_io, running_daemon

pytestmark = pytest.mark.integration

NAME = "st0"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[CdpDaemon]:
    need_tools("qemu-io", "qemu-img")
    with running_daemon(tmp_path, [Volume(NAME, 64 << 20)]) as d:
        qemu_io(d.uri(NAME), "write -P 0x17 0 64M")
        yield d


def abandon_download(d: CdpDaemon) -> None:
    with d.journal_image(NAME) as r:
        assert len(r.read(1 << 20)) == 1 << 20
    # closed after 1 MiB of 64 MiB; give the handler time to notice
    d.wait_for(lambda: not d.status()["groups"][0]["holds"], "the export hold to go")


def test_abandoned_download_releases_its_hold(daemon: CdpDaemon) -> None:
    abandon_download(daemon)
    daemon.assert_healthy(NAME)
    daemon.assert_consistent(NAME)


def test_abandoned_download_is_not_logged_as_a_crash(daemon: CdpDaemon) -> None:
    abandon_download(daemon)
    time.sleep(0.2)
    log = daemon.log()
    assert "request crashed" not in log and "Traceback" not in log, log[-3000:]
