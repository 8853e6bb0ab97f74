"""What a log line may say about a message to find it again: its Message-ID and the MTA's queue
id, bounded and reduced to printable ASCII (both come from the sender or the MTA: hostile)."""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_HEAD_SCAN = 64 * 1024  # bytes of the message searched for the Message-ID field
MAX_LOG_ID = 128  # characters of an id in a log line

_MESSAGE_ID_FIELD = re.compile(rb"(?:^|\n)message-id[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.I)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_NOT_VISIBLE = re.compile(r"[^\x21-\x7e]+")


def log_id(value: str | None) -> str | None:
    """``value`` without spaces, controls or non-ASCII, cut to MAX_LOG_ID; None if empty."""
    if not value:
        return None
    clean = _NOT_VISIBLE.sub("", value)
    if len(clean) > MAX_LOG_ID:
        clean = clean[: MAX_LOG_ID - 3] + "..."
    return clean or None


def message_id_for_log(chunks: Iterable[bytes]) -> str | None:
    """The first Message-ID field of the header block (within MAX_HEAD_SCAN bytes), for logs."""
    head = bytearray()
    for chunk in chunks:
        head += chunk[: MAX_HEAD_SCAN - len(head)]
        if len(head) >= MAX_HEAD_SCAN or _HEADER_END.search(head):
            break
    end = _HEADER_END.search(head)
    block = bytes(head[: end.start()] if end else head)
    found = _MESSAGE_ID_FIELD.search(block)
    if found is None:
        return None
    return log_id(found.group(1).decode("latin-1"))
