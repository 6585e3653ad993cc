"""What the control API needs of a site: the primary daemon and the DR receiver alike.

The same verbs (status, restore, resolve, rebuild-index) work on both sites, each against its
own journals, so the API is written against this small interface rather than either class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from cdp.config import Config
from journal import Journal, JournalStatus
from journal.clock import Clock


class SiteGroup(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def journal(self) -> Journal: ...

    def not_a_point(self, seq: int) -> str | None:
        """Why ``seq`` must not be offered as a recovery point (None: it is one)."""
        ...


class SiteVolume(Protocol):
    @property
    def group(self) -> SiteGroup: ...


class Site(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def groups(self) -> Mapping[str, SiteGroup]: ...

    @property
    def volumes(self) -> Mapping[str, SiteVolume]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def read_only(self) -> bool:
        """True at the DR site: only replication appends to its journals."""
        ...

    def status(self) -> dict[str, object]: ...


def journal_doc(name: str, volumes: list[str], st: JournalStatus) -> dict[str, Any]:
    """A group's journal in ``GET /v1/status`` (docs/design/api.md): the same at both sites."""
    w = st.window
    lc = st.last_checkpoint
    return {
        "name": name,
        "volumes": volumes,
        "window": {
            "first_seq": w.first_seq,
            "last_seq": w.last_seq,
            "first_ts_ns": w.first_ts,
            "last_ts_ns": w.last_ts,
        },
        "journal_bytes": st.segment_bytes + st.pack_bytes,
        "segments": st.segments,
        "unsealed_segments": st.unsealed_segments,
        "index_bytes": st.index_bytes,
        "last_checkpoint": None
        if lc is None
        else {"seq": lc.seq, "ts_ns": lc.ts, "name": lc.name, "kind": str(lc.kind)},
        "holds": [{"kind": h.kind, "name": h.name, "seq": h.seq} for h in st.holds],
        "history_short": st.history_short,
        "recovery": {
            "truncated_segment": st.recovery.truncated_segment,
            "truncated_at": st.recovery.truncated_at,
            "truncated_bytes": st.recovery.truncated_bytes,
            "index_rebuilt": st.recovery.index_rebuilt,
            "last_seq": st.recovery.last_seq,
            "damaged_packs": [
                f"{p:016x}.pack at byte {off}" for p, off in st.recovery.damaged_packs
            ],
        },
    }
