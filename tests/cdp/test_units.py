"""Unit parsers: documented examples, rejects, and exact round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.units import (
    Address,
    format_duration,
    format_rate,
    format_size,
    parse_address,
    parse_duration,
    parse_rate,
    parse_size,
)

MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("4096", 4096),
        (4096, 4096),
        ("1KiB", 1024),
        ("2TiB", 2 * 2**40),
        ("1PiB", 2**50),
        ("10B", 10),
        ("8 GiB", 8 * 2**30),
        ("5kB", 5000),
        ("3MB", 3_000_000),
        ("2GB", 2 * 10**9),
        ("1TB", 10**12),
        ("0", 0),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["eight", "8G", "8KB", "8gib", "1.5GiB", "-1GiB", "", "GiB", "8 G iB", True, -5, "16EiB"],
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match=r'^expected a size like "8GiB"'):
        parse_size(text)


def test_parse_size_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_size("8192PiB")


@given(st.integers(min_value=0, max_value=MAX))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


def test_format_size_uses_largest_exact_unit() -> None:
    assert format_size(8 * 2**30) == "8GiB"
    assert format_size(3072) == "3KiB"
    assert format_size(1536) == "1536B"
    assert format_size(0) == "0B"


@pytest.mark.parametrize(
    ("text", "expected_s"),
    [
        ("24h", 86_400),
        ("15m", 900),
        ("5s", 5),
        ("7d", 7 * 86_400),
        ("2w", 14 * 86_400),
        ("1h30m", 5_400),
        ("0", 0),
        ("0s", 0),
    ],
)
def test_parse_duration_accepts(text: str, expected_s: int) -> None:
    assert parse_duration(text) == expected_s * 10**9


def test_parse_duration_sub_second() -> None:
    assert parse_duration("500ms") == 500_000_000
    assert parse_duration("1s250ms") == 1_250_000_000
    assert parse_duration("3us") == parse_duration("3µs") == 3_000
    assert parse_duration("7ns") == 7


@pytest.mark.parametrize("text", ["", "24", "1.5h", "-5m", "1 day", "h", "5y", "1h 30m", "5M"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r'^expected a duration like "24h"'):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=MAX))
def test_duration_round_trip(ns: int) -> None:
    assert parse_duration(format_duration(ns)) == ns


def test_format_duration_examples() -> None:
    assert format_duration(5_400 * 10**9) == "1h30m"
    assert format_duration(0) == "0s"
    assert format_duration(1_500_000_000) == "1s500ms"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100Mbit", 12_500_000),
        ("100Mbit/s", 12_500_000),
        ("1Gbit", 125_000_000),
        ("8kbit", 1000),
        ("8bit", 1),
        ("50MB/s", 50_000_000),
        ("64MiB/s", 64 * 2**20),
        ("1B/s", 1),
    ],
)
def test_parse_rate_accepts(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["fast", "50MB", "100", "0Mbit", "1bit", "100Mbps", "1.5Gbit"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r'^expected a rate like "100Mbit"'):
        parse_rate(text)


@given(st.integers(min_value=1, max_value=MAX))
def test_rate_round_trip(bps: int) -> None:
    assert parse_rate(format_rate(bps)) == bps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/cdp/api.sock", Address.unix("/run/cdp/api.sock")),
        ("unix:relative.sock", Address.unix("relative.sock")),
        ("0.0.0.0:7481", Address.tcp("0.0.0.0", 7481)),
        ("127.0.0.1:1", Address.tcp("127.0.0.1", 1)),
        ("localhost:65535", Address.tcp("localhost", 65535)),
        ("dr.example:7481", Address.tcp("dr.example", 7481)),
        ("[::1]:7481", Address.tcp("::1", 7481)),
        ("[fe80::1%eth0]:7481", Address.tcp("fe80::1%eth0", 7481)),
    ],
)
def test_parse_address_accepts(text: str, expected: Address) -> None:
    addr = parse_address(text)
    assert addr == expected
    assert str(addr) == text


@pytest.mark.parametrize(
    "text",
    [
        "unix:",
        "localhost",
        ":7481",
        "::1:7481",
        "[::1]7481",
        "[nothex]:1",
        "host:0",
        "host:65536",
        "host:port",
        "host:+80",
        "host:²",
        "bad_host:80",
        "999.1.1.1:80",
        "-host:80",
        "",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected an address like"):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("unix:/run/cdp/api.sock", True),
        ("127.0.0.1:1", True),
        ("127.9.8.7:1", True),
        ("[::1]:1", True),
        ("[::ffff:127.0.0.1]:1", True),
        ("localhost:1", True),
        ("LOCALHOST.:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.0.0.1:1", False),
        ("dr.example:1", False),
        ("localhost.evil.example:1", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert parse_address(text).is_loopback() is loopback


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(_label, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not h.replace(".", "").isdigit()),
)


@given(_hosts, st.integers(min_value=1, max_value=65535))
def test_tcp_address_round_trip(host: str, port: int) -> None:
    addr = Address.tcp(host, port)
    assert parse_address(str(addr)) == addr


@given(st.text(min_size=1).filter(lambda p: "\0" not in p))
def test_unix_address_round_trip(path: str) -> None:
    addr = Address.unix(path)
    assert parse_address(str(addr)) == addr
