"""Parsers for the unit-bearing strings that config files and the command line share.

Sizes, durations, rates and addresses are written the same way everywhere (design brief,
"User-facing contract"), so they are parsed in one place and every caller gets the same error
text. Each parser is pure, takes the text as written and raises ``ValueError`` whose message
starts with what was expected (``expected a size like "8GiB"``); callers add the location and
the value given (``ConfigError``, ``UsageError``), so the messages here never repeat the input.

Results are plain integers with the unit in the caller's name (``size_bytes``,
``interval_ns``, ``rate_bps``), because integers compare and add exactly and survive JSON.

Grammar (numbers are non-negative decimal integers; no fractions, use a smaller unit):

* size: ``N`` or ``N<unit>`` with binary units ``B KiB MiB GiB TiB PiB`` (powers of 1024) or
  decimal units ``kB MB GB TB`` (powers of 1000, as disk vendors count). ``K``, ``M``, ``G``,
  ``KB`` and friends are rejected because nobody agrees on what they mean.
* duration: one or more ``N<unit>`` parts, units ``ns us ms s m h d w`` (``"1h30m"``);
  ``"0"`` alone is zero. Weeks are 7 days; there are no months or years (not fixed lengths).
* rate: bits per second ``N<unit>`` or ``N<unit>/s`` with ``bit kbit Mbit Gbit Tbit`` (powers
  of 1000, as networks count), or bytes per second ``N<unit>/s`` with any size unit
  (``"50MB/s"``, ``"64MiB/s"``); the ``/s`` is required for bytes so a rate never reads as a
  size. The result is whole bytes per second, rounded down, and must be at least 1.
* address: ``unix:PATH`` or ``HOST:PORT`` where HOST is an IPv4 address, a hostname or a
  bracketed IPv6 address (``[::1]:7481``); PORT is 1-65535.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "Address",
    "format_duration",
    "format_rate",
    "format_size",
    "parse_address",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

# Sizes above this do not fit the 64-bit signed integers SQLite and msgpack carry.
_MAX_INT: Final = 2**63 - 1

_BINARY: Final = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50}
_DECIMAL: Final = {"kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS: Final = {"": 1, "B": 1, **_BINARY, **_DECIMAL}

_SIZE_RE: Final = re.compile(r"([0-9]+) ?([A-Za-z]*)")
SIZE_EXPECTED: Final = 'expected a size like "8GiB"'


def parse_size(text: str | int) -> int:
    """Return the size in bytes that *text* names (``"8GiB"`` -> 8589934592).

    A bare integer (TOML ``size = 4096`` or the string ``"4096"``) is bytes. Zero is allowed
    here; callers that need a positive size check that themselves.

    Raises:
        ValueError: not a size, an unknown unit, or larger than 2**63-1 bytes.
    """
    if isinstance(text, bool):
        raise ValueError(SIZE_EXPECTED)
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(SIZE_EXPECTED)
        number, unit = m.groups()
        mult = _SIZE_UNITS.get(unit)
        if mult is None:
            raise ValueError(
                f"{SIZE_EXPECTED}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, PiB, "
                "or kB, MB, GB, TB)"
            )
        value = int(number) * mult
    if value < 0:
        raise ValueError(f"{SIZE_EXPECTED}: a size cannot be negative")
    if value > _MAX_INT:
        raise ValueError(f"{SIZE_EXPECTED}: too large (at most 8 EiB)")
    return value


def format_size(size_bytes: int) -> str:
    """Render *size_bytes* exactly, in the largest binary unit that divides it.

    ``parse_size(format_size(n)) == n`` for every valid size, which is what status output and
    generated configs need; a rounded "7.9GiB" would not read back as the same volume.
    """
    if size_bytes < 0:
        raise ValueError("a size cannot be negative")
    for unit, mult in reversed(_BINARY.items()):
        if size_bytes and size_bytes % mult == 0:
            return f"{size_bytes // mult}{unit}"
    return f"{size_bytes}B"


_NS: Final = {
    "w": 7 * 86_400 * 10**9,
    "d": 86_400 * 10**9,
    "h": 3_600 * 10**9,
    "m": 60 * 10**9,
    "s": 10**9,
    "ms": 10**6,
    "us": 10**3,
    "µs": 10**3,
    "ns": 1,
}
_DURATION_PART_RE: Final = re.compile(r"([0-9]+)(ns|us|µs|ms|s|m|h|d|w)")
DURATION_EXPECTED: Final = 'expected a duration like "24h", "15m" or "500ms"'


def parse_duration(text: str) -> int:
    """Return the duration in nanoseconds that *text* names (``"1h30m"`` -> 5.4e12 ns).

    Durations are never negative here; ``cdp.when`` handles the leading ``-`` of relative
    times itself, so a negative retention or interval cannot slip through a config.

    Raises:
        ValueError: empty, a missing or unknown unit, a fraction, or too large.
    """
    if not isinstance(text, str):
        raise ValueError(DURATION_EXPECTED)
    s = text.strip()
    if s == "0":
        return 0
    pos = 0
    total = 0
    while pos < len(s):
        m = _DURATION_PART_RE.match(s, pos)
        if m is None:
            raise ValueError(DURATION_EXPECTED)
        total += int(m.group(1)) * _NS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(DURATION_EXPECTED)
    if total > _MAX_INT:
        raise ValueError(f"{DURATION_EXPECTED}: too large")
    return total


_FORMAT_DURATION_UNITS: Final = (
    ("d", _NS["d"]),
    ("h", _NS["h"]),
    ("m", _NS["m"]),
    ("s", _NS["s"]),
    ("ms", _NS["ms"]),
    ("us", _NS["us"]),
    ("ns", 1),
)


def format_duration(ns: int) -> str:
    """Render *ns* exactly, largest unit first (``5400000000000`` -> ``"1h30m"``)."""
    if ns < 0:
        raise ValueError("a duration cannot be negative")
    if ns == 0:
        return "0s"
    parts = []
    rest = ns
    for unit, mult in _FORMAT_DURATION_UNITS:
        if rest >= mult:
            parts.append(f"{rest // mult}{unit}")
            rest %= mult
    return "".join(parts)


_BIT_UNITS: Final = {"bit": 1, "kbit": 10**3, "Mbit": 10**6, "Gbit": 10**9, "Tbit": 10**12}
_RATE_RE: Final = re.compile(r"([0-9]+) ?([A-Za-z]+)(/s)?")
RATE_EXPECTED: Final = 'expected a rate like "100Mbit" or "50MB/s"'


def parse_rate(text: str) -> int:
    """Return the rate in bytes per second that *text* names (``"100Mbit"`` -> 12500000).

    Bits are what network links are sold in, bytes per second what disks are; both are
    accepted, and converted to bytes because every limiter in cdp counts bytes.

    Raises:
        ValueError: not a rate, an unknown unit, a byte unit without ``/s``, or below 1 B/s.
    """
    if not isinstance(text, str):
        raise ValueError(RATE_EXPECTED)
    m = _RATE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(RATE_EXPECTED)
    number, unit, per_s = m.groups()
    n = int(number)
    if unit in _BIT_UNITS:
        rate = n * _BIT_UNITS[unit] // 8
    elif unit in _SIZE_UNITS and unit:
        if per_s is None:
            raise ValueError(f'{RATE_EXPECTED}: a byte rate needs "/s" ("{n}{unit}/s")')
        rate = n * _SIZE_UNITS[unit]
    else:
        raise ValueError(
            f"{RATE_EXPECTED}: unknown unit {unit!r} (use bit, kbit, Mbit, Gbit, Tbit, "
            "or B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)"
        )
    if rate < 1:
        raise ValueError(f"{RATE_EXPECTED}: must be at least 1 byte per second")
    if rate > _MAX_INT:
        raise ValueError(f"{RATE_EXPECTED}: too large")
    return rate


def format_rate(rate_bps: int) -> str:
    """Render *rate_bps* exactly as bytes per second in the largest unit that divides it."""
    if rate_bps < 1:
        raise ValueError("a rate must be at least 1 byte per second")
    units = sorted({**_BINARY, **_DECIMAL}.items(), key=lambda kv: kv[1], reverse=True)
    for unit, mult in units:
        if rate_bps % mult == 0:
            return f"{rate_bps // mult}{unit}/s"
    return f"{rate_bps}B/s"


# RFC 1123 hostname: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
ADDRESS_EXPECTED: Final = 'expected an address like "unix:/run/cdp/api.sock" or "127.0.0.1:7481"'


@dataclass(frozen=True, slots=True)
class Address:
    """Where a socket listens or connects: a unix socket path or a TCP host and port.

    One type for both because every place that takes an address (API, NBD listen, QMP,
    receiver) accepts either. Build with :meth:`unix` / :meth:`tcp` or :func:`parse_address`;
    ``str(addr)`` gives back the written form, so ``parse_address(str(a)) == a``.
    """

    kind: Literal["unix", "tcp"]
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        # Internal invariant: parse_address and the constructors only build these two shapes.
        if self.kind == "unix":
            assert self.path and self.host is None and self.port is None, self
        else:
            assert self.path is None and self.host and self.port is not None, self

    @classmethod
    def unix(cls, path: str) -> Address:
        return cls(kind="unix", path=path)

    @classmethod
    def tcp(cls, host: str, port: int) -> Address:
        return cls(kind="tcp", host=host, port=port)

    def is_loopback(self) -> bool:
        """True when only this host can reach the address.

        Unix sockets count as loopback (they never leave the host; file modes guard them).
        For TCP this is decided from the text alone, without DNS: ``localhost``, 127.0.0.0/8
        and ``::1`` (also IPv4-mapped) are loopback; any other hostname is not, because a
        name's resolution can change after the check.
        """
        if self.kind == "unix":
            return True
        assert self.host is not None
        if self.host.lower().rstrip(".") == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.is_loopback
        return ip.is_loopback

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH`` or ``HOST:PORT`` (``[V6]:PORT`` for IPv6) into an :class:`Address`.

    The path of a unix address is returned as written; resolving a relative path is the
    caller's job (config resolves against the config file's folder).

    Raises:
        ValueError: anything else, including an empty host (write ``0.0.0.0`` to mean all
        interfaces, so listening on the network is never an accident) and unbracketed IPv6.
    """
    if not isinstance(text, str):
        raise ValueError(ADDRESS_EXPECTED)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or "\0" in path:
            raise ValueError(f"{ADDRESS_EXPECTED}: a unix address needs a path")
        return Address.unix(path)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{ADDRESS_EXPECTED}: an IPv6 address is written [::1]:7481")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{ADDRESS_EXPECTED}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(ADDRESS_EXPECTED)
        if ":" in host:
            raise ValueError(f"{ADDRESS_EXPECTED}: an IPv6 address is written [::1]:7481")
        if not _is_hostname(host):
            raise ValueError(f"{ADDRESS_EXPECTED}: {host!r} is not a host name or address")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{ADDRESS_EXPECTED}: the port must be a number from 1 to 65535")
    return Address.tcp(host, int(port_text))


def _is_hostname(host: str) -> bool:
    """True for an RFC 1123 host name or a dotted-quad IPv4 address."""
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        # Looks numeric, so it must be a real IPv4 address ("999.1.1.1" is a typo, not a name).
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)
