"""A text body left in the buffer (mail's ``BodyText``) as its JSON string, decoded and
escaped in one pass over the message buffer.

Made once per message (bridge/webhook/render.py), kept in a temporary file (or in memory) and
read back on every send.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import orjson

from bridge.base.transaction import READ_CHUNK, MessageBuffer
from bridge.mail.bodytext import BodyText, is_single_byte
from bridge.mail.charsets import Defects

# Printable ASCII but '"' and '\': JSON keeps these bytes as they are, so a piece of only
# these, CR and LF needs its line ends escaped and nothing else.
_PRINTABLE = bytes(range(0x20, 0x7F)).translate(None, b'"\\')
# In a text known to be valid UTF-8 (BodyText.decide checked it) JSON without \u-escapes keeps
# every byte of a multibyte character as it is too: such pieces need no decode either.
_PRINTABLE_UTF8 = _PRINTABLE + bytes(range(0x80, 0x100))
# Besides CR and LF, what a piece written byte by byte may hold: the ASCII characters JSON
# writes as a two-byte escape that mail text has often (a backslash first: the others add one).
_SHORT_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\t", b"\\t"))
_BYTE_LEVEL = b'\r\n\\"\t'
# What a codec must read as these ASCII characters for its pieces to be written byte by byte.
_PLAIN = _PRINTABLE + _BYTE_LEVEL


@functools.lru_cache(maxsize=64)
def _plain_as_ascii(codec: str) -> bool:
    """The codec is stateless and reads every _PLAIN byte as that ASCII character."""
    if codec != "utf-8" and not is_single_byte(codec):
        return False
    try:
        return _PLAIN.decode(codec) == _PLAIN.decode("latin-1")
    except UnicodeDecodeError:
        return False


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
            # closed by close(): ParsedMessage.close() closes what the render kept
            self._file = tempfile.TemporaryFile(prefix="lmtp-bridge-", dir=self._spool_dir)  # noqa: SIM115
        self._file.write(data)

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
) -> None:
    """Decode ``pieces`` with ``codec``, make CRLF LF and write the text JSON-escaped.

    Raises UnicodeDecodeError (strict errors: ``BodyText.decide`` found none)."""
    encode = _encoder(ensure_ascii)
    decoder = codecs.getincrementaldecoder(codec)(errors)
    plain = _plain_as_ascii(codec)
    utf8 = codec == "utf-8" and errors == "strict" and not ensure_ascii
    kept = _PRINTABLE_UTF8 if utf8 else _PRINTABLE
    clean = True  # the decoder holds no bytes of a character begun in an earlier piece
    held = False  # the text so far ended with a CR, not yet written: its LF may come next
    for chunk in pieces:
        if not chunk:
            continue
        tail = b""
        if utf8 and clean and chunk[-1] >= 0x80:
            # A character cut at the piece's end: its first bytes go to the decoder.
            cut = _utf8_cut(chunk)
            chunk, tail = chunk[:cut], chunk[cut:]
        rest = chunk.translate(None, kept) if plain and clean else None
        out = None
        if rest is not None and not held and rest == b"\r\n" * (len(rest) >> 1):
            # The common case: plain text with CRLF line ends, none split between pieces. As
            # many CRs as LFs, in turn, but "\rx\n" reads so too: with no CR left once the
            # pairs are replaced, every CR (and so every LF) was in one. (The replace costs what
            # a translate of CR and LF would, with the pairs' check thrown in.)
            out = chunk.replace(b"\r\n", b"\\n")
            if b"\r" in out:
                out = None
        if out is not None:
            store.write(out)
        elif rest is not None and not rest.translate(None, _BYTE_LEVEL):
            # On the bytes too: CRLF becomes \n, a lone CR \r and a lone LF \n; a backslash,
            # a quote and a tab their escapes.
            if held and chunk[:1] != b"\n":
                store.write(b"\\r")
            # (A held CR before a leading LF: that LF, lone in this piece, stands for both.)
            out = chunk
            for byte, escaped in _SHORT_ESCAPES:
                if byte in rest:
                    out = out.replace(byte, escaped)
            out = out.replace(b"\r\n", b"\\n")
            held = out[-1:] == b"\r"
            if held:
                out = out[:-1]
            if b"\r" in out:
                out = out.replace(b"\r", b"\\r")
            if b"\n" in out:
                out = out.replace(b"\n", b"\\n")
            store.write(out)
        else:
            text = decoder.decode(chunk)
            if plain:
                clean = not decoder.getstate()[0]
            held = _write_text(store, encode, text, held)
        if tail:
            decoder.decode(tail)  # "": the decoder holds them for the next piece
            clean = False
    held = _write_text(store, encode, decoder.decode(b"", True), held)
    if held:
        store.write(b"\\r")


def _utf8_cut(data: bytes) -> int:
    """Where the last character of valid UTF-8 ``data`` begins if it is cut short, else
    ``len(data)``."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte < 0x80:
            return n
        if byte >= 0xC0:  # the first byte of a character of 2, 3 or 4 bytes
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n - back if back < need else n
    return n


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
    """The JSON string (without its quotes) of a ``BodyText``: decoded with its codec, CRLF
    made LF, escaped as ``pieces._encode`` would (``charsets._decode_text`` + json.dumps, byte
    for byte).

    Written once by ``escape``; ``chunks()`` reads it back on every send. The variant with
    \\u-escapes (``ensure_ascii``, for a message object holding a lone surrogate elsewhere) is
    made from the message buffer when first asked for. ``close()`` frees it; closing twice is
    fine, reading after close raises RuntimeError.
    """

    def __init__(self, text: BodyText, store: _Store, in_memory: bool, chunk_size: int) -> None:
        self.body = text
        self.in_memory = in_memory
        self.chunk_size = chunk_size
        self._stores: dict[bool, _Store] = {False: store}
        self._closed = False

    @property
    def codec(self) -> str:
        return self.body.codec

    @classmethod
    def escape(
        cls, text: BodyText, *, in_memory: bool = False, chunk_size: int = READ_CHUNK
    ) -> SpooledText:
        """Read the body once and keep its JSON string: in memory, or in a temporary file in
        the message buffer's spool directory."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        return cls(text, _written(text, False, in_memory, chunk_size), in_memory, chunk_size)

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
        """``BodyText.decide`` then ``escape``: the JSON string of the text body
        ``message[start:]`` declared ``charset``, its defects added to ``defects``; None (and no
        defect) when the decision declines (the caller decodes in memory)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        text = BodyText.decide(message, start, charset, where, defects, chunk_size)
        if text is None:
            return None
        return cls.escape(text, in_memory=in_memory, chunk_size=chunk_size)

    def _store(self, ensure_ascii: bool) -> _Store:
        if self._closed:
            raise RuntimeError("the spooled text was closed before it was sent")
        store = self._stores.get(ensure_ascii)
        if store is None:
            store = _written(self.body, ensure_ascii, self.in_memory, self.chunk_size)
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


def _written(text: BodyText, ensure_ascii: bool, in_memory: bool, chunk_size: int) -> _Store:
    store = _Store(text.message.spool_dir, in_memory)
    try:
        _one_pass(text.chunks(chunk_size), store, text.codec, text.errors, ensure_ascii)
    except BaseException:
        store.close()
        raise
    store.finish()
    return store
