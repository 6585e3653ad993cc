"""The timeline's text: minute rows, folded quiet runs, flagged anomalies, snapshot locks."""

from __future__ import annotations

from cdp.cli.timeline_cmd import MINUTE, render

T0 = 1_796_000_000 * 10**9 // MINUTE * MINUTE


def _doc() -> dict[str, object]:
    return {
        "volume": "disk0",
        "group": "g",
        "since_ns": T0,
        "bucket_ns": MINUTE,
        "window": {"first_seq": 0, "last_seq": 99},
        "checkpoints": [
            {"name": "before", "seq": 10, "ts_ns": T0 + 90 * 10**9, "kind": "user"},
            {"name": "clean-1", "seq": 40, "ts_ns": T0 + 50 * MINUTE, "kind": "anomaly"},
            {
                "name": "anomaly:disk0:last-clean-seq=38:snapshot=clean-9-38",
                "seq": 41,
                "ts_ns": T0 + 50 * MINUTE + 1,
                "kind": "anomaly",
            },
        ],
        "snapshots": [
            {"name": "old", "seq": 1, "ts_ns": T0 - MINUTE, "locked_until_ns": 0},
            {"name": "auto", "seq": 30, "ts_ns": T0 + 2 * MINUTE, "locked_until_ns": T0 + 10**15},
        ],
        "gaps": [{"started_ns": T0 + 55 * MINUTE, "ended_ns": None, "reason": "ENOSPC"}],
        "rate": [
            {"start_ns": T0, "writes": 3, "bytes": 4096},
            {"start_ns": T0 + 50 * MINUTE, "writes": 900, "bytes": 400 << 20},
        ],
    }


def test_render_marks_events_and_folds_quiet_minutes() -> None:
    lines = render(_doc(), now_ns=T0 + 59 * MINUTE)  # type: ignore[arg-type]
    text = "\n".join(lines)
    assert "checkpoint before (seq 10, user)  -> checkpoint:before" in text
    assert "!! anomaly clean-1 (seq 40, anomaly)" in text
    assert (
        "!! possible ransomware on disk0 (flagged at seq 41): last clean point seq 38  -> "
        "cdp rollback --to snapshot:clean-9-38"
    ) in text
    assert "snapshot auto (seq 30, locked until" in text
    assert "GAP in protection (ENOSPC), still open" in text
    assert "older snapshots: old (seq 1)" in text
    assert "(47 quiet minutes)" in text  # minutes 3..49
    burst = next(x for x in lines if "400.0 MiB" in x or "400 MiB" in x)
    quiet = next(x for x in lines if x.rstrip().endswith("#") and "4.0 KiB" in x)
    assert burst.count("#") == 40 and quiet.count("#") == 1
    assert len(lines) < 30
