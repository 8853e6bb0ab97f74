"""The email package as the parse uses it: the policy (8-bit headers read as UTF-8), a header
registry that builds each header class once, and the feed parser fed in slices.
"""

from __future__ import annotations

import functools
import re
from email import feedparser
from email.feedparser import BytesFeedParser
from email.headerregistry import AddressHeader, HeaderRegistry, UnstructuredHeader
from email.message import Message
from email.policy import EmailPolicy
from typing import Any

from bridge.mail import feedfix
from bridge.mail import limits as parse_limits
from bridge.mail.charsets import _decode_8bit
from bridge.mail.linear import cheap_mailbox, decode_words, simple_mailbox, split_addresses, unfold

# Memory: the parser is fed this many bytes at a time (never the whole message as one str);
# the limits are checked after each.
_FEED = 16 * 1024
# A line the feed parser takes as part of a header block (its headerRE).
_HEADER_LINE = re.compile(r"^(From |[\041-\071\073-\176]*:|[\t ])")
_BufferedSubFile: Any = getattr(feedparser, "BufferedSubFile")  # noqa: B009 (not in the stubs)
feedfix.install()  # its end-of-line search no longer scans a whole part, GIL held


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
        if hasattr(value, "name"):  # a header object already: returned as it is
            return value
        state = parse_limits.current()
        key = (name, value)
        found = state.headers.get(key)
        if found is None:
            found = self._fetch_bounded(name, value, state)
            if len(state.headers) < _CACHED_HEADERS:
                state.headers[key] = found
        return found

    def _fetch_bounded(self, name: str, value: str, state: parse_limits.ParseState) -> Any:
        bounded = _bounded(name, value, state)
        if not isinstance(bounded, str):
            return bounded
        value = bounded
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


# --- what the stdlib header parser is given ----------------------------------------------
# Its parsers copy the rest of the value for each token: a Subject of 16,000 encoded-words
# took 2.5 GiB, a To: of 25,000 addresses with a comment 10-33 s. Values past these sizes
# take the linear readers (bridge/mail/linear.py) instead; the limits (ParseLimits) say how
# much of a value is read at all. Below them the stdlib costs a few ms at most.
_STDLIB_CHARS = 8 * 1024  # a value longer than this never goes to the stdlib whole
# nor a structured one (Content-Type, ...) longer than this: 8 KiB of parameters took 100 ms;
# a 255-character CJK file name in RFC 2231 form is ~2.3 KiB
_STDLIB_STRUCTURED_CHARS = 4 * 1024
_STDLIB_WORDS = 32  # nor one with more encoded-words ("=?") than this
_STDLIB_ADDRESS_CHARS = 2 * 1024  # nor an address list longer than this (~0.1 ms an address)
_ITEM_CHARS = 1024  # one mailbox of a long list: the stdlib reads it up to this size
_CACHED_HEADERS = 4096  # header objects kept for reuse within one message's parse


class _LinearHeader(str):
    """A header read by the linear readers: its text, with the attributes the parse reads."""

    name: str
    defects: tuple[Exception, ...] = ()
    addresses: tuple[Any, ...] = ()


def _linear_header(name: str, text: str, addresses: tuple[Any, ...] = ()) -> _LinearHeader:
    header = _LinearHeader(text)
    header.name = name
    header.addresses = addresses
    return header


@functools.lru_cache(maxsize=1024)  # header names are the sender's choice: bounded
def header_kind(name: str) -> str:
    """ "text" (unstructured), "address" or "other" (the structured rest) for a header name."""
    cls = _HEADER_CLASSES[name]
    if issubclass(cls, UnstructuredHeader):
        return "text"
    if issubclass(cls, AddressHeader):
        return "address"
    return "other"


def _bounded(name: str, value: str, state: parse_limits.ParseState) -> str | _LinearHeader:
    """The value the stdlib may parse (cut to max_header_bytes), or the header read without
    it when it is too long or has too many encoded-words for the stdlib's parsers."""
    limits = state.limits
    value = unfold(value)
    if len(value) > limits.max_header_bytes:
        state.hit(
            name,
            "max_header_bytes",
            f"{len(value)} characters cut to {limits.max_header_bytes}",
        )
        value = value[: limits.max_header_bytes]
    words = value.count("=?")
    kind = header_kind(name)
    if kind == "address":
        if (
            len(value) > _STDLIB_ADDRESS_CHARS
            or words > _STDLIB_WORDS
            or value.count(",") >= limits.max_addresses_per_header
        ):
            return _address_header(name, value, state)
        return value
    if kind == "text":
        if len(value) <= _STDLIB_CHARS and words <= _STDLIB_WORDS:
            return value
        return _linear_header(name, _decoded(name, value, state))
    if len(value) <= _STDLIB_STRUCTURED_CHARS and words <= _STDLIB_WORDS:
        return value
    # A structured header (Content-Type, ...) this long or with this many encoded-words is
    # hostile: the parameters that fit within both bounds are read, the rest is cut.
    cut = value[:_STDLIB_STRUCTURED_CHARS]
    if cut.count("=?") > _STDLIB_WORDS:
        at = -1
        for _ in range(_STDLIB_WORDS + 1):
            at = cut.find("=?", at + 1)
        cut = cut[:at]
    state.note(name, f"{len(value)} characters: only the first {len(cut)} read")
    return cut.rpartition(";")[0] or cut


def _decoded(name: str, value: str, state: parse_limits.ParseState) -> str:
    most = state.limits.max_encoded_words
    text, left = decode_words(value, most)
    if left:
        state.hit(name, "max_encoded_words", f"{left} more left undecoded")
    return text


