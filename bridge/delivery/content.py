"""Where a message's content work runs (its parse, each recipient's request body and signature):
on the event loop for a small plain message, else in a worker thread, a bounded number at once.

The event loop serves every session and /healthz; a parse it waits for stalls all of them. A
small message with nothing that could make the parse slow costs tens of microseconds on the
loop, less than the hop to a thread and back. Anything else goes to a thread: the parse is
pure Python, so it shares the GIL with the loop in 5 ms slices (the loop runs slower, never
stops). A process pool would make a runaway parse killable, but would copy each message and
its parsed fields across, and the parse is bounded by its own limits (bridge/mail) instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import trio

from bridge.base.transaction import MessageBuffer

T = TypeVar("T")

# A message is light (worked on inline) only when it is in memory, at most LIGHT_MAX bytes,
# its header block at most LIGHT_HEAD bytes and LIGHT_HEAD_LINES lines, it is not multipart
# (nor a message/*), its charset is a common one, its header block holds no more than a few
# of what makes the email package's header parser slow (encoded-words, RFC 2231 parameters,
# addresses, comments, quoted strings), and a body over LIGHT_DECODED bytes has no transfer
# encoding to undo. Then its parse is linear and short: about 1 ms for the benchmark's 256
# KiB message, at worst ~30 ms for 512 KiB of UTF-8 on a loaded 2-core machine, against 0.1
# ms for the hop to a thread and back plus the loop's waits for the GIL while a thread works.
# tests/test_content.py holds each hostile shape of issue 15, however small, off the loop.
LIGHT_MAX = 512 * 1024
LIGHT_DECODED = 64 * 1024
LIGHT_HEAD = 4 * 1024
LIGHT_HEAD_LINES = 48
_LIGHT_MARKS = (
    (b"=?", 4),  # RFC 2047 encoded-words
    (b"*=", 0),  # RFC 2231 parameters
    (b"@", 16),
    (b",", 16),
    (b"(", 8),
    (b'"', 16),
    (b"\\", 4),
)
_LIGHT_CHARSETS = frozenset(
    b"us-ascii ascii utf-8 utf8 iso-8859-1 iso-8859-15 latin1 windows-1252".split()
)
_VERBATIM = frozenset((b"7bit", b"8bit", b"binary"))
_CHARSET = re.compile(rb'charset\s*=\s*"?([^"\s;]*)')
_ENCODING = re.compile(rb"content-transfer-encoding\s*:\s*([^\s;]*)")


def is_light(message: MessageBuffer) -> bool:
    """True when ``message`` is small and plain enough to parse and render on the event loop
    (a few counts over at most LIGHT_HEAD bytes: about a microsecond)."""
    if message.spooled or message.size > LIGHT_MAX:
        return False
    data = message.getvalue()
    end = data.find(b"\r\n\r\n", 0, LIGHT_HEAD + 2)
    head = data[: LIGHT_HEAD + 1] if end < 0 else data[: end + 2]
    if len(head) > LIGHT_HEAD or head.count(b"\n") > LIGHT_HEAD_LINES:
        return False
    if any(head.count(mark) > most for mark, most in _LIGHT_MARKS):
        return False
    lowered = head.lower()
    if b"multipart" in lowered or b"message/" in lowered:
        return False
    if not all(charset in _LIGHT_CHARSETS for charset in _CHARSET.findall(lowered)):
        return False
    return message.size <= LIGHT_DECODED or all(
        encoding in _VERBATIM for encoding in _ENCODING.findall(lowered)
    )


class ContentWork:
    """Runs content work inline or in a worker thread, at most ``threads`` threads at once
    (each holds a message's parse in memory: the bound is also one on memory)."""

    def __init__(self, threads: int) -> None:
        self.limiter = trio.CapacityLimiter(threads)

    async def run(self, inline: bool, work: Callable[..., T], *args: object) -> T:
        """``work(*args)``, on the loop when ``inline``, else in a thread; a cancelled caller
        waits for the thread to finish (the parse limits bound how long)."""
        if inline:
            return work(*args)
        return await trio.to_thread.run_sync(work, *args, limiter=self.limiter)
