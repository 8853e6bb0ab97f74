"""Memory freed by big messages given back to the system (glibc's ``malloc_trim``).

glibc keeps freed heap memory for reuse: 100 sessions that each held 1 MB of DATA left the
process 100 MiB bigger after they had all closed (a message arrives as 64 KiB pieces, below
the size malloc serves from mmap, interleaved with long-lived objects on the heap). Whoever
drops much memory calls ``released(nbytes)``; ``trim_forever`` (a task of the app) gives the
free pages back once a second at most, when at least TRIM_AFTER bytes were released since.
Without glibc (musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import trio

TRIM_AFTER = 8 << 20  # bytes released before a trim is worth its cost
TRIM_EVERY = 1.0  # seconds between two trims at most

_released = 0


def _find_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim  # ctypes releases the GIL in the call
    except (OSError, AttributeError):
        return None
    return trim


_trim = _find_trim()


def released(nbytes: int) -> None:
    """Note that ``nbytes`` of memory were just freed (any thread)."""
    global _released
    _released += nbytes


def pending() -> int:
    """Bytes released since the last trim."""
    return _released


def trim() -> bool:
    """Give free heap pages back to the system now (blocking; glibc only). True if done."""
    global _released
    _released = 0
    if _trim is None:
        return False
    _trim(0)
    return True


async def trim_forever() -> None:
    """Trim when enough memory was released, at most every TRIM_EVERY seconds, in a thread
    (malloc_trim walks the free lists of the whole heap)."""
    while True:
        await trio.sleep(TRIM_EVERY)
        if _released >= TRIM_AFTER:
            await trio.to_thread.run_sync(trim)
