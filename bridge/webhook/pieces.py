"""A request body as pieces: bytes, or ``_Lazy`` pieces made afresh each time it is sent;
and the compact JSON encoding every body uses (orjson, writing the json module's bytes).
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from bridge.webhook.textstream import SpooledText

# Memory: str values longer than _BIG_STR characters are JSON-escaped _SLICE characters at a
# time into separate body chunks; attachment content is base64-encoded _B64_SLICE bytes at a
# time, each time the body is sent (cheap), so only the decoded bytes stay in memory.
_BIG_STR = 64 * 1024
_SLICE = 256 * 1024
_B64_SLICE = 3 * 256 * 1024
_CONTENT_KEY = ',"content":"'


class _Lazy:
    """A body piece made on demand, each time the body is sent: ``length`` bytes."""

    __slots__ = ("length", "make")

    def __init__(self, length: int, make: Callable[[], Iterable[bytes]]) -> None:
        self.length = length
        self.make = make


_Piece = bytes | _Lazy


def _b64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


def _b64_chunks(data: bytes | memoryview) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), _B64_SLICE):
        yield base64.b64encode(view[i : i + _B64_SLICE])


def _b64_stream(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """base64 of the concatenated chunks, the same bytes as one b64encode() of the whole."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        cut = len(data) - len(data) % 3
        carry = data[cut:]
        yield from _b64_chunks(memoryview(data)[:cut])
    if carry:
        yield base64.b64encode(carry)


def _splice(
    obj: Any, big: list[str | SpooledText], token: str, ensure_ascii: bool
) -> list[bytes | int | _Lazy]:
    """``obj`` as JSON pieces, cut at its placeholders (the only places ``token`` occurs):
    ``,"content":"<token>c<i>"`` becomes the int i, ``"<token>s<i>"`` the str ``big[i]``
    as its own JSON-escaped pieces (a spooled text: one piece read as sent). Found with
    str.find: no regex compiled per message."""
    text = _encode(obj, ensure_ascii)
    mark_token = token.encode("ascii")
    out: list[bytes | int | _Lazy] = []
    start = 0
    at = text.find(mark_token)
    while at >= 0:
        mark = at + len(mark_token)
        end = text.index(b'"', mark)
        index = int(text[mark + 1 : end])
        if text[mark : mark + 1] == b"c":
            out.append(text[start : at - len(_CONTENT_KEY)])
            out.append(index)
        else:
            out.append(text[start : at - 1])
            value = big[index]
            out.append(b'"')
            if isinstance(value, SpooledText):
                read = functools.partial(value.chunks, ensure_ascii)
                out.append(_Lazy(value.length(ensure_ascii), read))
            else:
                for i in range(0, len(value), _SLICE):
                    out.append(_encode(value[i : i + _SLICE], ensure_ascii)[1:-1])
            out.append(b'"')
        start = end + 1
        at = text.find(mark_token, start)
    out.append(text[start:])
    return out


def _expand(pieces: Iterable[_Piece]) -> Iterator[bytes]:
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece
        else:
            yield from piece.make()


def _dumps(obj: Any) -> bytes:
    try:
        return _encode(obj, ensure_ascii=False)
    except orjson.JSONEncodeError:
        pass  # a lone surrogate (or an int beyond 64 bits): the json module decides
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8; \u-escapes keep the JSON valid.
        return _encode(obj, ensure_ascii=True)


def _encode(obj: Any, ensure_ascii: bool) -> bytes:
    """Compact JSON: the bytes of ``json.dumps(obj, ensure_ascii=..., separators=(",", ":"))``.

    orjson writes exactly those bytes for what a payload holds (str, int, bool, None, lists,
    dicts with str keys; tests/test_payload.py checks every code point) at a fifth to a tenth of
    the cost; it refuses a lone surrogate, as UTF-8 does.
    """
    if ensure_ascii:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return orjson.dumps(obj)


def _utf8(text: str) -> bytes:
    try:
        # Addresses decoded with surrogateescape go back to their original bytes.
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")
