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

# A message is worked on inline only when it is at most INLINE_MAX bytes, its header block at
# most INLINE_HEAD bytes and INLINE_HEAD_LINES lines, it is not multipart (nor a message/*),
# its charset is a common one, and its header block holds no more than a few of what makes
# the email package's header parser slow (encoded-words, addresses, comments, quoted
# strings): tests/test_content.py holds each hostile shape of issue 15, however small, off
# the loop.
INLINE_MAX = 16 * 1024
INLINE_HEAD = 4 * 1024
INLINE_HEAD_LINES = 48
_INLINE_MARKS = (
    (b"=?", 4),  # RFC 2047 encoded-words
    (b"*=", 0),  # RFC 2231 parameters
    (b"@", 16),
    (b",", 16),
    (b"(", 8),
    (b'"', 16),
    (b"\\", 4),
)
_INLINE_CHARSETS = frozenset(
    b"us-ascii utf-8 utf8 iso-8859-1 iso-8859-15 latin1 windows-1252 ascii".split()
)
_CHARSET = re.compile(rb'charset\s*=\s*"?([^"\s;]*)')


def is_light(message: MessageBuffer) -> bool:
    """True when ``message`` is small and plain enough to parse and render on the event loop
    (a few counts over at most INLINE_HEAD bytes: about a microsecond)."""
    if message.spooled or message.size > INLINE_MAX:
        return False
    data = message.getvalue()
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    if len(head) > INLINE_HEAD or head.count(b"\n") > INLINE_HEAD_LINES:
        return False
    if any(head.count(mark) > most for mark, most in _INLINE_MARKS):
        return False
    lowered = head.lower()
    if b"multipart" in lowered or b"message/" in lowered:
        return False
    return all(charset in _INLINE_CHARSETS for charset in _CHARSET.findall(lowered))


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
