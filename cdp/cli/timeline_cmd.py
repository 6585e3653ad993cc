"""``cdp timeline VOLUME [--since 2h] [--json]``: where things went wrong, and where to go back.

One line per minute of journal time with the bytes written as a bar, and, at their minute,
the checkpoints (anomaly ones flagged), snapshots (with their locks) and gaps in protection.
Runs of quiet minutes are folded into one line. The admin reads off a point to give to
``cdp rollback --to``, ``cdp restore --at`` or ``cdp export --at``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from cdp.cli.common import Subparsers, add_verb, api_client, approx_size, load, volumes_for
from cdp.errors import UsageError
from cdp.units import parse_duration

MINUTE = 60 * 10**9
ANOMALY = re.compile(
    r"^anomaly:(?P<vols>[^:]*):last-clean-seq=(?P<seq>\d+):snapshot=(?P<snap>\S+)$"
)
BAR = 40


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(
        subparsers,
        "timeline",
        help="checkpoints, snapshots, gaps and write rate of a volume",
        description="Show a volume's recent history minute by minute, to pick a point.",
    )
    parser.add_argument("volume", metavar="VOLUME", help="volume name")
    parser.add_argument("--since", default="1h", metavar="DURATION", help='default "1h"')
    parser.add_argument("--json", action="store_true", help="the raw timeline as JSON")
    parser.set_defaults(run=run)


def _hm(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")


def _iso(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(doc: dict[str, Any], *, now_ns: int) -> list[str]:
    since = int(doc["since_ns"])
    events: dict[int, list[str]] = {}

    def at(t: int, text: str) -> None:
        events.setdefault(t - (t - since) % MINUTE if t >= since else since, []).append(text)

    for c in doc["checkpoints"]:
        m = ANOMALY.match(c["name"]) if c["kind"] == "anomaly" else None
        if m is not None:
            at(
                c["ts_ns"],
                f"!! possible ransomware on {m['vols']} (flagged at seq {c['seq']}): last clean "
                f"point seq {m['seq']}  -> cdp rollback --to snapshot:{m['snap']}",
            )
            continue
        flag = "!! anomaly" if c["kind"] == "anomaly" else "checkpoint"
        at(
            c["ts_ns"],
            f"{flag} {c['name']} (seq {c['seq']}, {c['kind']})  -> checkpoint:{c['name']}",
        )
    for s in doc["snapshots"]:
        if s["ts_ns"] >= since:
            lock = (
                f", locked until {_iso(s['locked_until_ns'])}"
                if s["locked_until_ns"] > now_ns
                else ""
            )
            at(s["ts_ns"], f"snapshot {s['name']} (seq {s['seq']}{lock})  -> snapshot:{s['name']}")
    for g in doc["gaps"]:
        till = "still open" if g["ended_ns"] is None else f"until {_iso(g['ended_ns'])}"
        at(g["started_ns"], f"GAP in protection ({g['reason']}), {till}")
    rate = {int(r["start_ns"]): r for r in doc["rate"]}
    peak = max((int(r["bytes"]) for r in doc["rate"]), default=0)
    w = doc["window"]
    lines = [
        f"{doc['volume']} (group {doc['group']}): journal window seq {w['first_seq']}.."
        f"{w['last_seq']}, since {_iso(since)}",
        f"{'minute (UTC)':16}  {'writes':>7}  {'written':>9}",
    ]
    quiet = 0
    minute: int = since
    end = max(now_ns, since)
    while minute <= end:
        r = rate.get(minute)
        ev = events.get(minute, [])
        if r is None and not ev:
            quiet += 1
            minute += MINUTE
            continue
        if quiet:
            lines.append(f"{'':16}  ({quiet} quiet minute{'s' if quiet > 1 else ''})")
            quiet = 0
        if r is not None:
            n = max(1, round(BAR * int(r["bytes"]) / peak)) if peak else 0
            size = approx_size(r["bytes"])
            lines.append(f"{_hm(minute):16}  {r['writes']:>7}  {size:>9}  {'#' * n}")
        else:
            lines.append(f"{_hm(minute):16}  {0:>7}  {'-':>9}")
        lines += [f"{'':16}    {e}" for e in ev]
        minute += MINUTE
    if quiet:
        lines.append(f"{'':16}  ({quiet} quiet minute{'s' if quiet > 1 else ''})")
    older = [s for s in doc["snapshots"] if s["ts_ns"] < since]
    if older:
        lines.append(
            "older snapshots: " + ", ".join(f"{s['name']} (seq {s['seq']})" for s in older)
        )
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        span = parse_duration(args.since)
    except ValueError as e:
        raise UsageError(f"--since: {e}") from e
    config = load(args)
    volumes_for(config, args.volume, None)
    now = time.time_ns()
    since = now - span
    since -= since % MINUTE
    doc = asyncio.run(
        api_client(config).get(
            f"/v1/timeline?volume={quote(args.volume, safe='')}&since_ns={since}&bucket_ns={MINUTE}"
        )
    )
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print("\n".join(render(doc, now_ns=int(str(doc.get("now_ns", now))))))
    return 0
