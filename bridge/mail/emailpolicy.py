"""The email package as the parse uses it: the policy (8-bit headers read as UTF-8), a header
registry that builds each header class once, and the feed parser fed in slices.
"""

from __future__ import annotations

from email.feedparser import BytesFeedParser
from email.headerregistry import HeaderRegistry
from email.message import Message
from email.policy import EmailPolicy
from typing import Any

from bridge.mail.charsets import _decode_8bit

# Memory: the parser is fed this many bytes at a time (never the whole message as one str).
_FEED = 64 * 1024


class _MailPolicy(EmailPolicy):
    """``email.policy.default``, but 8-bit header bytes are read as UTF-8 (else Latin-1).

    Postfix passes raw UTF-8 headers; the stock policy keeps them as surrogate escapes,
    which would leak into addresses and file names.
    """

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        if not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value):
            value = _decode_8bit(value.encode("utf-8", "surrogateescape"))
        return name, value

    def header_fetch_parse(self, name: str, value: str) -> Any:
        try:
            return super().header_fetch_parse(name, value)
        except Exception:
            # The stdlib header parser has crashes on hostile input (e.g. a trailing "charset*"
            # in Content-Type); keep the MIME type and drop the parameters, or keep the text.
            head = value.partition(";")[0]
            if name.lower().startswith("content-") and head != value:
                try:
                    return super().header_fetch_parse(name, head)
                except Exception:
                    pass
            return _UNSTRUCTURED(name, " ".join(value.split()))


class _Registry(HeaderRegistry):
    """The stdlib header registry, but the header class for a name is built once: the stock
    ``__getitem__`` creates a new class (``type(...)``) for every header of every message,
    which was a third of the MIME parse of a small message."""

    def __init__(self, use_default_map: bool = True) -> None:
        super().__init__(use_default_map=use_default_map)
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            if len(self._classes) >= 1024:  # header names are the sender's choice: bounded
                self._classes.clear()
            cls = self._classes[key] = super().__getitem__(name)
        return cls


_UNSTRUCTURED = _Registry(use_default_map=False)
_HEADER_CLASSES = _Registry()
_POLICY = _MailPolicy(header_factory=_HEADER_CLASSES)
# For re-serialising an attached message/rfc822 part.
_GENERATOR_POLICY = _POLICY.clone(linesep="\r\n", utf8=True)


def _feed(data: bytes) -> Message:
    # As BytesParser.parsebytes(), which first decodes the whole message into one str.
    parser = BytesFeedParser(policy=_POLICY)
    view = memoryview(data)
    for i in range(0, len(view), _FEED):
        parser.feed(bytes(view[i : i + _FEED]))
    return parser.close()
