"""A text body as its JSON string, decoded and escaped in one pass over the message buffer.

Made once per message, kept in a temporary file (or in memory) and read back on every send.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import orjson

from bridge.base.transaction import READ_CHUNK, MessageBuffer
from bridge.mail.charsets import CHARSET_ALIASES, UNDECLARED, Defects

# Registered by bridge.mail.charsets: cp1252, with Latin-1 for the five bytes it leaves undefined.
_LATIN1_FALLBACK = "bridge-latin1-fallback"
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
# Printable ASCII but '"' and '\': JSON keeps these bytes as they are, so a piece of only
# these, CR and LF needs its line ends escaped and nothing else.
_PRINTABLE = bytes(range(0x20, 0x7F)).translate(None, b'"\\')
_PLAIN = _PRINTABLE + b"\r\n"
# With every CR in a CRLF pair, CRLF -> \n is a translate (CR -> "\", LF -> "n"): half the
# cost of bytes.replace.
_CRLF_ESCAPED = bytes.maketrans(b"\r\n", b"\\n")
_ALL_BYTES = bytes(range(256))


class _Escape(Exception):
    """An undeclared text has the ISO-2022-JP escape "\\x1b$": that codec is tried first."""


def _is_single_byte(codec: str) -> bool:
    if codec in _SINGLE_BYTE:
        return True
    # The generated charmap codecs (encodings/cp1252.py, iso8859_15.py, ...) decode with
    # codecs.charmap_decode over a 256-character table: byte by byte, nothing carried over.
    decoder = codecs.lookup(codec).incrementaldecoder
    module = sys.modules.get(decoder.__module__) if decoder is not None else None
    table = getattr(module, "decoding_table", None)
    return isinstance(table, str) and len(table) == 256


@functools.lru_cache(maxsize=64)
def _plain_as_ascii(codec: str) -> bool:
    """The codec is stateless and reads every _PLAIN byte as that ASCII character."""
    if codec != "utf-8" and not _is_single_byte(codec):
        return False
    try:
        return _PLAIN.decode(codec) == _PLAIN.decode("latin-1")
    except UnicodeDecodeError:
        return False


@functools.lru_cache(maxsize=64)
def _defined_bytes(codec: str) -> bytes:
    """The bytes a single-byte codec decodes strictly: deleting them leaves the undefined."""
    out = bytearray()
    for b in _ALL_BYTES:
        try:
            bytes([b]).decode(codec)
        except UnicodeDecodeError:
            continue
        out.append(b)
    return bytes(out)


def pieces_from(
    message: MessageBuffer, start: int, chunk_size: int = READ_CHUNK
) -> Iterator[bytes]:
    """The bytes ``start:`` of the message, never more than ``chunk_size`` at a time."""
    if not message.spooled:
        # In memory already: one join of the pieces as received, then even slices.
        view = memoryview(message.getvalue())
        for i in range(start, len(view), chunk_size):
            yield bytes(view[i : i + chunk_size])
        return
    pos = 0
    for chunk in message.iter_chunks(chunk_size):
        skip = start - pos
        pos += len(chunk)
        if skip >= len(chunk):
            continue
        yield chunk[skip:] if skip > 0 else chunk


class _Store:
    """The escaped bytes: a temporary file read with pread, or pieces in memory."""

    def __init__(self, spool_dir: str | None, in_memory: bool) -> None:
        self._spool_dir = spool_dir
        self._file: IO[bytes] | None = None
        self._memory: list[bytes] | None = [] if in_memory else None
        self.length = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self.length += len(data)
        if self._memory is not None:
            self._memory.append(bytes(data))
            return
        if self._file is None:
            # closed by close(), which ParsedMessage.close() calls when delivery ends
            self._file = tempfile.TemporaryFile(prefix="lmtp-bridge-", dir=self._spool_dir)  # noqa: SIM115
        self._file.write(data)

    def reset(self) -> None:
        """Empty, to be written again. A new file, not a truncated one: ext4 writes a file
        truncated to zero out to disk when it is closed (auto_da_alloc), 7 ms for 10 MiB."""
        self.length = 0
        if self._memory is not None:
            self._memory.clear()
        elif self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._file is not None:
            self._file.flush()

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        if self.closed:
            raise RuntimeError("the spooled text was closed before it was sent")
        sent = 0
        if self._memory is not None:
            for piece in self._memory:
                if self.closed:
                    break
                sent += len(piece)
                yield piece
        else:
            while sent < self.length and self._file is not None:
                # The file asked each time: after close() its number may be another file's.
                piece = os.pread(self._file.fileno(), min(chunk_size, self.length - sent), sent)
                if not piece:
                    break
                sent += len(piece)
                yield piece
        if sent != self.length:
            # Content-Length is already out: a short body must fail the request (4xx, the
            # MTA retries), never go out as if whole.
            raise RuntimeError("the spooled text was closed while it was being sent")

    def close(self) -> None:
        self.closed = True
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _encoder(ensure_ascii: bool) -> Callable[[str], bytes]:
    # As pieces._encode: orjson writes the json module's bytes, \u-escapes only need json.
    if ensure_ascii:
        return lambda text: json.dumps(text, ensure_ascii=True)[1:-1].encode("ascii")
    return lambda text: orjson.dumps(text)[1:-1]


def _one_pass(
    pieces: Iterable[bytes],
    store: _Store,
    codec: str,
    errors: str,
    ensure_ascii: bool,
    *,
    watch_escape: bool = False,
    defined: bytes | None = None,
) -> bool:
    """Decode ``pieces`` with ``codec``, make CRLF LF and write the text JSON-escaped.

    Raises UnicodeDecodeError (strict errors) and _Escape (``watch_escape``: "\\x1b$" seen).
    Returns whether a byte outside ``defined`` was seen (False when ``defined`` is None)."""
    encode = _encoder(ensure_ascii)
    decoder = codecs.getincrementaldecoder(codec)(errors)
    plain = _plain_as_ascii(codec)
    clean = True  # the decoder holds no bytes of a character begun in an earlier piece
    held = False  # the text so far ended with a CR, not yet written: its LF may come next
    esc = False  # the last piece ended with ESC
    undefined = False
    for chunk in pieces:
        if not chunk:
            continue
        if watch_escape:
            if (esc and chunk[:1] == b"$") or (b"\x1b" in chunk and b"\x1b$" in chunk):
                raise _Escape
            esc = chunk[-1:] == b"\x1b"
        if defined is not None and not undefined:
            undefined = bool(chunk.translate(None, defined))
        rest = chunk.translate(None, _PRINTABLE) if plain and clean else None
        if rest is not None and not held and rest == b"\r\n" * (len(rest) >> 1):
            # The common case: plain text with CRLF line ends, none split between pieces.
            store.write(chunk.translate(_CRLF_ESCAPED))
            continue
        if rest is not None and not rest.translate(None, b"\r\n"):
            # On the bytes too: CRLF becomes \n, a lone CR \r and a lone LF \n.
            if held and chunk[:1] != b"\n":
                store.write(b"\\r")
            # (A held CR before a leading LF: that LF, lone in this piece, stands for both.)
            out = chunk.replace(b"\r\n", b"\\n")
            held = out[-1:] == b"\r"
            if held:
                out = out[:-1]
            if b"\r" in out:
                out = out.replace(b"\r", b"\\r")
            if b"\n" in out:
                out = out.replace(b"\n", b"\\n")
            store.write(out)
            continue
        text = decoder.decode(chunk)
        if plain:
            clean = not decoder.getstate()[0]
        held = _write_text(store, encode, text, held)
    held = _write_text(store, encode, decoder.decode(b"", True), held)
    if held:
        store.write(b"\\r")
    return undefined


def _write_text(store: _Store, encode: Callable[[str], bytes], text: str, held: bool) -> bool:
    """Write ``text`` (after a held CR, if ``held``) with CRLF made LF; True when it ends
    with a CR, which is held back."""
    if held:
        text = "\r" + text
    held = text.endswith("\r")
    if held:
        text = text[:-1]
    if text:
        store.write(encode(text.replace("\r\n", "\n")))
    return held


class SpooledText:
    """The JSON string (without its quotes) of the text body ``message[start:]``: decoded as
    ``charsets._decode_text`` decodes it, CRLF made LF, escaped as ``pieces._encode`` would.

    Written once by ``write``; ``chunks()`` reads it back on every send. The variant with
    \\u-escapes (``ensure_ascii``, for a message object holding a lone surrogate elsewhere) is
    made from the message buffer when first asked for. ``close()`` frees it; closing twice is
    fine, reading after close raises RuntimeError.
    """

    def __init__(
        self,
        message: MessageBuffer,
        start: int,
        codec: str,
        errors: str,
        store: _Store,
        in_memory: bool,
        chunk_size: int,
    ) -> None:
        self.message = message
        self.start = start
        self.codec = codec
        self.errors = errors
        self.in_memory = in_memory
        self.chunk_size = chunk_size
        self._stores: dict[bool, _Store] = {False: store}
        self._closed = False

    @classmethod
    def write(
        cls,
        message: MessageBuffer,
        start: int,
        charset: str | None,
        where: str,
        defects: Defects,
        *,
        in_memory: bool = False,
        chunk_size: int = READ_CHUNK,
    ) -> SpooledText | None:
        """Read the body once (rarely more: see ``_fill``) and keep its JSON string.

        ``charset`` is the part's declared charset as ``charsets._declared_charset`` gives it.
        The defects ``_decode_text`` would record go into ``defects`` under ``where``. None
        (and no defect recorded) when identical output cannot be promised: the caller then
        decodes in memory as before.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        store = _Store(message.spool_dir, in_memory)
        try:
            choice = _fill(_Body(store, message, start, chunk_size), charset)
        except BaseException:
            store.close()
            raise
        if choice is None:
            store.close()
            return None
        codec, errors, notes = choice
        store.finish()
        for note in notes:
            defects.add(where, note)
        return cls(message, start, codec, errors, store, in_memory, chunk_size)

    def _store(self, ensure_ascii: bool) -> _Store:
        if self._closed:
            raise RuntimeError("the spooled text was closed before it was sent")
        store = self._stores.get(ensure_ascii)
        if store is None:
            store = _Store(self.message.spool_dir, self.in_memory)
            try:
                pieces = pieces_from(self.message, self.start, self.chunk_size)
                _one_pass(pieces, store, self.codec, self.errors, ensure_ascii)
            except BaseException:
                store.close()
                raise
            store.finish()
            self._stores[ensure_ascii] = store
        return store

    def length(self, ensure_ascii: bool = False) -> int:
        """Bytes of the JSON string without its quotes."""
        return self._store(ensure_ascii).length

    def chunks(self, ensure_ascii: bool = False) -> Iterator[bytes]:
        """The JSON string without its quotes, read afresh, ``chunk_size`` bytes at a time."""
        return self._store(ensure_ascii).chunks(self.chunk_size)

    def text(self) -> str:
        """The text itself, read back (for tests and tools: it costs the text's size)."""
        value = json.loads(b'"' + b"".join(self.chunks()) + b'"')
        assert isinstance(value, str)
        return value

    def close(self) -> None:
        self._closed = True
        for store in self._stores.values():
            store.close()


