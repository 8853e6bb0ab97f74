"""The message parsed once (``ParsedMessage``): the fields of the ``message`` object, its
attachments and defects. A big text body stays in the message buffer (a ``BodyText``); how
any of it is written into a request is bridge/webhook's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from email.message import Message
from typing import Any, TypeVar, cast

import orjson

from bridge.base.transaction import MessageBuffer
from bridge.mail import limits as parse_limits
from bridge.mail.authresults import auth_verdicts
from bridge.mail.body import _body_of, _buffer_head, _head_only
from bridge.mail.bodytext import BodyText
from bridge.mail.charsets import Defects, _decode_8bit, scrub
from bridge.mail.emailpolicy import _feed
from bridge.mail.headers import _addresses, _date, _first_text, _msgids, _parsed_headers
from bridge.mail.limits import DEFAULT_LIMITS, ParseLimits, ParseState
from bridge.mail.parts import Attachment, _leaves, _take_part

# The body fast path is bridge/mail/body.py; tests/test_payload_bodyfast.py holds the JSON and
# multipart bodies equal to the whole-message parse's.
_FAST_BODY = True  # off: the whole message through the feed parser (the differential tests)

# from_buffer: a spooled (or big) message whose body the fast path takes has only its header
# block read into memory; a text body stays in the buffer as a BodyText (its charset decided
# while streaming over it), which the webhook side JSON-escapes once into a temporary file
# that every send reads back (bridge/webhook/textstream.py; a 10 MiB message: one copy of the
# text on disk instead of two or three in memory). tests/test_payload_spooled.py holds the
# bodies equal to the in-memory ones.

_SPOOL_TEXT = True  # off: from_buffer parses getvalue() (the differential tests)
# An in-memory message's text stays in the buffer when the message is longer than this.
_SPOOL_TEXT_MIN = 64 * 1024


T = TypeVar("T")


class ParsedMessage:
    """The message parsed once, shared by every recipient.

    Made by ``from_buffer``, a big text body is a ``BodyText``: a reference into the message
    buffer, which must outlive this. Renderers keep what they make of the message with
    ``keep()``; ``close()`` frees it when the transaction's delivery ends.
    """

    def __init__(
        self,
        fields: dict[str, Any],
        attachments: list[Attachment],
        defects: list[str],
        limits_hit: Iterable[str] = (),
    ) -> None:
        # fields: the "message" object without "attachments" (those are kept as Attachment);
        # "text" and "html" are a str, None or a BodyText.
        self.fields = fields
        self.attachments = attachments
        self.defects = defects
        self._kept: dict[object, Any] = {}
        # The ParseLimits fields (setting names) this message reached; each has a defect line.
        self.limits_hit = tuple(sorted(set(limits_hit)))

    @classmethod
    def parse(
        cls,
        data: bytes,
        trusted_authserv_ids: Iterable[str] = (),
        limits: ParseLimits = DEFAULT_LIMITS,
    ) -> ParsedMessage:
        """Parse the message bytes; broken MIME gives what could be decoded plus defects.

        ``message.auth`` holds the verdicts of ``Authentication-Results`` headers whose
        authserv-id is in ``trusted_authserv_ids``; null when there is none. Past one of the
        ``limits`` the rest of that header, header block or MIME tree is not read: a defect
        names the limit, and ``limits_hit`` lists it.
        """
        state = ParseState.start(limits)
        token = parse_limits.begin(state)
        try:
            return cls._parse_bounded(data, tuple(trusted_authserv_ids), state)
        finally:
            parse_limits.end(token)

    @classmethod
    def _parse_bounded(
        cls, data: bytes, trusted: tuple[str, ...], state: ParseState
    ) -> ParsedMessage:
        try:
            return cls._parse(data, trusted, state)
        except Exception as exc:  # a parser bug must not cost the message: fall back to text
            fields = _empty_fields()
            defects = Defects()
            fields["text"] = scrub("message", _decode_8bit(data), defects)
            lines = [f"ParserError: {type(exc).__name__}: {exc}", *defects.items]
            return cls(fields, [], _clean_lines(lines), state.names)

    @classmethod
    def from_buffer(
        cls,
        message: MessageBuffer,
        trusted_authserv_ids: Iterable[str] = (),
        limits: ParseLimits = DEFAULT_LIMITS,
    ) -> ParsedMessage:
        """``parse`` of the buffer's bytes, the same fields, but the single-part text body of a
        spooled message (or one over _SPOOL_TEXT_MIN) stays in the buffer, a ``BodyText``: a
        spooled message is never read whole. The caller calls ``close()`` when done with the
        bodies."""
        trusted = tuple(trusted_authserv_ids)
        state = ParseState.start(limits)
        token = parse_limits.begin(state)
        try:
            if _SPOOL_TEXT and _FAST_BODY and (message.spooled or message.size > _SPOOL_TEXT_MIN):
                try:
                    head = _buffer_head(message)
                except Exception:  # the whole parse meets the same trouble, and reports it
                    head = None
                if head is not None:
                    try:
                        return cls._from_message(head[0], message, head[1], trusted, state)
                    except Exception:
                        pass  # parse() gives the fallback text and the ParserError defect
            return cls._parse_bounded(message.getvalue(), trusted, state)
        finally:
            parse_limits.end(token)

    @classmethod
    def _parse(
        cls, data: bytes, trusted_authserv_ids: tuple[str, ...], state: ParseState
    ) -> ParsedMessage:
        head = _head_only(data) if _FAST_BODY else None
        if head is None:
            msg, body_at = _feed(data), -1
        else:
            msg, body_at = head
        return cls._from_message(msg, data, body_at, trusted_authserv_ids, state)

    @classmethod
    def _from_message(
        cls,
        msg: Message,
        source: bytes | MessageBuffer,
        body_at: int,
        trusted_authserv_ids: tuple[str, ...],
        state: ParseState,
    ) -> ParsedMessage:
        """The fields of ``msg``; ``body_at`` >= 0: it is the header block alone, and its body
        is ``source[body_at:]``."""
        defects = Defects()
        defects.add_all("message", msg.defects)
        headers = _parsed_headers(msg, state)

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
        for where, part in _leaves(msg, state):
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
        _scrub_fields(fields, defects)
        for line in state.hits:
            if line not in defects.items:
                defects.items.append(line)
        return cls(fields, attachments, _clean_lines(defects.items), state.names)

    def field(self, name: str) -> Any:
        """``fields[name]``, a text left in the buffer read back as its str (costs its size)."""
        value = self.fields[name]
        return value.text() if isinstance(value, BodyText) else value

    def keep(self, key: object, make: Callable[[], T]) -> T:
        """What a renderer makes of this message, made once (by ``make``) under ``key`` and
        shared by every recipient's body until ``close()``."""
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = make()
        return cast(T, kept)

    def close(self) -> None:
        """Close what renderers kept (a spooled text, say): the bodies built from it fail
        after this; a body built later makes it afresh. Closing twice is fine."""
        kept, self._kept = self._kept, {}
        for value in kept.values():
            close = getattr(value, "close", None)
            if close is not None:
                close()


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


def _clean_lines(lines: list[str]) -> list[str]:
    """Defect lines quote the message (a header's text, say): no lone surrogate in them either."""
    ignored = Defects()
    return [scrub("", line, ignored) for line in lines]


def _scrub_fields(fields: dict[str, Any], defects: Defects) -> None:
    """Every str of the header fields without lone surrogates (the bodies are decoded clean)."""
    try:  # orjson refuses a lone surrogate: one C call finds that there is none (the rule)
        orjson.dumps({k: v for k, v in fields.items() if k not in ("text", "html")})
        return
    except (orjson.JSONEncodeError, TypeError):
        pass

    def clean(where: str, value: Any) -> Any:
        if isinstance(value, str):
            return scrub(where, value, defects)
        if isinstance(value, list):
            return [clean(where, v) for v in value]
        if isinstance(value, dict):
            return {k: clean(where, v) for k, v in value.items()}
        return value

    for key, value in fields.items():
        if key not in ("text", "html"):
            fields[key] = clean(key, value)
