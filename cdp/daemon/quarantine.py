"""What happens when the detector fires: pin the last clean point, lock it, say so.

A detection costs an extra locked snapshot, never an outage: guest writes go on (they may
be an admin's legitimate bulk encryption), but the point just before the burst becomes a
locked ``anomaly`` snapshot that retention cannot take, the newest snapshot before it is
locked too, an ``anomaly`` checkpoint is appended (it replicates, so the DR site pins the
same point: ``mark_replicated_anomaly``), and status, the log and ``cdp timeline`` name the
point to roll back to.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from cdp.detector import Detection
from journal import CheckpointKind, CheckpointRecord, Journal, JournalError, Record

log = logging.getLogger(__name__)

ANOMALY_RE = re.compile(
    r"^anomaly:(?P<vols>[^:]*):last-clean-seq=(?P<seq>\d+):snapshot=(?P<snap>[A-Za-z0-9._-]+)$"
)


@dataclass(frozen=True, slots=True)
class Quarantine:
    """One alarm, as status shows it."""

    detection: Detection
    snapshot: str | None  # the locked snapshot at the last clean point (None: not retained)
    checkpoint: str
    locked_until: int


def checkpoint_name(d: Detection, snapshot: str) -> str:
    vols = ",".join(d.volumes)[:100]
    return f"anomaly:{vols}:last-clean-seq={d.last_clean_seq}:snapshot={snapshot}"


def pin_clean_point(
    j: Journal, group: str, d: Detection, *, now_ns: int, lock_ns: int
) -> Quarantine:
    """Blocking (a worker thread): snapshot + locks + anomaly checkpoint."""
    until = now_ns + lock_ns
    name = f"clean-{d.detected_ts // 10**9}-{d.last_clean_seq}"
    snap: str | None = name
    try:
        j.create_snapshot(name, d.last_clean_seq, kind="anomaly", locked_until=until)
    except (ValueError, JournalError) as e:  # already there (replica), or not retained
        log.warning("could not pin the last clean point", extra={"group": group, "err": str(e)})
        snap = name if any(s.name == name for s in j.snapshots()) else None
    _lock_newest_before(j, d.last_clean_seq, until, exclude=name)
    cp = checkpoint_name(d, name)
    j.checkpoint(cp, CheckpointKind.ANOMALY)
    j.sync()
    log.error(
        "possible ransomware: in-place high-entropy overwrites; last clean point pinned",
        extra={
            "group": group,
            "volumes": ",".join(d.volumes),
            "last_clean_seq": d.last_clean_seq,
            "snapshot": snap,
            "suspicious_bytes": d.suspicious_bytes,
            "score": round(d.score, 3),
        },
    )
    return Quarantine(d, snap, cp, until)


def _lock_newest_before(j: Journal, seq: int, until: int, *, exclude: str) -> None:
    before = [s for s in j.snapshots() if s.seq <= seq and s.name != exclude]
    if before:
        j.lock_snapshot(before[-1].name, until)


def mark_replicated_anomaly(
    j: Journal, group: str, recs: list[Record], *, now_ns: int, lock_ns: int
) -> list[str]:
    """At the DR site: pin the same clean point the primary pinned (blocking)."""
    done = []
    for r in recs:
        if not (isinstance(r, CheckpointRecord) and r.kind == CheckpointKind.ANOMALY):
            continue
        m = ANOMALY_RE.match(r.name)
        if m is None:
            continue
        seq, name = int(m["seq"]), m["snap"]
        until = now_ns + lock_ns
        try:
            if all(s.name != name for s in j.snapshots()):
                j.create_snapshot(name, seq, kind="anomaly", locked_until=until)
            _lock_newest_before(j, seq, until, exclude=name)
        except (ValueError, JournalError) as e:
            log.warning("could not pin the replicated clean point", extra={"err": str(e)})
            continue
        log.error(
            "anomaly replicated from the primary: last clean point pinned here too",
            extra={"group": group, "last_clean_seq": seq, "snapshot": name},
        )
        done.append(name)
    return done