# (codec, errors handler, defects to record)
_Choice = tuple[str, str, list[str]]


class _Body:
    """The body to write into ``store``: each ``write`` empties the store and starts over."""

    def __init__(self, store: _Store, message: MessageBuffer, start: int, chunk_size: int):
        self.store = store
        self.message = message
        self.start = start
        self.chunk_size = chunk_size

    def pieces(self) -> Iterator[bytes]:
        return pieces_from(self.message, self.start, self.chunk_size)

    def write(
        self, codec: str, errors: str, *, watch_escape: bool = False, defined: bytes | None = None
    ) -> bool:
        self.store.reset()
        return _one_pass(
            self.pieces(),
            self.store,
            codec,
            errors,
            False,
            watch_escape=watch_escape,
            defined=defined,
        )

    def has_escape(self) -> bool:
        """Whether "\\x1b$" occurs (maybe split between pieces)."""
        esc = False
        for chunk in self.pieces():
            if (esc and chunk[:1] == b"$") or (b"\x1b" in chunk and b"\x1b$" in chunk):
                return True
            esc = chunk[-1:] == b"\x1b"
        return False


def _fill(body: _Body, charset: str | None) -> _Choice | None:
    """What charsets._decode_text decides, found while writing; None when we cannot match it.

    Written optimistically: an undeclared text is taken as UTF-8 and written again (the
    store emptied) only if it turns out not to be. Most mail is ASCII or UTF-8, so this
    reads the body once where deciding first would read it twice."""
    try:
        return _decide(body, charset, UNDECLARED, CHARSET_ALIASES)
    except UnicodeError:
        # Not a decode error: ISO-2022-JP's incremental decoder raises "pending buffer
        # overflow" on a long broken escape, where one decode of the whole reports a decode
        # error. Nothing promised.
        return None


