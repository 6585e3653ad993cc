"""Structured logging: JSON lines parse, carry stable keys and extra fields, never payloads."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from cdp.log import setup_logging


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    # A private logger, so the test neither depends on nor disturbs the root logger.
    log = logging.getLogger("cdp.test.log")
    log.propagate = False
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)


def test_json_line_parses_with_stable_keys_and_extras(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("json", "info", out, logger=logger)
    logger.info("appended %d records", 3, extra={"volume": "vm1-disk0", "seq": 42, "peer": "dr1"})
    doc = json.loads(out.getvalue())
    assert list(doc)[:4] == ["ts", "level", "logger", "msg"]
    assert doc["level"] == "info"
    assert doc["logger"] == "cdp.test.log"
    assert doc["msg"] == "appended 3 records"
    assert doc["volume"] == "vm1-disk0"
    assert doc["seq"] == 42
    assert doc["peer"] == "dr1"
    assert doc["ts"].endswith("Z")


def test_json_exception_and_err_field(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("json", "debug", out, logger=logger)
    try:
        raise OSError(5, "Input/output error")
    except OSError as e:
        logger.exception("read failed", extra={"err": e})
    doc = json.loads(out.getvalue())
    assert doc["err"] == "OSError: [Errno 5] Input/output error"
    assert "Traceback" in doc["exc"]


def test_block_payloads_never_logged(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("json", "info", out, logger=logger)
    logger.info("write", extra={"data": b"secret block contents"})
    assert "secret" not in out.getvalue()
    assert json.loads(out.getvalue())["data"] == "<21 bytes>"


def test_extra_cannot_overwrite_envelope(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("json", "info", out, logger=logger)
    logger.info("hello", extra={"level": "fake", "ts": 0})
    doc = json.loads(out.getvalue())
    assert doc["level"] == "info"
    assert doc["x_level"] == "fake"


def test_level_filters(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("text", "warning", out, logger=logger)
    logger.info("quiet")
    logger.warning("loud")
    assert "quiet" not in out.getvalue()
    assert "loud" in out.getvalue()


def test_text_format_has_key_values(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("text", "info", out, logger=logger)
    logger.info("shipped", extra={"peer": "dr1", "seq": 7, "err": "two words"})
    line = out.getvalue().strip()
    assert " INFO cdp.test.log: shipped " in line
    assert 'err="two words" peer=dr1 seq=7' in line


def test_setup_twice_replaces_handler(logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    old = setup_logging("text", "info", first, logger=logger)
    new = setup_logging("json", "info", second, logger=logger)
    logger.info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "once"
    assert old not in logger.handlers
    assert new in logger.handlers


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "chatty")])
def test_setup_rejects_unknown(logger: logging.Logger, fmt: str, level: str) -> None:
    with pytest.raises(ValueError):
        setup_logging(fmt, level, io.StringIO(), logger=logger)  # type: ignore[arg-type]
