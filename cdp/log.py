"""Logging setup: one stdlib handler with a text or JSON formatter, chosen in config.

Code logs through ``logging.getLogger(__name__)`` (per-instance ``getChild``), with ``%s``
arguments and context passed as ``extra=`` fields whose names are stable across releases:
``volume``, ``group``, ``job``, ``seq``, ``peer``, ``bid``, ``err``. Scripts and log shippers
key on those names, so renaming one is a breaking change.

JSON lines always start with ``ts`` (RFC 3339 UTC, microseconds), ``level`` (lower case),
``logger`` and ``msg``; extra fields follow in sorted order, then ``exc`` (a traceback) when
there is one. Text lines carry the same content as ``ts LEVEL logger: msg key=value ...``.

Two safety rules live here so no call site can forget them: bytes-like values are replaced by
their length (block payloads never reach a log), and values that JSON cannot carry are logged
as ``str()``. Secrets must simply never be passed to a logger.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Final, Literal, TextIO

__all__ = ["JsonFormatter", "LogFormat", "TextFormatter", "setup_logging"]

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Keys the JSON envelope owns; an extra field with one of these names is prefixed with "x_".
_ENVELOPE: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def _extras(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD_ATTRS or key.startswith("_"):
            continue
        fields[f"x_{key}" if key in _ENVELOPE else key] = _safe(value)
    return dict(sorted(fields.items()))


def _safe(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)


def _timestamp(record: logging.LogRecord) -> str:
    dt = datetime.fromtimestamp(record.created, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the stable keys described in the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg key=value ...`` for people reading a terminal or the journal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        for key, value in _extras(record).items():
            line += f" {key}={_text_value(value)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: object) -> str:
    # Quote only when needed, so "volume=vm1-disk0 seq=42" stays greppable.
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=' for c in value):
            return value
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value)


class _CdpHandler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    format: LogFormat,
    level: str | int,
    stream: TextIO,
    *,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Send log records at *level* and above to *stream*, formatted as *format*.

    Configures *logger* (the root logger by default, which is process state by nature; the
    daemon calls this once at start). Calling again replaces the handler a previous call
    installed instead of adding a second one. Returns the handler so tests can remove it.

    Raises:
        ValueError: unknown format or level name.
    """
    formatter: logging.Formatter
    if format == "json":
        formatter = JsonFormatter()
    elif format == "text":
        formatter = TextFormatter()
    else:
        raise ValueError(f'log format must be "text" or "json", not {format!r}')
    if isinstance(level, str):
        numeric = logging.getLevelNamesMapping().get(level.upper())
        if numeric is None:
            raise ValueError(f"unknown log level {level!r}")
        level = numeric
    target = logger if logger is not None else logging.getLogger()
    for old in [h for h in target.handlers if isinstance(h, _CdpHandler)]:
        target.removeHandler(old)
    handler = _CdpHandler(stream)
    handler.setFormatter(formatter)
    target.addHandler(handler)
    target.setLevel(level)
    return handler
