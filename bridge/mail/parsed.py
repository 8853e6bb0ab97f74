"""The message parsed once (``ParsedMessage``): the fields of the ``message`` object and its
attachments, cached as JSON body pieces that every recipient's body shares.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable
from email.message import Message
from typing import Any

import orjson

from bridge.base.transaction import MessageBuffer
from bridge.mail.authresults import auth_verdicts
from bridge.mail.body import _body_of, _buffer_head, _head_only
from bridge.mail.charsets import Defects, _decode_8bit
from bridge.mail.emailpolicy import _feed
from bridge.mail.headers import _addresses, _date, _first_text, _msgids, _parsed_headers
from bridge.mail.parts import Attachment, _leaves, _take_part
from bridge.webhook.pieces import (
    _BIG_STR,
    _b64_chunks,
    _b64_length,
    _b64_stream,
    _dumps,
    _expand,
    _Lazy,
    _Piece,
    _splice,
)
from bridge.webhook.textstream import SpooledText

# The body fast path is bridge/mimebody.py; tests/test_payload_bodyfast.py holds the JSON and
# multipart bodies equal to the whole-message parse's.
_FAST_BODY = True  # off: the whole message through the feed parser (the differential tests)

# from_buffer: a spooled (or big) message whose body the fast path takes has only its header
# block read into memory; a text body goes through textstream.SpooledText, decoded and
# JSON-escaped once into a temporary file that every send reads back (a 10 MiB message: one
# copy of the text on disk instead of two or three in memory). tests/test_payload_spooled.py
# holds the bodies equal to the in-memory ones.

_SPOOL_TEXT = True  # off: from_buffer parses getvalue() (the differential tests)
# An in-memory message's text is spooled when the message is longer than this (as _BIG_STR).
_SPOOL_TEXT_MIN = 64 * 1024


class ParsedMessage:
    """The message parsed once, with its JSON serialisations cached for every recipient.

    Made by ``from_buffer``, a big text body is kept as a ``SpooledText`` (its JSON string in
    a temporary file): ``close()`` frees it when the transaction's delivery ends.
    """

    def __init__(
        self, fields: dict[str, Any], attachments: list[Attachment], defects: list[str]
    ) -> None:
        # fields: the "message" object without "attachments" (those are kept as Attachment);
        # "text" and "html" are a str, None or a SpooledText.
        self.fields = fields
        self.attachments = attachments
        self.defects = defects
        # The message object as pieces; an int k stands for ',"content":"<base64>"' of
        # attachment k (left out of the variant without content).
        self._template: list[bytes | int | _Lazy] | None = None
        self._defects_json: bytes | None = None

    @classmethod
    def parse(cls, data: bytes, trusted_authserv_ids: Iterable[str] = ()) -> ParsedMessage:
        """Parse the message bytes; broken MIME gives what could be decoded plus defects.

        ``message.auth`` holds the verdicts of ``Authentication-Results`` headers whose
        authserv-id is in ``trusted_authserv_ids``; null when there is none.
        """
        try:
            return cls._parse(data, tuple(trusted_authserv_ids))
        except Exception as exc:  # a parser bug must not cost the message: fall back to text
            fields = _empty_fields()
            fields["text"] = _decode_8bit(data)
            return cls(fields, [], [f"ParserError: {type(exc).__name__}: {exc}"])

    @classmethod
    def from_buffer(
        cls, message: MessageBuffer, trusted_authserv_ids: Iterable[str] = ()
    ) -> ParsedMessage:
        """``parse`` of the buffer's bytes, the same fields, but the single-part text body of a
        spooled message (or one over _SPOOL_TEXT_MIN) is read from the buffer once and kept as
        its JSON string (a ``SpooledText``): a spooled message is never read whole. The caller
        calls ``close()`` when done with the bodies."""
        trusted = tuple(trusted_authserv_ids)
        if _SPOOL_TEXT and _FAST_BODY and (message.spooled or message.size > _SPOOL_TEXT_MIN):
            try:
                head = _buffer_head(message)
            except Exception:  # the whole parse meets the same trouble, and reports it
                head = None
            if head is not None:
                try:
                    return cls._from_message(head[0], message, head[1], trusted)
                except Exception:
                    pass  # parse() gives the fallback text and the ParserError defect
        return cls.parse(message.getvalue(), trusted)

    @classmethod
    def _parse(cls, data: bytes, trusted_authserv_ids: tuple[str, ...]) -> ParsedMessage:
        head = _head_only(data) if _FAST_BODY else None
        if head is None:
            msg, body_at = _feed(data), -1
        else:
            msg, body_at = head
        return cls._from_message(msg, data, body_at, trusted_authserv_ids)

    @classmethod
    def _from_message(
        cls,
        msg: Message,
        source: bytes | MessageBuffer,
        body_at: int,
        trusted_authserv_ids: tuple[str, ...],
    ) -> ParsedMessage:
        """The fields of ``msg``; ``body_at`` >= 0: it is the header block alone, and its body
        is ``source[body_at:]``."""
        defects = Defects()
        defects.add_all("message", msg.defects)
        headers = _parsed_headers(msg)

        by_name: dict[str, list[Any]] = {}
        for n, h in headers:
            by_name.setdefault(n.lower(), []).append(h)

        def named(name: str) -> list[Any]:
            found = by_name.get(name, [])
            for h in found:
                defects.add_all(name.title(), getattr(h, "defects", ()))
            return found

        fields = _empty_fields()
        fields["message_id"] = _first_text(named("message-id"))
        fields["subject"] = _first_text(named("subject"), strip=False)
        fields["date"] = _date(named("date"))
        fields["from"] = _addresses(named("from"))
        fields["to"] = _addresses(named("to"))
        fields["cc"] = _addresses(named("cc"))
        fields["reply_to"] = _addresses(named("reply-to"))
        fields["in_reply_to"] = _first_text(named("in-reply-to"))
        fields["references"] = _msgids(named("references"))
        fields["headers"] = [[n, str(h)] for n, h in headers]
        fields["auth"] = auth_verdicts(
            [str(h) for h in by_name.get("authentication-results", ())], trusted_authserv_ids
        )

        attachments: list[Attachment] = []
        for where, part in _leaves(msg, defects):
            try:
                # The fast path's body, sliced in the call so that _take_part holds the only
                # reference (it drops it before the CRLF copy: one big text fewer at the peak).
                _take_part(
                    where,
                    part,
                    fields,
                    attachments,
                    defects,
                    _body_of(source, body_at) if body_at >= 0 else None,
                )
            except Exception as exc:  # one unreadable part must not cost the others
                defects.add(where, f"unreadable part ({type(exc).__name__}: {exc})")
        return cls(fields, attachments, defects.items)

    def field(self, name: str) -> Any:
        """``fields[name]``, a spooled text read back as its str (costs the text's size)."""
        value = self.fields[name]
        return value.text() if isinstance(value, SpooledText) else value

    def close(self) -> None:
        """Free the spooled texts; the bodies built from this message fail after it."""
        for value in self.fields.values():
            if isinstance(value, SpooledText):
                value.close()

    def message_json(self, with_content: bool = True) -> bytes:
        """The serialised ``message`` object, joined (the body uses ``message_pieces``)."""
        return b"".join(_expand(self.message_pieces(with_content)))

    def message_pieces(self, with_content: bool = True) -> list[_Piece]:
        """The ``message`` object as body pieces: the same bytes as _dumps() of it whole."""
        if self._template is None:
            self._template = self._build_template()
        out: list[_Piece] = []
        for item in self._template:
            if not isinstance(item, int):
                out.append(item)
            elif with_content:
                content = self.attachments[item].content
                out += [
                    b',"content":"',
                    _Lazy(_b64_length(len(content)), functools.partial(_b64_chunks, content)),
                    b'"',
                ]
        return out

    def _build_template(self) -> list[bytes | int | _Lazy]:
        # Big str values and the attachments' content are dumped as placeholders, then put
        # in as their own pieces: never one big JSON str and its UTF-8 copy beside them.
        if not self.attachments and not any(_is_big(v) for v in self.fields.values()):
            # the common case: nothing to cut out (and no random token to draw)
            return [_dumps({**self.fields, "attachments": []})]
        token = "lmtp-bridge-" + secrets.token_hex(12)
        big: list[str | SpooledText] = []

        def slot(value: Any) -> Any:
            if _is_big(value):
                big.append(value)
                return f"{token}s{len(big) - 1}"
            return value

        obj = {k: slot(v) for k, v in self.fields.items() if k != "attachments"}
        described = []
        for i, attachment in enumerate(self.attachments):
            one = attachment.describe(False)
            one["text"] = slot(one["text"])
            one["content"] = f"{token}c{i}"  # "content" is the last key of describe(True)
            described.append(one)
        obj["attachments"] = described
        for ensure_ascii in (False, True):
            try:
                return _splice(obj, big, token, ensure_ascii)
            except (UnicodeEncodeError, orjson.JSONEncodeError):
                continue  # a lone surrogate: \u-escapes keep the JSON valid
        raise AssertionError("unreachable")

    def defects_json(self) -> bytes:
        if self._defects_json is None:
            self._defects_json = _dumps(self.defects)
        return self._defects_json

    def raw_pieces(self, message: MessageBuffer) -> list[_Piece]:
        """The whole message as a base64 JSON string, encoded as it is sent."""
        encoded = _Lazy(_b64_length(message.size), lambda: _b64_stream(message.iter_chunks()))
        return [b'"', encoded, b'"']


def _empty_fields() -> dict[str, Any]:
    return {
        "message_id": None,
        "subject": None,
        "date": None,
        "from": [],
        "to": [],
        "cc": [],
        "reply_to": [],
        "in_reply_to": None,
        "references": [],
        "headers": [],
        "auth": None,
        "text": None,
        "html": None,
        "text_charset": None,
        "html_charset": None,
    }


def _is_big(value: Any) -> bool:
    """A value the template cuts out into its own pieces."""
    return isinstance(value, SpooledText) or (isinstance(value, str) and len(value) > _BIG_STR)
