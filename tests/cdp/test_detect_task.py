"""The daemon's detector task: fed by the journal's tap, and reading back what it missed.

A real journal, the real ``Daemon._detect`` loop and the real worker process it starts;
the rest of the daemon is left out (the task only needs the group's journal, the detector
settings and a clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cdp.config import DetectorSettings
from cdp.daemon import detect
from cdp.daemon.service import Daemon
from journal import Journal, JournalOptions

MIB = 1 << 20


def _text(rng: random.Random, n: int) -> bytes:
    words = b"invoice customer order total amount paid due report the of and".split()
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(10)) + b".\n"
    return bytes(out[:n])


def _worker_pids() -> list[int]:
    """This process's detector workers (children running cdp.detector_worker)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if b"cdp.detector_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
    return pids


async def _run(
    tmp_path: Path,
    size: int = 32 * MIB,
    kill_worker: bool = False,
    reopen: bool = False,
    before: int = 0,
) -> tuple[Any, Journal, int]:
    """Documents written, then encrypted in place; ``before``: MiB of the documents
    written before the detector starts (the worker then knows nothing of them)."""
    j = Journal.open(str(tmp_path / "j"))
    j.add_volume("v", size)
    rng = random.Random(1)
    for k in range(before):
        j.write("v", k * MIB, _text(rng, MIB))
    g = SimpleNamespace(
        name="g", journal=j, volumes=[SimpleNamespace(name="v", detect=True)],
        detector=None, quarantines=[],
    )  # fmt: skip
    d: Any = SimpleNamespace(
        config=SimpleNamespace(detector=DetectorSettings()),
        journal_options=JournalOptions(),
        clock=j.clock,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(Daemon._detect(d, g, stop))  # type: ignore[arg-type]
    while g.detector is None or j._tap is None:  # noqa: ASYNC110 (the task's own state)
        await asyncio.sleep(0.01)
    if size % 4096:  # the partial last block first: its prior must stop at the end
        j.write("v", size - 1000, _text(rng, 1000))
    for k in range(before, 8):  # documents
        j.write("v", k * MIB, _text(rng, MIB))
    await asyncio.sleep(0.5)
    if reopen:  # as the daemon's repair does after a journal failure
        j.close()
        old, j = j, Journal.open(str(tmp_path / "j"))
        g.journal = j
        while j._tap is None:  # noqa: ASYNC110 (the task's own state)
            await asyncio.sleep(0.01)
        assert old._tap is None
    first = int(j.window().last_seq) + 1
    if kill_worker:  # the first half is encrypted while no worker runs
        (pid,) = _worker_pids()
        os.kill(pid, signal.SIGKILL)
        while g.detector.restarts == 0:  # noqa: ASYNC110 (the task's own state)
            await asyncio.sleep(0.01)
    for k in range(8):  # encrypted in place, a write every 0.05 s of journal time
        j.write("v", k * MIB, os.urandom(MIB))
        await asyncio.sleep(0.05)
        if kill_worker and k == 3:
            while not _worker_pids():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    for _ in range(100):
        if g.quarantines:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    assert j._tap is None  # the task took its tap away
    return g, j, first


async def test_the_tap_feeds_the_detector(tmp_path: Path) -> None:
    g, j, first = await _run(tmp_path)
    assert len(g.quarantines) == 1
    assert g.quarantines[0].detection.first_seq == first
    j.close()


def _count_questions(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[Any]]]:
    """The spans the worker asks the daemon about, by kind (``prior`` reads, ``map``s)."""
    asked: dict[str, list[list[Any]]] = {"prior": [], "map": []}
    priors, maps = detect._priors, detect._maps

    def count_priors(j: Journal, spans: list[list[Any]]) -> list[bytes]:
        asked["prior"] += spans
        return priors(j, spans)

    def count_maps(j: Journal, spans: list[list[Any]]) -> list[bytes]:
        asked["map"] += spans
        return maps(j, spans)

    monkeypatch.setattr(detect, "_priors", count_priors)
    monkeypatch.setattr(detect, "_maps", count_maps)
    return asked


