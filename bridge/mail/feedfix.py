"""One fix to the stdlib feed parser: its end-of-line regex, which scanned a whole part.

``email.feedparser`` trims the line end of each part's payload with
``NLCRE_eol.search(payload)``, the regex ``(\\r\\n|\\r|\\n)\\Z``: a search tries it at every
position of the payload, so a 24 MiB attachment costs ~0.15 s in one C call that holds the
GIL, and the event loop (a worker thread parses it) stalls that long. ``install()`` puts in
its place an object whose ``search`` looks at the end of the string only, with the same result.
"""

from __future__ import annotations

from email import feedparser


class _LineEnd:
    """What the feed parser uses of the regex's match: ``group(0)``."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def group(self, index: int = 0) -> str:
        if index != 0:
            raise IndexError("no such group")
        return self._text


class _EndOfLineAtEnd:
    """``re.compile(r"(\\r\\n|\\r|\\n)\\Z").search``, but in constant time."""

    def search(self, text: str) -> _LineEnd | None:
        for end in ("\r\n", "\r", "\n"):  # the leftmost match is the longest ending
            if text.endswith(end):
                return _LineEnd(end)
        return None


def install() -> None:
    """Replace ``email.feedparser.NLCRE_eol`` (idempotent)."""
    feedparser.NLCRE_eol = _EndOfLineAtEnd()  # type: ignore[attr-defined]
