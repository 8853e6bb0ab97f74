"""The body fast path: a single-part body sliced from the message bytes, only the header block
parsed; from a spooled buffer only the header block is read (the body stays: ``_BodyRef``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

from bridge.base.transaction import MessageBuffer
from bridge.mail.bodytext import BodyText
from bridge.mail.charsets import Defects
from bridge.mail.emailpolicy import _feed

# A single-part body the stdlib hands back unchanged (get_payload(decode=True) with no
# Content-Transfer-Encoding to undo) is still cut by its feed parser into one str per line,
# joined, and encoded back to bytes. So only the header block is fed to the parser and the
# body is sliced from the message bytes (a 10 MiB smtp-source message: parse 64 -> 24 ms,
# traced peak 27 -> 20 MiB). tests/test_payload_bodyfast.py holds the JSON and multipart
# bodies equal to the whole-message parse's. Its switch, mime._FAST_BODY, is read by
# ParsedMessage.

# Below this many bytes of body the checks cost more than the parser's lines (about 0.4 us
# a line against 4 us).
_FAST_BODY_MIN = 2048

# Header lines as the feed parser sees them: a line is cut at CRLF, CR or LF, and a header
# line starts like email.feedparser.headerRE (a name and ":", or a continuation), less its
# "From " alternative: such a line takes the long way.
# Possessive (*+): a plain * keeps a backtracking point per line, 300 bytes each (a header
# block of 200,000 tiny lines: 60 MiB for one match).
_HEADER_LINES = re.compile(rb"(?:(?:[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n))*+")
# Words that name the common types and encodings the fast path leaves to the stdlib: a
# header block without them is worth the try, so a multipart message rarely has its headers
# parsed twice. Only a hint: the check after the parse decides.
_SLOW_WORDS = (b"multipart", b"message/", b"base64", b"quoted-printable")
# get_payload(decode=True) returns the body as received for these (lower-cased) encodings.
_VERBATIM_CTE = frozenset({"", "7bit", "8bit", "binary"})


def _head_only(data: bytes) -> tuple[Message, int] | None:
    """The message parsed from its header block alone and where its body starts in ``data``,
    when the stdlib would give that body back byte for byte as the only part; else None."""
    if len(data) < _FAST_BODY_MIN:  # the body is smaller still
        return None
    found = _header_end(data, len(data))
    return None if found is None else _head_parse(data, found, len(data))


_MORE = (-1, -1)


def _header_end(data: bytes, size: int) -> tuple[int, int] | None:
    """(end of the header lines, start of the body) of a message of ``size`` bytes whose first
    bytes are ``data``; None when its headers do not end in a blank line; _MORE when ``data``
    is too short to tell."""
    lines = _HEADER_LINES.match(data)
    end = lines.end() if lines else 0
    whole = len(data) >= size
    if not whole and end + 2 > len(data):  # maybe a header line, or CR then LF, cut short
        return _MORE
    # The feed parser ends the headers at the first line that is not a header line: a blank
    # line is the separator and is dropped, anything else is body (with a defect): not ours.
    if data.startswith(b"\r\n", end):
        return end, end + 2
    if data.startswith((b"\r", b"\n"), end):
        return end, end + 1
    if not whole and data.find(b"\n", end) < 0 and data.find(b"\r", end) < 0:
        return _MORE  # a line cut short: a header line, maybe
    return None


def _head_parse(data: bytes, found: tuple[int, int], size: int) -> tuple[Message, int] | None:
    """The header block ``data[:found[1]]`` parsed, when the fast path may take the body."""
    end, body_at = found
    if size - body_at < _FAST_BODY_MIN:
        return None
    head = data[:end].lower()  # small; a case-blind regex search is several times slower
    if any(word in head for word in _SLOW_WORDS):
        return None
    try:
        msg = _feed(data[:body_at])
        cte = str(msg.get("content-transfer-encoding", "")).lower()  # as get_payload reads it
        if (
            msg.get_content_maintype() in ("multipart", "message")
            or cte not in _VERBATIM_CTE
            or msg.get_payload() != ""  # the parser saw the headers end elsewhere
        ):
            return None
    except Exception:  # the whole parse meets the same trouble, and reports it
        return None
    return msg, body_at


# --- the body left in the buffer ---------------------------------------------------------
# ParsedMessage.from_buffer reads no more than the header block; a text body stays in the
# buffer as a BodyText (its charset decided by streaming over it, often without a read).
# A header block longer than this takes the in-memory path.
_HEAD_MAX = 1 << 20


@dataclass(frozen=True, slots=True)
class _BodyRef:
    """The body ``message[start:]``, left in the buffer."""

    message: MessageBuffer
    start: int

    def read(self) -> bytes:
        if not self.message.spooled:
            return self.message.getvalue()[self.start :]
        return b"".join(self.message.chunks_from(self.start))

    def text(self, charset: str | None, where: str, defects: Defects) -> BodyText | None:
        try:
            return BodyText.decide(self.message, self.start, charset, where, defects)
        except Exception:  # a read error, say: the in-memory decode meets it, and says so
            return None


def _body_of(source: bytes | MessageBuffer, body_at: int) -> bytes | _BodyRef:
    return source[body_at:] if isinstance(source, bytes) else _BodyRef(source, body_at)


def _buffer_head(message: MessageBuffer) -> tuple[Message, int] | None:
    """As _head_only, reading no more of the buffer than the header block (and a little)."""
    if message.size < _FAST_BODY_MIN:
        return None
    if not message.spooled:
        return _head_only(message.getvalue())
    parts: list[bytes] = []
    read = 0
    for chunk in message.iter_chunks():
        parts.append(chunk)
        read += len(chunk)
        data = b"".join(parts) if len(parts) > 1 else chunk
        found = _header_end(data, message.size)
        if found is None:
            return None
        if found is not _MORE:
            return _head_parse(data, found, message.size)
        if read >= _HEAD_MAX:
            return None
    return None
