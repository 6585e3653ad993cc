"""WHEN: the one syntax every time argument of the CLI uses (``--at``, ``--to``).

Accepted forms (design brief, "User-facing contract")::

    2026-11-22T03:15:00Z          ISO-8601 / RFC 3339 with a zone: Z or an offset (+01:00)
    2026-11-22T03:15:00.5+01:00   fractions down to nanoseconds; a space may replace the T
    -15m  -2h  -1d  -1h30m        relative: that long before now (any cdp.units duration)
    checkpoint:NAME               a named checkpoint
    snapshot:ID                   a retained snapshot
    seq:N                         an exact journal sequence number
    latest                        the newest durable point

A time without a zone is refused rather than read as local time or UTC: WHEN picks the image a
rollback writes, and guessing the zone on a host whose TZ differs from the operator's (or
across a DST change) would silently pick the wrong one. The error says to add ``Z``.

Parsing is pure: relative forms take ``now_ns`` from the caller (the CLI reads the clock once),
so tests and the daemon can pin "now". Whether a point is retained is not decided here; that
needs the journal (``PointNotRetained``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Final, TypeAlias

from cdp.errors import UsageError
from cdp.units import parse_duration

__all__ = [
    "WHEN_HINT",
    "AtCheckpoint",
    "AtSeq",
    "AtSnapshot",
    "AtTime",
    "Latest",
    "When",
    "check_point_name",
    "format_time_ns",
    "parse_time",
    "parse_when",
]

WHEN_HINT: Final = (
    "WHEN is one of: 2026-11-22T03:15:00Z (ISO-8601 with Z or an offset), "
    "-15m / -2h / -1d (that long ago), checkpoint:NAME, snapshot:ID, seq:N, latest"
)

_MAX_SEQ: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class AtTime:
    """The newest point whose time is at or before ``t_ns`` (ns since the Unix epoch, UTC)."""

    t_ns: int

    def __str__(self) -> str:
        return format_time_ns(self.t_ns)


@dataclass(frozen=True, slots=True)
class AtSeq:
    """The point right after the record with this sequence number is applied."""

    seq: int

    def __str__(self) -> str:
        return f"seq:{self.seq}"


@dataclass(frozen=True, slots=True)
class AtCheckpoint:
    """The point a named checkpoint marks."""

    name: str

    def __str__(self) -> str:
        return f"checkpoint:{self.name}"


@dataclass(frozen=True, slots=True)
class AtSnapshot:
    """A retained snapshot, by its id."""

    id: str

    def __str__(self) -> str:
        return f"snapshot:{self.id}"


@dataclass(frozen=True, slots=True)
class Latest:
    """The newest durable point."""

    def __str__(self) -> str:
        return "latest"


When: TypeAlias = AtTime | AtSeq | AtCheckpoint | AtSnapshot | Latest
"""A parsed WHEN; ``str(when)`` writes it back in a form :func:`parse_when` reads."""

# Names are shown in tables and passed back on command lines, so no whitespace or control
# characters; otherwise free-form (the journal decides what it stores).
_POINT_NAME_RE: Final = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")

_ISO_RE: Final = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
    r"(?:[Tt ](?P<h>[0-9]{2}):(?P<mi>[0-9]{2})"
    r"(?::(?P<s>[0-9]{2})(?:[.,](?P<frac>[0-9]{1,9}))?)?"
    r"(?P<tz>[Zz]|[+-][0-9]{2}:?[0-9]{2})?)?"
)


def parse_when(text: str, *, now_ns: int) -> When:
    """Parse a WHEN argument.

    Args:
        text: as typed by the user.
        now_ns: the current time (ns since the epoch), used only by relative forms.

    Raises:
        UsageError: not one of the accepted forms; the hint lists them.
    """
    s = text.strip()
    if s == "latest":
        return Latest()
    prefix, sep, rest = s.partition(":")
    if sep and prefix in ("checkpoint", "snapshot", "seq"):
        if prefix == "seq":
            if not (rest.isascii() and rest.isdigit()) or int(rest) > _MAX_SEQ:
                raise _bad(text, "seq:N needs a whole number N")
            return AtSeq(int(rest))
        if not _POINT_NAME_RE.fullmatch(rest):
            raise _bad(text, f"{prefix}: needs a name of 1 to 128 characters without spaces")
        return AtCheckpoint(rest) if prefix == "checkpoint" else AtSnapshot(rest)
    if s[:1] in ("-", "+"):
        try:
            ago_ns = parse_duration(s[1:])
        except ValueError:
            raise _bad(text, "a relative time is a duration like -15m, -2h or -1d") from None
        if s[0] == "+":
            raise _bad(text, "a point in the future is never retained; use -15m for 15m ago")
        return AtTime(now_ns - ago_ns)
    try:
        parse_duration(s)
    except ValueError:
        pass
    else:
        raise _bad(text, f"a relative time needs a minus sign: -{s}")
    if s[:1].isdigit():
        return AtTime(parse_time(s, original=text))
    raise _bad(text, "not a time, a relative time, a checkpoint, a snapshot or a seq")


def parse_time(text: str, *, original: str | None = None) -> int:
    """Parse an ISO-8601 time with a zone into ns since the epoch, exactly (no float).

    Raises:
        UsageError: malformed, an impossible date, or no zone.
    """
    shown = text if original is None else original
    m = _ISO_RE.fullmatch(text.strip())
    if m is None:
        raise _bad(shown, "not an ISO-8601 time like 2026-11-22T03:15:00Z")
    if m["h"] is None:
        raise _bad(shown, "a date alone is ambiguous; add a time and zone: 2026-11-22T00:00:00Z")
    if m["tz"] is None:
        raise _bad(
            shown,
            "the time has no zone; add Z for UTC or an offset like +01:00 (local time "
            "is not guessed)",
        )
    try:
        tz = _zone(m["tz"])
        dt = datetime(
            int(m["y"]),
            int(m["mo"]),
            int(m["d"]),
            int(m["h"]),
            int(m["mi"]),
            int(m["s"] or 0),
            tzinfo=tz,
        )
    except ValueError as e:
        raise _bad(shown, f"not a valid time ({e})") from None
    delta = dt - _EPOCH
    frac_ns = int((m["frac"] or "").ljust(9, "0"))
    return (delta.days * 86_400 + delta.seconds) * 10**9 + frac_ns


def format_time_ns(t_ns: int) -> str:
    """Render ns since the epoch as RFC 3339 UTC (``2026-11-22T03:15:00.25Z``), exactly.

    The fraction is shown only when non-zero and without trailing zeros, so the common case
    stays short and ``parse_time(format_time_ns(t)) == t``.
    """
    secs, ns = divmod(t_ns, 10**9)
    dt = _EPOCH + timedelta(seconds=secs)
    text = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    if ns:
        text += "." + f"{ns:09d}".rstrip("0")
    return text + "Z"


def check_point_name(name: str) -> str:
    """Validate a checkpoint or snapshot name given on the command line (``--name``).

    Raises:
        UsageError: empty, longer than 128 characters, or containing spaces or controls.
    """
    if not _POINT_NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid name {name!r}: use 1 to 128 characters without spaces",
            hint="cdp checkpoint vm1-disk0 --name before-upgrade",
        )
    return name


def _zone(tz: str) -> timezone:
    if tz in ("Z", "z"):
        return UTC
    sign = -1 if tz[0] == "-" else 1
    digits = tz[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {tz} out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _bad(text: str, reason: str) -> UsageError:
    return UsageError(f'cannot read WHEN "{text}": {reason}', hint=WHEN_HINT)