def _decide(
    body: _Body, charset: str | None, undeclared: frozenset[str], aliases: dict[str, str]
) -> _Choice | None:
    if charset is None or charset in undeclared:
        return _guess(body, [])
    try:
        codec = codecs.lookup(aliases.get(charset, charset)).name
    except LookupError:
        note = f"unknown charset {charset!r}; decoded as UTF-8 or Windows-1252"
        return _guess(body, [note])
    except Exception:  # e.g. ValueError for a NUL in the name: _decode_text raises it too
        return None
    if codec == "utf-8":
        try:
            body.write("utf-8", "strict")
            return "utf-8", "strict", []
        except UnicodeDecodeError:
            pass
        body.write("cp1252", _LATIN1_FALLBACK)
        note = "text is not valid utf-8 as declared; decoded as Windows-1252"
        return "cp1252", _LATIN1_FALLBACK, [note]
    if _is_single_byte(codec):
        undefined = body.write(codec, "replace", defined=_defined_bytes(codec))
        notes = [f"text is not valid {charset}; undecodable bytes replaced"] if undefined else []
        return codec, "replace", notes
    if codec in _MULTIBYTE:
        try:
            body.write(codec, "strict")
        except UnicodeDecodeError:
            return None
        return codec, "strict", []
    return None


def _guess(body: _Body, notes: list[str]) -> _Choice:
    """As charsets._decode_8bit: ISO-2022-JP when it has "\\x1b$" and decodes, else UTF-8 when
    valid, else Windows-1252 with the Latin-1 fallback."""
    utf8: bool | None = None  # not known yet
    try:
        body.write("utf-8", "strict", watch_escape=True)
        return "utf-8", "strict", notes
    except _Escape:
        escape = True
    except UnicodeDecodeError:
        # The escape may come after the bad byte, and ISO-2022-JP passes some 8-bit bytes
        # (one after an ESC): look for it.
        utf8, escape = False, body.has_escape()
    if escape:
        try:
            body.write("iso2022_jp", "strict")
            return "iso2022_jp", "strict", notes
        except UnicodeDecodeError:
            pass
    if utf8 is None:
        try:
            body.write("utf-8", "strict")
            return "utf-8", "strict", notes
        except UnicodeDecodeError:
            pass
    body.write("cp1252", _LATIN1_FALLBACK)
    return "cp1252", _LATIN1_FALLBACK, notes
