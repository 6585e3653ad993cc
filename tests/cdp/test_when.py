"""WHEN parsing: every form of the contract, refusals with a hint, exact time round trips."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.errors import UsageError
from cdp.when import (
    WHEN_HINT,
    AtCheckpoint,
    AtSeq,
    AtSnapshot,
    AtTime,
    Latest,
    When,
    check_point_name,
    format_time_ns,
    parse_time,
    parse_when,
)

NOW = 1_800_000_000 * 10**9  # 2027-01-15T08:00:00Z, a fixed "now"
T_2026 = 1_795_317_300 * 10**9  # 2026-11-22T03:15:00Z
SEC = 10**9


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T03:15:00Z", AtTime(T_2026)),
        ("2026-11-22t03:15:00z", AtTime(T_2026)),
        ("2026-11-22 03:15:00Z", AtTime(T_2026)),
        ("2026-11-22T03:15Z", AtTime(T_2026)),
        ("2026-11-22T04:15:00+01:00", AtTime(T_2026)),
        ("2026-11-21T22:15:00-0500", AtTime(T_2026)),
        ("2026-11-22T03:15:00.5Z", AtTime(T_2026 + SEC // 2)),
        ("2026-11-22T03:15:00,000000001Z", AtTime(T_2026 + 1)),
        ("-15m", AtTime(NOW - 15 * 60 * SEC)),
        ("-2h", AtTime(NOW - 2 * 3600 * SEC)),
        ("-1d", AtTime(NOW - 86_400 * SEC)),
        ("-1h30m", AtTime(NOW - 5_400 * SEC)),
        ("-0s", AtTime(NOW)),
        ("checkpoint:before-upgrade", AtCheckpoint("before-upgrade")),
        ("checkpoint:a:b", AtCheckpoint("a:b")),
        ("snapshot:2026-11-22.daily", AtSnapshot("2026-11-22.daily")),
        ("seq:0", AtSeq(0)),
        ("seq:123456", AtSeq(123456)),
        ("latest", Latest()),
        (" latest ", Latest()),
    ],
)
def test_parse_when_accepts(text: str, expected: When) -> None:
    assert parse_when(text, now_ns=NOW) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2026-11-22T03:15:00", "no zone"),
        ("2026-11-22", "date alone"),
        ("2026-02-30T00:00:00Z", "not a valid time"),
        ("2026-11-22T25:00:00Z", "not a valid time"),
        ("2026-11-22T03:15:00+24:00", "not a valid time"),
        ("2026-11-22T03:15:00.1234567891Z", "ISO-8601"),
        ("15m", "minus sign"),
        ("+15m", "future"),
        ("-15", "relative"),
        ("-fifteen", "relative"),
        ("seq:", "whole number"),
        ("seq:-1", "whole number"),
        ("seq:1.5", "whole number"),
        ("seq:٣", "whole number"),
        (f"seq:{2**63}", "whole number"),
        ("checkpoint:", "name"),
        ("checkpoint:has space", "name"),
        ("snapshot:" + "x" * 129, "name"),
        ("Latest", "not a time"),
        ("yesterday", "not a time"),
        ("", "not a time"),
    ],
)
def test_parse_when_rejects_with_hint(text: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_when(text, now_ns=NOW)
    err = info.value
    assert why in str(err)
    assert str(err).startswith(f'cannot read WHEN "{text}"')
    assert err.hint == WHEN_HINT
    assert err.exit_code == 2


def test_relative_time_uses_given_now_only() -> None:
    # Parsing is pure: the same text and now give the same point, whatever the real clock.
    assert parse_when("-15m", now_ns=0) == AtTime(-15 * 60 * SEC)
    assert parse_when("-15m", now_ns=NOW) == parse_when("-15m", now_ns=NOW)


_T_MIN = parse_time("0001-01-01T00:00:00Z")
_T_MAX = parse_time("9999-12-31T23:59:59.999999999Z")


@given(st.integers(min_value=_T_MIN, max_value=_T_MAX))
def test_time_round_trip(t_ns: int) -> None:
    assert parse_time(format_time_ns(t_ns)) == t_ns


@given(
    st.one_of(
        st.integers(min_value=_T_MIN, max_value=_T_MAX).map(AtTime),
        st.integers(min_value=0, max_value=2**63 - 1).map(AtSeq),
        st.from_regex(r"[A-Za-z0-9._:@+-]{1,128}", fullmatch=True).map(AtCheckpoint),
        st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True).map(AtSnapshot),
        st.just(Latest()),
    )
)
def test_when_str_round_trip(when: When) -> None:
    assert parse_when(str(when), now_ns=NOW) == when


@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1)),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
def test_parse_time_matches_datetime(naive: datetime, offset_min: int) -> None:
    # An independent oracle: the stdlib's own ISO rendering and arithmetic.
    dt = naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    expected_us = (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert parse_time(dt.isoformat()) == expected_us * 1000


@given(st.text())
def test_parse_when_never_raises_anything_but_usage_error(text: str) -> None:
    with contextlib.suppress(UsageError):
        parse_when(text, now_ns=NOW)


def test_format_time_examples() -> None:
    assert format_time_ns(T_2026) == "2026-11-22T03:15:00Z"
    assert format_time_ns(T_2026 + 250_000_000) == "2026-11-22T03:15:00.25Z"
    assert format_time_ns(0) == "1970-01-01T00:00:00Z"


def test_check_point_name() -> None:
    assert check_point_name("before-upgrade") == "before-upgrade"
    with pytest.raises(UsageError):
        check_point_name("two words")
    with pytest.raises(UsageError):
        check_point_name("")
