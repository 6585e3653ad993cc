"""``cdp status [--json]``: what the daemon protects and how far back it can go.

Both forms come from ``GET /v1/status``. ``--json`` prints the daemon's document unchanged
(sorted keys) for scripts. The human form knows the fields of docs/design/api.md (a volumes
table, one block per consistency group with its window, the alerts) and renders anything
else generically (``key: value``, lists of objects as tables), without assuming more of the
document than that it is an object, so the daemon can grow fields without breaking this
command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from cdp.cli.common import (
    Subparsers,
    add_verb,
    api_client,
    approx_size,
    describe_window,
    load,
    point_time,
)
from cdp.units import format_size


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(subparsers, "status", help="show volumes, journal window and alerts")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    doc = asyncio.run(api_client(config).get("/v1/status"))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_status(doc), end="")
    return 0


def render_status(doc: Mapping[str, object]) -> str:
    """Human-readable status; known sections first, unknown fields generically, alerts last."""
    rest = dict(doc)
    lines: list[str] = []
    daemon = rest.pop("daemon", None)
    if isinstance(daemon, Mapping):
        lines.append(_daemon_line(daemon))
    elif daemon is not None:
        rest["daemon"] = daemon
    volumes = rest.pop("volumes", None)
    groups = rest.pop("groups", None)
    alerts = rest.pop("alerts", None)
    lines += _generic(rest)
    if isinstance(volumes, list):
        lines += ["", "volumes:" if volumes else "volumes: none"]
        lines += _volumes(volumes)
    if isinstance(groups, list):
        lines += ["", "groups:" if groups else "groups: none"]
        for g in groups:
            lines += _group(g) if isinstance(g, Mapping) else [f"  - {_cell(g)}"]
    if alerts is not None:
        lines.append("")
        lines += _generic({"alerts": alerts})
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines) + "\n"


def _daemon_line(d: Mapping[str, object]) -> str:
    parts = []
    if "pid" in d:
        parts.append(f"pid {_cell(d['pid'])}")
    if "version" in d:
        parts.append(f"version {_cell(d['version'])}")
    if "started_ns" in d:
        parts.append(f"started {_scan_time(d['started_ns'])}")
    known = ("pid", "version", "started_ns", "gc")
    parts += [f"{k} {_cell(v)}" for k, v in d.items() if k not in known]
    gc = d.get("gc")
    if isinstance(gc, Mapping):
        thaw = f"{_cell(gc.get('thaws'))} full collections"
        if gc.get("thaws_under_load"):
            thaw += f" ({_cell(gc.get('thaws_under_load'))} under load)"
        if gc.get("last_thaw_age_s") is not None:
            thaw += (
                f", the last {_cell(gc.get('last_thaw_age_s'))} s ago "
                f"(paused {_cell(gc.get('last_thaw_ms'))} ms)"
            )
        parts.append(f"collector: {_cell(gc.get('frozen_objects'))} objects frozen, {thaw}")
    return "daemon: " + ", ".join(parts)


def _get(row: object, *path: str) -> object:
    for key in path:
        if not isinstance(row, Mapping):
            return None
        row = row.get(key)
    return row


def _volume_size(v: object) -> str:
    return format_size(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "-"


def _onboarding(row: Mapping[str, object]) -> str:
    state = _get(row, "onboarding", "state")
    if state is None:
        return "-"
    if state == "done":
        seq = _get(row, "onboarding", "first_point_seq")
        return "done" if seq is None else f"done (seq {seq})"
    scanned, total = (
        _get(row, "onboarding", "scanned_bytes"),
        _get(row, "onboarding", "total_bytes"),
    )
    if state == "scanning" and isinstance(scanned, int) and isinstance(total, int) and total > 0:
        return f"scanning {100 * scanned // total}%"
    return _cell(state)


# The volumes table: (header, cell) for the fields of docs/design/api.md; other scalar
# fields a newer daemon adds become extra columns.
_VOLUME_COLUMNS: Final[tuple[tuple[str, str, Callable[[Mapping[str, object]], str]], ...]] = (
    ("name", "NAME", lambda r: _cell(r.get("name"))),
    ("group", "GROUP", lambda r: _cell(r.get("group"))),
    ("size", "SIZE", lambda r: _volume_size(r.get("size"))),
    ("source", "SOURCE", lambda r: _cell(r.get("source"))),
    ("capture", "CAPTURE", lambda r: _cell(_get(r, "capture", "state"))),
    ("capture", "LAST SCAN", lambda r: _scan_time(_get(r, "capture", "last_scan_ns"))),
    ("onboarding", "ONBOARDING", _onboarding),
)


def _scan_time(t: object) -> str:
    """A time to the second (for "when did this happen", not for pasting into --at)."""
    return "-" if not isinstance(t, int) or t <= 0 else point_time(t - t % 10**9)


def _volumes(rows: Sequence[object]) -> list[str]:
    dicts = [r for r in rows if isinstance(r, Mapping)]
    if not dicts:
        return [f"  - {_cell(r)}" for r in rows]
    known = {key for key, _, _ in _VOLUME_COLUMNS}
    present = {k for r in dicts for k in r}
    columns = [(h, f) for key, h, f in _VOLUME_COLUMNS if key in present]
    extra = [k for k in dict.fromkeys(k for r in dicts for k in r) if k not in known]
    header = [h for h, _ in columns] + [k.upper() for k in extra]
    cells = [[f(r) for _, f in columns] + [_cell(r.get(k)) for k in extra] for r in dicts]
    lines = _table(header, cells)
    for r in dicts:  # the capture detail is a sentence; it goes under the table
        detail = _get(r, "capture", "detail")
        if isinstance(detail, str) and detail:
            lines.append(f"  {_cell(r.get('name'))}: {detail}")
    lines += [f"  - {_cell(r)}" for r in rows if not isinstance(r, Mapping)]
    return lines


_GROUP_KNOWN: Final = frozenset(
    {
        "name",
        "volumes",
        "window",
        "journal_bytes",
        "segments",
        "unsealed_segments",
        "index_bytes",
        "last_checkpoint",
        "holds",
        "history_short",
        "alerts",
        "recovery",
        "replicas",
        "replica",
        "detector",
    }
)


def _replica_line(r: Mapping[str, object]) -> str:
    """One sender: where it is, how far behind (RPO lag) and what it cost on the wire."""
    parts = [f"{_cell(r.get('state'))}, acked seq {_cell(r.get('acked_seq'))}"]
    parts.append(f"lag {_cell(r.get('lag_s'))} s")
    if r.get("pending_records"):
        parts.append(
            f"{_cell(r.get('pending_records'))} records "
            f"({approx_size(r.get('pending_bytes'))}) pending"
        )
    parts.append(
        f"wire {approx_size(r.get('wire_bytes_out'))} out for "
        f"{approx_size(r.get('logical_bytes'))} written"
    )
    init = r.get("initial_sync")
    if isinstance(init, Mapping):
        parts.append(
            f"initial sync {approx_size(init.get('done_bytes'))} of "
            f"{approx_size(init.get('total_bytes'))}, ETA {_cell(init.get('eta_s'))} s"
        )
    if r.get("detail"):
        parts.append(_cell(r.get("detail")))
    return f"{_cell(r.get('name'))} ({_cell(r.get('url'))}): " + "; ".join(parts)


def _group(g: Mapping[str, object]) -> list[str]:
    vols = g.get("volumes")
    members = ", ".join(str(v) for v in vols) if isinstance(vols, list) and vols else "none"
    fields: list[tuple[str, str]] = []
    w = g.get("window")
    if isinstance(w, Mapping):
        fields.append(("window", describe_window(*(_int(w.get(k)) for k in _WINDOW_KEYS))))
    if "journal_bytes" in g:
        journal = f"{approx_size(g.get('journal_bytes'))}"
        if "segments" in g:
            journal += f" in {_cell(g.get('segments'))} segment(s)"
            if g.get("unsealed_segments"):
                journal += f", {_cell(g.get('unsealed_segments'))} not sealed yet"
        if "index_bytes" in g:
            journal += f"; index {approx_size(g.get('index_bytes'))}"
        fields.append(("journal", journal))
    if "last_checkpoint" in g:
        fields.append(("last checkpoint", _checkpoint(g.get("last_checkpoint"))))
    holds = g.get("holds")
    if isinstance(holds, list) and holds:
        fields.append(
            ("holds", ", ".join(f"{_get(h, 'kind')}:{_get(h, 'name')} at seq {_get(h, 'seq')}"
                                for h in holds))
        )  # fmt: skip
    recovery = g.get("recovery")
    if isinstance(recovery, Mapping):
        fields.append(("last open", _recovery(recovery)))
    if g.get("history_short"):
        fields.append(("history", "SHORTER than the retention window (size cap reached)"))
    reps = g.get("replicas")
    if isinstance(reps, list):
        for r in reps:
            if isinstance(r, Mapping):
                fields.append(("replica", _replica_line(r)))
    det = g.get("detector")
    if isinstance(det, Mapping):
        n = det.get("alarms")
        fields.append(
            (
                "detector",
                f"watching ({approx_size(det.get('sampled_bytes'))} sampled); "
                + (f"{_cell(n)} alarm(s): see the alerts" if n else "no alarm"),
            )
        )
    rep = g.get("replica")
    if isinstance(rep, Mapping):
        fields.append(
            (
                "replica of",
                f"primary journal {_cell(rep.get('primary_journal'))}, epoch "
                f"{_cell(rep.get('epoch'))}, {_cell(rep.get('batches'))} batches "
                f"({approx_size(rep.get('bytes_in'))}) received",
            )
        )
    fields += [(k, _cell(v)) for k, v in g.items() if k not in _GROUP_KNOWN]
    width = max((len(k) for k, _ in fields), default=0)
    lines = [f"  {_cell(g.get('name'))} (volumes: {members})"]
    lines += [f"    {k + ':':<{width + 1}} {v}" for k, v in fields]
    galerts = g.get("alerts")
    if isinstance(galerts, list) and galerts:
        lines += [f"    alert: {_cell(a)}" for a in galerts]
    return lines


_WINDOW_KEYS: Final = ("first_seq", "last_seq", "first_ts_ns", "last_ts_ns")


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _checkpoint(cp: object) -> str:
    if not isinstance(cp, Mapping):
        return "none"
    kind = f" ({cp['kind']})" if cp.get("kind") else ""
    when = point_time(cp.get("ts_ns"))
    return f"{_cell(cp.get('name'))}{kind} at seq {_cell(cp.get('seq'))}, {when}"


def _recovery(r: Mapping[str, object]) -> str:
    parts = []
    if r.get("truncated_segment"):
        parts.append(
            f"torn tail truncated in {r['truncated_segment']} at offset "
            f"{_cell(r.get('truncated_at'))} ({_cell(r.get('truncated_bytes'))} bytes)"
        )
    if r.get("index_rebuilt"):
        parts.append("index rebuilt from segments")
    damaged = r.get("damaged_packs")
    if isinstance(damaged, list) and damaged:
        parts.append(f"DAMAGED (kept whole; run cdp verify): {', '.join(map(str, damaged))}")
    return "; ".join(parts) if parts else "clean"


def _generic(doc: Mapping[str, object]) -> list[str]:
    """Scalars as ``key: value``, lists of scalars as bullets, lists of objects as tables."""
    lines: list[str] = []
    tables: list[tuple[str, list[Mapping[str, object]]]] = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            tables.append((key, value))
        elif isinstance(value, list):
            lines.append(f"{key}:" if value else f"{key}: none")
            lines.extend(f"  - {_cell(v)}" for v in value)
        else:
            lines.append(f"{key}: {_cell(value)}")
    for key, rows in tables:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["", f"{key}:"]
        lines += _table(
            [c.upper() for c in columns], [[_cell(r.get(c)) for c in columns] for r in rows]
        )
    return lines


def _cell(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    return json.dumps(value, sort_keys=True)


def _table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.extend("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    return [line.rstrip() for line in out]