def _address_header(name: str, value: str, state: parse_limits.ParseState) -> _LinearHeader:
    """An address list read one mailbox at a time (the plain ones by a regex)."""
    most = state.limits.max_addresses_per_header
    items, more = split_addresses(value, most)
    if more:
        state.hit(name, "max_addresses_per_header", "the addresses after it are not read")
    addresses: list[Any] = []
    for i, item in enumerate(items):
        if i % 64 == 63 and state.out_of_time(name):
            break
        address = simple_mailbox(item)
        if address is None and len(item) <= _ITEM_CHARS and item.count("=?") <= _STDLIB_WORDS:
            try:
                found = getattr(_HEADER_CLASSES(name, item), "addresses", ())
            except Exception:  # the stdlib fails on some hostile input
                found = ()
            addresses.extend(found)
            continue
        if address is None:
            address = cheap_mailbox(item, lambda text: _decoded(name, text, state))
        if address is not None:
            addresses.append(address)
    text = ", ".join(str(a) for a in addresses)
    return _linear_header(name, text, tuple(addresses))


_UNSTRUCTURED = _Registry(use_default_map=False)
_HEADER_CLASSES = _Registry()
_POLICY = _MailPolicy(header_factory=_HEADER_CLASSES)
# For re-serialising an attached message/rfc822 part.
_GENERATOR_POLICY = _POLICY.clone(linesep="\r\n", utf8=True)


def _feed(data: bytes) -> Message:
    # As BytesParser.parsebytes(), which first decodes the whole message into one str; fed
    # a slice at a time, and no more once a limit says the rest is not read.
    state = parse_limits.current()
    parser = _BoundedParser(state)
    view = memoryview(data)
    for i in range(0, len(view), _FEED):
        parser.feed(bytes(view[i : i + _FEED]))
        if parser.stop is not None or (i and state.out_of_time("message")):
            if parser.stop is not None:
                state.hit(parser.stop[0], parser.stop[1], "the rest of the message is not read")
            break
    return parser.close()


# The header-like lines of a header block past its limits are handed to the parser as this
# one shared line: the feed parser keeps every line of a block until its end, and a block of
# millions of tiny header lines would cost ~60 bytes each, not 8.
_PLACEHOLDER = " \n"


class _BoundedParser(BytesFeedParser):
    """The stdlib feed parser, its header blocks, MIME parts and nesting bounded by the
    ParseLimits: a block's fields past its limits are dropped; past the parts or the depth it
    asks (``stop``) to be fed no more."""

    def __init__(self, state: parse_limits.ParseState) -> None:
        self._state = state
        self._limits = state.limits
        self._parts = 0
        self.stop: tuple[str, str] | None = None  # (where, setting) of the limit reached
        self.header_fields = 0
        self.header_bytes = 0
        self.max_fields = state.limits.max_header_count
        self.max_bytes = state.limits.max_header_block_bytes
        super().__init__(self._message, policy=_POLICY)
        self._parts = 0  # the constructor calls the factory once, to try it
        # The parser's line source, swapped for one that counts a header block's lines: the
        # loop that collects them is inside the stdlib's parser generator.
        self._input = _BoundedLines(self)

    def _message(self, policy: Any = None) -> Message:
        self._parts += 1
        depth = len(getattr(self, "_msgstack", ())) + 1
        lines = getattr(self, "_input", None)  # not there yet when the constructor tries this
        if not isinstance(lines, _BoundedLines):
            return _POLICY.message_factory(policy=policy or _POLICY)  # type: ignore[misc]
        if self.stop is None:
            if self._parts > self._limits.max_mime_parts:
                self.stop = ("message", "max_mime_parts")
            elif depth > self._limits.max_mime_depth + 1:
                self.stop = ("message", "max_mime_depth")
            if self.stop is not None:
                lines.dry()  # the parser sees the end of the message now, at every level
        self.header_fields = self.header_bytes = 0
        lines.headers(True)
        return _POLICY.message_factory(policy=policy or _POLICY)  # type: ignore[misc]

    def _parse_headers(self, lines: list[str]) -> None:
        self._input.headers(False)
        if lines and lines[-1] is _PLACEHOLDER:
            keep = lines.index(_PLACEHOLDER)
            where = "message" if len(getattr(self, "_msgstack", ())) <= 1 else "a MIME part"
            if self.header_fields > self._limits.max_header_count:
                setting = "max_header_count"
            else:
                setting = "max_header_block_bytes"
            self._state.hit(where, setting, f"{len(lines) - keep} header lines not read")
            del lines[keep:]
        super()._parse_headers(lines)  # type: ignore[misc]


def _at_end() -> str:
    return ""


class _BoundedLines(_BufferedSubFile):  # type: ignore[misc]
    """The feed parser's line buffer; while it reads a header block (``headers(True)``), the
    lines past the block's limits come out as _PLACEHOLDER. Outside header blocks its
    ``readline`` is the stdlib's own: a body line costs no extra call."""

    def __init__(self, parser: _BoundedParser) -> None:
        super().__init__()
        self._parser = parser

    def headers(self, reading: bool) -> None:
        if self.__dict__.get("readline") is _at_end:
            return
        if reading:
            self.readline = self._header_line
        else:
            self.__dict__.pop("readline", None)

    def dry(self) -> None:
        """No more lines: what is left is not read (past a limit)."""
        self.readline = _at_end

    def _header_line(self) -> Any:
        line = _BufferedSubFile.readline(self)
        if type(line) is not str or not _HEADER_LINE.match(line):
            return line
        parser = self._parser
        if line[0] not in " \t":
            parser.header_fields += 1
        parser.header_bytes += len(line)
        if parser.header_fields > parser.max_fields or parser.header_bytes > parser.max_bytes:
            return _PLACEHOLDER
        return line
