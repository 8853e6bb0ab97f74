"""A big text body left in the message buffer (``BodyText``): where it starts and how its bytes
decode, decided by streaming over the buffer as ``charsets._decode_text`` decides in memory.

What the model hands out instead of the text itself: the webhook side renders it (JSON-escaped
once into a spool, bridge/webhook/textstream.py); ``BodyText.text()`` decodes it in memory.
"""

from __future__ import annotations

import codecs
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from bridge.base.transaction import READ_CHUNK, MessageBuffer
from bridge.mail.charsets import UNDECLARED, Defects, text_codec

# Registered by bridge.mail.charsets: cp1252, with Latin-1 for the five bytes it leaves undefined.
LATIN1_FALLBACK = "bridge-latin1-fallback"
# Stateful or multibyte codecs: taken only when the whole text decodes strictly, where an
# incremental decode gives what one decode gives. With "replace" the two may differ at a piece
# boundary, so an undecodable text in these is declined (the caller decodes it in memory).
_MULTIBYTE = frozenset(
    {
        "iso2022_jp",
        "euc_jp",
        "shift_jis",
        "cp932",
        "gb18030",
        "gbk",
        "gb2312",
        "big5",
        "cp950",
        "big5hkscs",
        "cp949",
        "euc_kr",
    }
)
# C codecs that decode every byte on its own, like the generated charmap codecs.
_SINGLE_BYTE = frozenset({"ascii", "iso8859-1"})
_ALL_BYTES = bytes(range(256))


