"""Errors of the image itself (issue 4: "an error of the image itself goes to the guest as
EIO, never hidden"; ENOSPC/EFBIG map to NBD_ENOSPC per the spec).

The daemon runs with RLIMIT_FSIZE = 12 MiB on a 16 MiB volume: a write that crosses the
limit is short (the first part lands in the image), one entirely past it fails with EFBIG.
That is how a full thin-provisioned or copy-on-write filesystem behaves too. The rule under
test: whatever the guest is told, the export and the journal agree afterwards, and a
request that did not complete is reported as failed.

The image is zero up to 12 MiB and holds data (0xaa) above, so the journal (4 MiB of data
at onboarding) stays below the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nbdraw as n
import pytest
from conftest import CdpDaemon, Volume, need_tools, running_daemon
from nbdraw import RawNbd

pytestmark = pytest.mark.integration

NAME = "img0"
MIB = 1 << 20
SIZE = 16 * MIB
LIMIT = 12 * MIB


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[CdpDaemon]:
    need_tools("qemu-io", "qemu-img")
    image = tmp_path / "img0.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.seek(LIMIT)
        f.write(b"\xaa" * (SIZE - LIMIT))
    with running_daemon(tmp_path, [Volume(NAME, SIZE, image=image)], fsize_limit=LIMIT) as d:
        yield d


def test_write_past_the_file_size_limit_is_enospc_and_changes_nothing(daemon: CdpDaemon) -> None:
    seq = daemon.last_seq(NAME)
    with RawNbd.connect_export(daemon.sock(NAME), NAME) as c:
        r = c.pwrite(LIMIT + MIB, b"\x55" * 4096)
        assert r.error == n.ENOSPC  # EFBIG -> ENOSPC (proto.md, error values)
        assert c.pread(LIMIT + MIB, 4096).data == b"\xaa" * 4096
        assert c.pwrite(MIB, b"\x66" * 4096).error == 0  # below the limit: fine
    assert daemon.last_seq(NAME) == seq + 1
    daemon.assert_consistent(NAME)


def test_failed_write_leaves_image_and_journal_equal(daemon: CdpDaemon) -> None:
    with RawNbd.connect_export(daemon.sock(NAME), NAME) as c:
        r = c.pwrite(LIMIT - 2 * MIB, b"\x55" * (4 * MIB))  # 2 MiB land, then EFBIG
        assert r.error == n.ENOSPC
    daemon.assert_consistent(NAME)


def test_write_zeroes_short_write_is_not_hidden(daemon: CdpDaemon) -> None:
    off = LIMIT - MIB // 2
    with RawNbd.connect_export(daemon.sock(NAME), NAME) as c:
        r = c.call(n.CMD_WRITE_ZEROES, off, MIB, flags=n.CMD_FLAG_NO_HOLE)
        back = c.pread(off, MIB).data
        assert r.error != 0 or back == bytes(MIB), (
            "WRITE_ZEROES succeeded but the range does not read back as zeros "
            f"(first non-zero byte at +{next(i for i, b in enumerate(back) if b)})"
        )
    daemon.assert_consistent(NAME)
