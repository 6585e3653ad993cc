"""What the splitter journals (issue 4, "Sparse images" and the splitter's ordering rule).

- WRITE_ZEROES (with and without NO_HOLE) and TRIM are journaled as records, not as zero
  data: 16 MiB of them cost next to no journal bytes; data writes cost their size.
- Onboarding an all-zero image (sparse or allocated) journals no data.
- Every acknowledged write is a point: the journal's image at the seq before it lacks it,
  at its seq has it (seq order is the order the client's writes were acknowledged).
- The largest request we advertise (32 MiB) works for WRITE and READ, simple and
  structured.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import nbdraw as n
import pytest
from conftest import CdpDaemon, Volume, need_tools, qemu_io, running_daemon
from nbdraw import RawNbd

pytestmark = pytest.mark.integration

NAME = "rec0"
MIB = 1 << 20


def journal_bytes(d: CdpDaemon) -> int:
    return int(d.status()["groups"][0]["journal_bytes"])


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_tools("qemu-io", "qemu-img")


@pytest.mark.parametrize("prealloc", [False, True], ids=["sparse", "allocated-zeros"])
def test_zero_image_and_zero_requests_cost_no_journal_data(tmp_path: Path, prealloc: bool) -> None:
    size = 64 * MIB
    image = tmp_path / "rec0.raw"
    with open(image, "wb") as f:
        if prealloc:
            f.write(bytes(size))
        else:
            f.truncate(size)
    with running_daemon(tmp_path, [Volume(NAME, size, image=image)]) as d:
        onboarded = journal_bytes(d)
        assert onboarded < 256 * 1024, f"onboarding a zero image journaled {onboarded} bytes"
        qemu_io(d.uri(NAME), "write -z 0 16M")  # NO_HOLE
        qemu_io(d.uri(NAME), "write -z -u 16M 16M")  # may punch
        qemu_io(d.uri(NAME), "discard 32M 16M")
        zeroed = journal_bytes(d) - onboarded
        assert zeroed < 64 * 1024, f"48 MiB of zeroes and trims cost {zeroed} journal bytes"
        qemu_io(d.uri(NAME), "write -P 0x5a 48M 4M")
        data = journal_bytes(d) - onboarded - zeroed
        assert data >= 4 * MIB, f"4 MiB of data cost only {data} journal bytes"
        d.assert_consistent(NAME)


def test_every_acknowledged_write_is_a_point(tmp_path: Path) -> None:
    size = 4 * MIB
    with running_daemon(tmp_path, [Volume(NAME, size)]) as d:
        block = 64 * 1024
        steps: list[tuple[int, bytes]] = []
        with RawNbd.connect_export(d.sock(NAME), NAME) as c:
            for i, (op, pattern) in enumerate(
                [("write", 0x11), ("write", 0x22), ("zero", 0), ("write", 0x33), ("trim", 0)]
            ):
                if op == "write":
                    r = c.pwrite(block, bytes([pattern]) * block, flags=n.CMD_FLAG_FUA)
                elif op == "zero":
                    r = c.call(n.CMD_WRITE_ZEROES, block, block, flags=n.CMD_FLAG_FUA)
                else:
                    r = c.call(n.CMD_TRIM, block, block, flags=n.CMD_FLAG_FUA)
                assert r.error == 0, (i, op)
                after = c.pread(block, block).data  # what the export now returns
                steps.append((d.last_seq(NAME), after))
        seqs = [s for s, _ in steps]
        assert seqs == sorted(set(seqs)), f"each write must get a later seq: {seqs}"
        for seq, content in steps:
            with d.journal_image(NAME, seq) as resp:
                img = resp.read()
            assert img[block : 2 * block] == content, f"journal at seq {seq}"
            with d.journal_image(NAME, seq - 1) as resp:
                before = resp.read()
            assert before[block : 2 * block] != content or content == bytes(block)
        d.assert_consistent(NAME)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_largest_advertised_request(tmp_path: Path, structured: bool) -> None:
    size = 40 * MIB
    with running_daemon(tmp_path, [Volume(NAME, size)]) as d:
        with RawNbd(d.sock(NAME), timeout=60) as c:
            c.handshake()
            if structured:
                c.negotiate_structured()
            replies = c.go(NAME, (n.INFO_BLOCK_SIZE,))
            (maximum,) = [
                int.from_bytes(r.data[10:14], "big")
                for r in replies
                if r.type == n.REP_INFO and r.data[:2] == b"\0\3"
            ]
            assert maximum == 32 * MIB
            data = bytes(range(251)) * (maximum // 251) + bytes(maximum % 251)
            assert c.pwrite(4 * MIB, data).error == 0
            r = c.pread(4 * MIB, maximum)
            assert r.error == 0 and r.data == data
            assert c.pread(0, maximum + 1).error == n.EINVAL  # over the maximum, in range
            assert c.call(n.CMD_WRITE_ZEROES, 4 * MIB, 36 * MIB).error == 0  # effect length
            assert c.pread(4 * MIB, 4096).data == bytes(4096)
        d.assert_consistent(NAME)


def test_point_in_time_read_while_writes_roll_and_seal_segments(tmp_path: Path) -> None:
    """The API's image at seq N is the image as it was at N, while fio keeps writing (and
    the journal rolls 64 MiB segments and seals them in the background)."""
    need_tools("fio")
    size = 32 * MIB
    with running_daemon(tmp_path, [Volume(NAME, size)]) as d:
        qemu_io(d.uri(NAME), "write -P 0x3c 0 32M")
        seq = d.last_seq(NAME)
        frozen = tmp_path / "at-seq.raw"
        shutil.copyfile(d.volumes[NAME].image, frozen)  # type: ignore[arg-type]
        segments_before = d.status()["groups"][0]["segments"]
        fio = subprocess.Popen(
            [
                "fio",
                "--name=load",
                "--ioengine=nbd",
                f"--uri={d.uri(NAME)}",
                "--rw=randwrite",
                "--bs=64k",
                "--size=32M",
                "--io_size=160M",
                "--iodepth=16",
                "--fsync=64",
                "--randseed=11",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        results: list[bool] = []

        def fetch() -> None:
            while fio.poll() is None:
                out = tmp_path / f"pit-{len(results)}.raw"
                d.save_journal_image(NAME, out, seq)
                results.append(out.read_bytes() == frozen.read_bytes())
                out.unlink()

        t = threading.Thread(target=fetch)
        t.start()
        out, _ = fio.communicate(timeout=300)
        t.join(120)
        assert fio.returncode == 0 and "err= 0" in out, out
        assert results and all(results), f"point {seq} changed under load: {results}"
        st = d.status()["groups"][0]
        print(
            f"{len(results)} reads of seq {seq} under load; segments {st['segments']}, "
            f"unsealed {st['unsealed_segments']}"
        )
        assert st["segments"] > segments_before, "no segment rolled: the test lost its point"
        d.assert_consistent(NAME)
        with d.journal_image(NAME, seq) as r:
            assert r.read() == frozen.read_bytes()