@dataclass(frozen=True, slots=True)
class BodyText:
    """The text body ``message[start:]``, not read: its bytes decode with ``codec`` and
    ``errors`` piece by piece as in one go, and its CRLF line ends are made LF (as the text of
    an in-memory parse). Its transfer encoding is the identity: the body fast path leaves only
    7bit, 8bit and binary bodies in the buffer."""

    message: MessageBuffer
    start: int
    codec: str
    errors: str

    def chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The body's bytes as received, ``chunk_size`` at a time."""
        return self.message.chunks_from(self.start, chunk_size)

    def text(self) -> str:
        """The text itself, decoded in memory (it costs the text's size, twice)."""
        data = b"".join(self.chunks())
        return data.decode(self.codec, self.errors).replace("\r\n", "\n")

    @classmethod
    def decide(
        cls,
        message: MessageBuffer,
        start: int,
        charset: str | None,
        where: str,
        defects: Defects,
        chunk_size: int = READ_CHUNK,
    ) -> BodyText | None:
        """How ``charsets._decode_text`` would decode the body ``message[start:]`` declared
        ``charset`` (as ``charsets._declared_charset`` gives it), found by streaming over it:
        its defects go into ``defects`` under ``where``. None (and no defect) when identical
        output piece by piece cannot be promised: the caller decodes in memory.

        Plain ASCII text (known from the buffer, ``plain_from``) is decided without a read."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        try:
            choice = _decide(_Scan(message, start, chunk_size), charset)
        except UnicodeError:
            # Not a decode error: ISO-2022-JP's incremental decoder raises "pending buffer
            # overflow" on a long broken escape, where one decode of the whole reports a decode
            # error. Nothing promised.
            return None
        if choice is None:
            return None
        codec, errors, notes = choice
        for note in notes:
            defects.add(where, note)
        return cls(message, start, codec, errors)


class _Escape(Exception):
    """An undeclared text has the ISO-2022-JP escape "\\x1b$": that codec is tried first."""


def is_single_byte(codec: str) -> bool:
    """The codec decodes every byte on its own: nothing is carried from one piece to the next."""
    if codec in _SINGLE_BYTE:
        return True
    # The generated charmap codecs (encodings/cp1252.py, iso8859_15.py, ...) decode with
    # codecs.charmap_decode over a 256-character table: byte by byte, nothing carried over.
    decoder = codecs.lookup(codec).incrementaldecoder
    module = sys.modules.get(decoder.__module__) if decoder is not None else None
    table = getattr(module, "decoding_table", None)
    return isinstance(table, str) and len(table) == 256


@functools.lru_cache(maxsize=64)
def defined_bytes(codec: str) -> bytes:
    """The bytes a single-byte codec decodes strictly: deleting them leaves the undefined."""
    out = bytearray()
    for b in _ALL_BYTES:
        try:
            bytes([b]).decode(codec)
        except UnicodeDecodeError:
            continue
        out.append(b)
    return bytes(out)


# (codec, errors handler, defects to record)
_Choice = tuple[str, str, list[str]]


class _Scan:
    """The body read to check a decode, without keeping what it decodes to."""

    def __init__(self, message: MessageBuffer, start: int, chunk_size: int):
        self.message = message
        self.start = start
        self.chunk_size = chunk_size

    def pieces(self) -> Iterator[bytes]:
        return self.message.chunks_from(self.start, self.chunk_size)

    def check(
        self, codec: str, *, watch_escape: bool = False, defined: bytes | None = None
    ) -> bool:
        """Decode the body strictly with ``codec`` (``defined`` given: only look for bytes
        outside it). Raises UnicodeDecodeError and _Escape (``watch_escape``: "\\x1b$" seen);
        returns whether a byte outside ``defined`` was seen."""
        if codec == "utf-8" and self.message.plain_from(self.start):
            return False  # ASCII without ESC: valid UTF-8, no escape
        decoder = codecs.getincrementaldecoder(codec)("strict") if defined is None else None
        esc = False  # the last piece ended with ESC
        undefined = False
        for chunk in self.pieces():
            if not chunk:
                continue
            if watch_escape:
                if (esc and chunk[:1] == b"$") or (b"\x1b" in chunk and b"\x1b$" in chunk):
                    raise _Escape
                esc = chunk[-1:] == b"\x1b"
            if defined is not None:
                if chunk.translate(None, defined):
                    return True
                continue
            if decoder is not None:
                if codec == "utf-8" and chunk.isascii() and not decoder.getstate()[0]:
                    continue  # ASCII after a whole character: nothing to decode
                decoder.decode(chunk)
        if decoder is not None:
            decoder.decode(b"", True)
        return undefined

    def has_escape(self) -> bool:
        """Whether "\\x1b$" occurs (maybe split between pieces)."""
        esc = False
        for chunk in self.pieces():
            if (esc and chunk[:1] == b"$") or (b"\x1b" in chunk and b"\x1b$" in chunk):
                return True
            esc = chunk[-1:] == b"\x1b"
        return False


def _decide(scan: _Scan, charset: str | None) -> _Choice | None:
    """What charsets._decode_text decides; None when we cannot match it piece by piece."""
    if charset is None or charset in UNDECLARED:
        return _guess(scan, [])
    codec = text_codec(charset)
    if codec is None:  # unknown, or no text charset (base64, punycode, ...)
        note = f"unknown charset {charset!r}; decoded as UTF-8 or Windows-1252"
        return _guess(scan, [note])
    if codec == "utf-8":
        try:
            scan.check("utf-8")
            return "utf-8", "strict", []
        except UnicodeDecodeError:
            pass
        note = "text is not valid utf-8 as declared; decoded as Windows-1252"
        return "cp1252", LATIN1_FALLBACK, [note]
    if is_single_byte(codec):
        undefined = scan.check(codec, defined=defined_bytes(codec))
        notes = [f"text is not valid {charset}; undecodable bytes replaced"] if undefined else []
        return codec, "replace", notes
    if codec in _MULTIBYTE:
        try:
            scan.check(codec)
        except UnicodeDecodeError:
            return None
        return codec, "strict", []
    return None


def _guess(scan: _Scan, notes: list[str]) -> _Choice:
    """As charsets._decode_8bit: ISO-2022-JP when it has "\\x1b$" and decodes, else UTF-8 when
    valid, else Windows-1252 with the Latin-1 fallback."""
    utf8: bool | None = None  # not known yet
    try:
        scan.check("utf-8", watch_escape=True)
        return "utf-8", "strict", notes
    except _Escape:
        escape = True
    except UnicodeDecodeError:
        # The escape may come after the bad byte, and ISO-2022-JP passes some 8-bit bytes
        # (one after an ESC): look for it.
        utf8, escape = False, scan.has_escape()
    if escape:
        try:
            scan.check("iso2022_jp")
            return "iso2022_jp", "strict", notes
        except UnicodeDecodeError:
            pass
    if utf8 is None:
        try:
            scan.check("utf-8")
            return "utf-8", "strict", notes
        except UnicodeDecodeError:
            pass
    return "cp1252", LATIN1_FALLBACK, notes
