"""Structured logging on the standard library: one JSON object or one key=value line per event.
`configure_logging()` installs the stderr handler at start-up; `log_event()` attaches fields.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

FORMATS = ("json", "text")

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", "fields"}
)
_RESERVED_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")


def log_event(
    logger: logging.Logger,
    level: int,
    msg: str,
    /,
    *,
    exc_info: bool | BaseException = False,
    **fields: object,
) -> None:
    """Log `msg` with `fields` as structured key/values that both formats print."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra={"fields": fields}, stacklevel=2)


def configure_logging(fmt: str | None, level: str) -> None:
    """Send every log record to stderr as `fmt` ("json", "text", None: text on a TTY else json).

    Calling it again replaces the handler installed before. Raises ValueError for an unknown
    format or level name.
    """
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    level_number = logging.getLevelNamesMapping().get(level.upper())
    if level_number is None:
        raise ValueError(f"unknown log level {level!r}")

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level_number)
    logging.captureWarnings(True)
    # httpx logs every request URL at INFO; a URL may carry a token, and we log outcomes ourselves.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level_number, logging.WARNING))


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of a record: `log_event` fields plus any other `extra=` keys."""
    fields: dict[str, object] = {}
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
            fields[key] = value
    attached = getattr(record, "fields", None)
    if isinstance(attached, dict):
        fields.update(attached)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the fields, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            # A field never hides the envelope keys; it is kept under a suffixed name instead.
            entry[f"{key}_" if key in _RESERVED_KEYS else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`ts level logger msg key=value ...`, with the traceback on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, _escape(record.getMessage())]
        parts.extend(f"{key}={_text_value(value)}" for key, value in record_fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _escape(text: str) -> str:
    # A line break in a message must not forge a second log line.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: object) -> str:
    text = str(value)
    if text and not any(c.isspace() or c in '"=' or not c.isprintable() for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever `sys.stderr` is at the time of the record (test capture, redirects)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass
