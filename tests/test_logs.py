"""Tests for structured logging: JSON lines, text key=value lines, fields and exceptions."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from bridge.ops.logs import configure_logging, log_event

logger = logging.getLogger("bridge.test")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_line_carries_envelope_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    log_event(logger, logging.INFO, "recipient delivered", delivery_id="d1", status=200, ok=True)
    (entry,) = json_lines(capsys.readouterr().err)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "bridge.test"
    assert entry["msg"] == "recipient delivered"
    assert entry["delivery_id"] == "d1"
    assert entry["status"] == 200
    assert entry["ok"] is True
    ts = str(entry["ts"])
    assert ts.endswith("Z") and "T" in ts


def test_json_never_crashes_on_unserialisable_values(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")

    class Opaque:
        def __str__(self) -> str:
            return "opaque-thing"

    log_event(logger, logging.WARNING, "odd values", thing=Opaque(), raw=b"\xff", items={1, 2})
    (entry,) = json_lines(capsys.readouterr().err)
    assert entry["thing"] == "opaque-thing"
    assert "xff" in str(entry["raw"])


def test_json_includes_exception(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    try:
        raise ValueError("broken webhook")
    except ValueError:
        log_event(logger, logging.ERROR, "delivery failed", exc_info=True, route="default")
        logger.exception("plain logging works too")
    first, second = json_lines(capsys.readouterr().err)
    assert "ValueError: broken webhook" in str(first["exc"])
    assert first["route"] == "default"
    assert "Traceback" in str(second["exc"])


def test_json_keeps_standard_extra_and_protects_envelope_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    logger.info("stdlib extra", extra={"peer": "127.0.0.1"})
    log_event(logger, logging.INFO, "real message", msg="a field named msg", level=3)
    first, second = json_lines(capsys.readouterr().err)
    assert first["peer"] == "127.0.0.1"
    assert second["msg"] == "real message"
    assert second["msg_"] == "a field named msg"
    assert (second["level"], second["level_"]) == ("INFO", 3)


def test_text_format_has_key_value_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "DEBUG")
    log_event(logger, logging.INFO, "recipient deferred", reply="451 4.3.0 busy", status=503)
    line = capsys.readouterr().err.strip()
    ts, level, name, rest = line.split(" ", 3)
    assert ts.endswith("Z")
    assert (level, name) == ("INFO", "bridge.test")
    assert rest.startswith("recipient deferred ")
    assert 'reply="451 4.3.0 busy"' in rest
    assert "status=503" in rest


def test_text_format_cannot_be_split_by_newlines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "INFO")
    log_event(logger, logging.INFO, "subject\nFAKE line", value="a\nb")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_text_format_prints_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "INFO")
    try:
        raise KeyError("missing")
    except KeyError:
        log_event(logger, logging.ERROR, "failed", exc_info=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'missing'" in err


def test_level_filters_and_reconfiguring_replaces_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "WARNING")
    configure_logging("json", "warning")
    log_event(logger, logging.INFO, "hidden")
    log_event(logger, logging.WARNING, "shown")
    entries = json_lines(capsys.readouterr().err)
    assert [e["msg"] for e in entries] == ["shown"]


def test_default_format_is_json_when_stderr_is_not_a_tty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(None, "INFO")  # captured stderr is not a TTY
    log_event(logger, logging.INFO, "hello")
    assert json_lines(capsys.readouterr().err)[0]["msg"] == "hello"


def test_bad_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml", "INFO")
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "LOUD")
