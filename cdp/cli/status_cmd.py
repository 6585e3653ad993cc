"""``cdp status [--json]``: what the daemon protects and how far behind it is.

Both forms come from ``GET /v1/status``. ``--json`` prints the daemon's document unchanged
(sorted keys) for scripts; the human form is a table of the ``volumes`` list plus the other
top-level fields, rendered without assuming more of the document than that it is an object,
so the daemon can grow fields without breaking this command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping, Sequence

from cdp.cli.api_client import ApiClient
from cdp.cli.common import Subparsers, add_verb, load


def add_parser(subparsers: Subparsers) -> None:
    parser = add_verb(subparsers, "status", help="show volumes, journal window and alerts")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    doc = asyncio.run(ApiClient(config.api_address()).get("/v1/status"))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_status(doc), end="")
    return 0


def render_status(doc: Mapping[str, object]) -> str:
    """Human-readable status: scalar fields as ``key: value``, lists of objects as tables."""
    lines: list[str] = []
    tables: list[tuple[str, list[Mapping[str, object]]]] = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif isinstance(value, list):
            lines.append(f"{key}:" if value else f"{key}: none")
            lines.extend(f"  - {_cell(v)}" for v in value)
        else:
            lines.append(f"{key}: {_cell(value)}")
    for key, rows in tables:
        lines.append("")
        lines.append(f"{key}:")
        lines.extend(_table(rows))
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    return json.dumps(value, sort_keys=True)


def _table(rows: Sequence[Mapping[str, object]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["  " + "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    out.extend("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    return [line.rstrip() for line in out]