async def test_writes_into_space_never_written_need_no_prior_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One map a MiB tells the worker which blocks never held data: the documents go into
    empty space and their encryption over blocks it has seen since, so it reads nothing."""
    asked = _count_questions(monkeypatch)
    g, j, first = await _run(tmp_path)
    assert len(g.quarantines) == 1 and g.quarantines[0].detection.first_seq == first
    assert asked["prior"] == []
    assert sorted({off // MIB for _, off, _, _ in asked["map"]}) == list(range(8))
    j.close()


async def test_blocks_written_before_the_worker_started_are_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map says these may hold data: the worker reads them (as of just before their
    first write it sees), and still catches their encryption."""
    asked = _count_questions(monkeypatch)
    g, j, first = await _run(tmp_path, before=3)
    assert len(g.quarantines) == 1 and g.quarantines[0].detection.first_seq == first
    read = sorted({off // MIB for _, off, _, _ in asked["prior"]})
    assert read == [0, 1, 2]  # the three documents it had not seen, and nothing else
    assert sum(n for _, _, n, _ in asked["prior"]) == 3 * MIB  # each block once
    j.close()


async def test_a_detector_that_fell_behind_reads_the_stretch_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring too small for one write: every record is dropped and read back instead."""
    monkeypatch.setattr(detect, "DEFAULT_CAPACITY", 1000)
    g, j, first = await _run(tmp_path)
    assert len(g.quarantines) == 1
    assert g.quarantines[0].detection.first_seq == first
    # No 4 KiB write fits in a 1,000-byte ring, so each of the 16 writes it scored (4+
    # samples each) came by the read back. ``dropped`` counts tap calls, and one call may
    # carry several writes, so it is at least one, not one per write.
    assert g.detector.sampled >= 16 * 2
    assert g.detector.dropped >= 1
    j.close()


async def test_a_volume_whose_size_is_not_whole_blocks(tmp_path: Path) -> None:
    g, j, first = await _run(tmp_path, size=32 * MIB + 1000)
    assert len(g.quarantines) == 1 and g.quarantines[0].detection.first_seq == first
    j.close()


async def test_a_worker_that_dies_is_started_again_and_scores_what_it_missed(
    tmp_path: Path,
) -> None:
    g, j, first = await _run(tmp_path, kill_worker=True)
    assert g.detector.restarts == 1
    assert len(g.quarantines) == 1
    assert g.quarantines[0].detection.first_seq == first  # written while none ran
    j.close()


async def test_a_reopened_journal_is_tapped_again(tmp_path: Path) -> None:
    g, j, first = await _run(tmp_path, reopen=True)
    assert g.detector.restarts == 0  # a reopen is not a failure of the worker
    assert len(g.quarantines) == 1 and g.quarantines[0].detection.first_seq == first
    j.close()


def test_a_read_back_from_a_folded_point_goes_on_from_the_oldest_retained(
    tmp_path: Path,
) -> None:
    """A worker that fell further behind than the window resumes where history begins."""
    now = [10**18]
    j = Journal.open(str(tmp_path / "j"), clock=lambda: now[0],
                     options=JournalOptions(segment_size=1 << 20))  # fmt: skip
    j.add_volume("v", 8 * MIB)
    for k in range(64):
        j.write("v", (k % 8) * MIB, os.urandom(64 << 10))
        now[0] += 10**9
    j.sync()
    j.seal_pending(100)
    j.apply_retention(keep_ns=20 * 10**9)
    first, last = int(j.window().first_seq), int(j.window().last_seq)
    assert first > 1  # folded
    ans = detect._read_back(j, detect._Server(), 0, last)
    seqs = [row[1] for row in ans["recs"]]
    assert seqs and seqs[0] == first + 1 and seqs == sorted(seqs) and ans["last"] > first
    j.close()
