"""``Journal.set_tap``: the in-process feed of appended writes (the detector reads it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from journal import Journal, Record, WriteRecord, ZeroRecord
from journal.journal import WriteOp


def test_the_tap_sees_every_write_and_zero_in_seq_order_with_its_data(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"))
    j.add_volume("v", 1 << 20)
    got: list[Record] = []

    def tap(recs: list[Record], ops: Sequence[WriteOp]) -> None:
        for r, (_, data, _, _) in zip(recs, ops, strict=True):
            if isinstance(r, WriteRecord):  # the data is the caller's, for the call only
                assert data is not None and len(data) == r.length
                r = WriteRecord(r.seq, r.ts, r.volume, r.offset, r.length, bytes(data))
            got.append(r)

    j.set_tap(tap)
    buf = bytearray(b"a" * 4096)
    j.write_many("v", [(0, memoryview(buf), 4096, False), (8192, None, 4096, True)])
    buf[:] = b"b" * 4096  # the caller reuses its buffer (the NBD server does)
    j.checkpoint("cp")  # not a write: not tapped
    j.write("v", 4096, b"c" * 100)
    assert [type(r) for r in got] == [WriteRecord, ZeroRecord, WriteRecord]
    assert [r.seq for r in got] == sorted(r.seq for r in got)
    w0 = got[0]
    assert isinstance(w0, WriteRecord) and w0.data == b"a" * 4096 and w0.offset == 0
    z = got[1]
    assert isinstance(z, ZeroRecord) and z.trim and z.length == 4096
    # the records are what the journal holds
    back, _ = j.read_durable(w0.seq, sync=True)
    assert [(r.seq, r.ts) for r in back if not hasattr(r, "name")] == [(r.seq, r.ts) for r in got]
    j.set_tap(None)
    j.write("v", 0, b"d" * 10)
    assert len(got) == 3
    j.close()
