"""``Journal.read_durable`` ships only what an fsync covered, even across a segment roll."""

from __future__ import annotations

from pathlib import Path

from journal import Journal, JournalOptions


def test_records_appended_after_the_sync_are_not_shipped(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), options=JournalOptions(segment_size=64 * 1024))
    j.add_volume("v", 1 << 20)
    # fill the first segment until the next 4 KiB write must roll to a new one
    while j._writer is not None and j._writer.size() + 4096 + 200 <= 64 * 1024:
        j.write("v", 0, b"a" * 4096)
    real_sync = j.sync
    durable_last = 0

    def sync_then_more() -> None:  # a guest keeps writing right after the fsync returns
        nonlocal durable_last
        real_sync()
        durable_last = int(j.window().last_seq)
        for i in range(10):
            j.write("v", i * 4096, b"b" * 4096)  # rolls, then fills a new hot segment

    j.sync = sync_then_more  # type: ignore[method-assign]
    recs, _ = j.read_durable(1)
    j.sync = real_sync  # type: ignore[method-assign]
    assert len(j.segs) >= 2, "the writes after the sync must have rolled a segment"
    assert recs and recs[-1].seq <= durable_last, "shipped records no fsync covered"
    # once synced, the rest ships
    more, _ = j.read_durable(recs[-1].seq + 1)
    assert more and more[-1].seq == j.window().last_seq
    j.close()
