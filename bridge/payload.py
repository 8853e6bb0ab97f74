"""One recipient's copy of a message as a webhook request body: ``json``, ``raw`` or ``multipart``.

The MIME parse runs once per message (``ParsedMessage``); each recipient only adds its envelope.

``json`` (application/json) is the version 1 object of SPEC section 5. ``raw`` (message/rfc822)
is ``Return-Path``, ``Delivered-To`` and ``Received`` trace headers followed by the message
bytes exactly as received. ``multipart`` (multipart/form-data) has these fields, in order:

- ``envelope``: the envelope JSON object (Content-Type application/json);
- ``message``: the message JSON object, attachments listed without their ``content``;
- ``defects``: the JSON list of parser defects (often ``[]``);
- ``attachment1`` … ``attachmentN``: one file part per attachment, numbered like
  ``message.attachments`` (``attachmentK`` is ``attachments[K-1]``), with the attachment's
  filename (``attachmentK`` when it has none), content type and decoded bytes.

Address objects are ``{"name": str, "address": str}``; ``name`` is ``""`` when absent.
"""

from __future__ import annotations

import base64
import codecs
import email.utils
import functools
import importlib
import ipaddress
import json
import re
import secrets
import string
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.feedparser import BytesFeedParser
from email.headerregistry import (
    Address,
    AddressHeader,
    DateHeader,
    HeaderRegistry,
    MessageIDHeader,
    UnstructuredHeader,
)
from email.message import Message
from email.policy import EmailPolicy
from typing import Any

import orjson

from bridge.authresults import auth_verdicts
from bridge.routing import split_address, split_extension
from bridge.textstream import SpooledText, pieces_from
from bridge.transaction import Envelope, MessageBuffer, Recipient

PAYLOAD_KINDS = ("json", "raw", "multipart")
JSON_VERSION = 1
# Deeper MIME nesting than this is not looked into (it is still in "raw" and in the defects).
MAX_MIME_DEPTH = 50
# Memory: the parser is fed this many bytes at a time (never the whole message as one str);
# str values longer than _BIG_STR characters are JSON-escaped _SLICE characters at a time into
# separate body chunks; attachment content is base64-encoded _B64_SLICE bytes at a time, each
# time the body is sent (cheap), so only the decoded bytes stay in memory.
_FEED = 64 * 1024
_BIG_STR = 64 * 1024
_SLICE = 256 * 1024
_B64_SLICE = 3 * 256 * 1024
_CONTENT_KEY = ',"content":"'

# Everything printable stays readable except "%" itself, so the encoding can be undone.
_HEADER_SAFE = "".join(c for c in string.punctuation if c != "%")
_MSGID = re.compile(r"<[^<>]*>")
# Declared charsets decoded as mail clients and browsers do (WHATWG Encoding): supersets that
# only differ where the narrow one has control codes or nothing.
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "utf8": "utf-8",
}
# The stdlib's own base64 body decoder (what Message.get_payload(decode=True) calls); no stub.
_decode_b = importlib.import_module("email._encoded_words").decode_b
_UNDECLARED = frozenset({"us-ascii", "ascii", "unknown-8bit", "x-unknown", "unknown", "default"})


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


@dataclass(frozen=True)
class WebhookBody:
    """A request body and its payload-specific headers (not the id or signature headers)."""

    content_type: str
    headers: list[tuple[str, str]]
    chunks: Callable[[], Iterable[bytes]]  # each call yields the whole body again from the start
    length: int  # total bytes


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


@dataclass(frozen=True)
class Attachment:
    """A MIME part that is not the message's text or HTML body."""

    filename: str | None
    content_type: str
    disposition: str | None
    content_id: str | None
    content: bytes  # decoded (base64 / quoted-printable undone)
    charset: str | None = None  # the declared charset parameter, lower case
    text: str | None = None  # an inline text part after the first: decoded, as a client shows it

    def describe(self, with_content: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "filename": self.filename,
            "content_type": self.content_type,
            "size": len(self.content),
            "disposition": self.disposition,
            "content_id": self.content_id,
            "charset": self.charset,
            "text": self.text,
        }
        if with_content:
            out["content"] = base64.b64encode(self.content).decode("ascii")
        return out


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
        defects = _Defects()
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
        token = "lmtp-bridge-" + secrets.token_hex(12)
        big: list[str | SpooledText] = []

        def slot(value: Any) -> Any:
            if isinstance(value, SpooledText) or (isinstance(value, str) and len(value) > _BIG_STR):
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
        if not big and not described:
            return [_dumps(obj)]  # the common case: nothing to cut out
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


def build_body(
    kind: str,
    envelope: Envelope,
    recipient: Recipient,
    message: MessageBuffer,
    parsed: ParsedMessage | None,
    delivery_id: str,
    hostname: str,
    include_raw: bool = False,
    *,
    trace_headers: bool = True,
    delimiter: str = "+",
) -> WebhookBody:
    """The request body for one recipient's copy; ``parsed`` is shared by all recipients."""
    if kind == "raw":
        return _raw_body(envelope, recipient, message, delivery_id, hostname, trace_headers)
    if kind not in PAYLOAD_KINDS:
        raise ValueError(f"unknown payload kind {kind!r}; expected one of {PAYLOAD_KINDS}")
    if parsed is None:  # nobody would close a spooled text: parsed in memory, as always
        parsed = ParsedMessage.parse(message.getvalue())
    env = envelope_object(envelope, recipient, message, delimiter)
    if kind == "json":
        pieces: list[_Piece] = [
            b'{"version":%d,"delivery_id":' % JSON_VERSION,
            _dumps(delivery_id),
            b',"envelope":',
            _dumps(env),
            b',"message":',
            *parsed.message_pieces(with_content=True),
            b',"defects":',
            parsed.defects_json(),
        ]
        if include_raw:
            pieces += [b',"raw":', *parsed.raw_pieces(message)]
        pieces.append(b"}")
        return _body("application/json", [], pieces)
    return _multipart_body(env, parsed)


def envelope_object(
    envelope: Envelope, recipient: Recipient, message: MessageBuffer, delimiter: str = "+"
) -> dict[str, Any]:
    """The ``envelope`` JSON object: naming only this recipient, never the others (Bcc).

    Plus-addressing: ``rcpt_user`` and ``rcpt_tag`` split ``rcpt_local`` at the first
    ``recipient_delimiter`` character (``bob+news`` -> ``bob``, ``news``; no tag: null).
    """
    local, domain = split_address(recipient.address)
    user, tag = split_extension(local, delimiter)
    return {
        "mail_from": envelope.mail_from,
        "rcpt_to": recipient.address,
        "rcpt_local": local,
        "rcpt_domain": domain,
        "rcpt_user": user,
        "rcpt_tag": tag,
        "lhlo": envelope.lhlo,
        "client_address": envelope.client_address,
        "body": envelope.body,
        "smtputf8": envelope.smtputf8,
        "size": message.size,
        "orcpt": recipient.orcpt,
        "xforward": {k.lower(): v for k, v in envelope.xforward.items()},
        "received_at": _received_at(envelope).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def trace_header_bytes(
    envelope: Envelope, recipient: Recipient, delivery_id: str, hostname: str
) -> bytes:
    """``Return-Path``, ``Delivered-To`` and ``Received`` (RFC 3848 "with LMTP", or "with
    LMTPS" after STARTTLS), CRLF-ended."""
    short_id = delivery_id.removeprefix("msg_")[:16]
    date = email.utils.format_datetime(_received_at(envelope))
    lines = [
        f"Return-Path: <{_one_line(envelope.mail_from)}>",
        f"Delivered-To: {_one_line(recipient.address)}",
        f"Received: from {_one_line(envelope.lhlo)} ({_address_literal(envelope.client_address)})"
        f"\r\n\tby {_one_line(hostname)} with {'LMTPS' if envelope.tls else 'LMTP'} id {short_id};"
        f" {date}",
    ]
    return b"".join(_utf8(line) + b"\r\n" for line in lines)


def quote_header(value: str) -> str:
    """An address as an ASCII header value: non-ASCII, "%" and space percent-encoded."""
    return urllib.parse.quote(_utf8(value), safe=_HEADER_SAFE)


# --- bodies ---------------------------------------------------------------------------


def _body(content_type: str, headers: list[tuple[str, str]], pieces: list[_Piece]) -> WebhookBody:
    frozen = tuple(p for p in pieces if not isinstance(p, bytes) or p)
    return WebhookBody(
        content_type=content_type,
        headers=headers,
        chunks=lambda: _expand(frozen),
        length=sum(len(p) if isinstance(p, bytes) else p.length for p in frozen),
    )


def _raw_body(
    envelope: Envelope,
    recipient: Recipient,
    message: MessageBuffer,
    delivery_id: str,
    hostname: str,
    trace_headers: bool,
) -> WebhookBody:
    trace = trace_header_bytes(envelope, recipient, delivery_id, hostname) if trace_headers else b""

    def chunks() -> Iterator[bytes]:
        if trace:
            yield trace
        # Streamed piece by piece: a spooled message is never read whole into memory.
        yield from message.iter_chunks()

    headers = [
        ("X-Lmtp-Mail-From", quote_header(envelope.mail_from)),
        ("X-Lmtp-Rcpt-To", quote_header(recipient.address)),
    ]
    return WebhookBody("message/rfc822", headers, chunks, len(trace) + message.size)


def _multipart_body(env: dict[str, Any], parsed: ParsedMessage) -> WebhookBody:
    boundary = "lmtp-bridge-" + secrets.token_hex(16)
    delimiter = f"--{boundary}\r\n".encode("ascii")
    pieces: list[_Piece] = []

    def field(
        name: str, content_type: str, content: list[_Piece], filename: str | None = None
    ) -> None:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{_form_quote(filename)}"'
        head = f"Content-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
        pieces.extend((delimiter, _utf8(head), *content, b"\r\n"))

    field("envelope", "application/json", [_dumps(env)])
    field("message", "application/json", parsed.message_pieces(with_content=False))
    field("defects", "application/json", [parsed.defects_json()])
    for n, att in enumerate(parsed.attachments, start=1):
        name = f"attachment{n}"
        field(name, att.content_type, [att.content], att.filename or name)
    pieces.append(f"--{boundary}--\r\n".encode("ascii"))
    return _body(f'multipart/form-data; boundary="{boundary}"', [], pieces)


# --- MIME ----------------------------------------------------------------------------


class _Defects:
    """Parser defects as readable strings, in order, without repeats."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        line = f"{where}: {what}"
        if line not in self.items:
            self.items.append(line)

    def add_all(self, where: str, defects: Iterable[Exception]) -> None:
        for d in defects:
            text = str(d)
            self.add(where, f"{type(d).__name__}: {text}" if text else type(d).__name__)


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


def _parsed_headers(msg: Message) -> list[tuple[str, Any]]:
    """Every header in order, decoded; a header the library cannot parse stays a plain str."""
    out: list[tuple[str, Any]] = []
    for name, raw in msg.raw_items():
        value: Any = None
        if _FAST_HEADERS and type(raw) is str:
            value = _fast_header(name, raw)
        if value is None:
            try:
                value = _POLICY.header_fetch_parse(name, raw)
                str(value)
            except Exception:
                value = " ".join(str(raw).split())
        out.append((name, value))
    return out


# --- header fast paths -----------------------------------------------------------------
# The stdlib's structured header parser costs tens of microseconds a header. For the plain
# forms below its result (str, defects, addresses, datetime: what the payload reads) is
# known without it; anything else takes the stdlib path. tests/test_payload_fastpath.py
# holds the two paths equal.

_FAST_HEADERS = True  # off: every header through the stdlib (the differential tests)

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, ASCII only
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
# One mailbox of a list: "local@domain", "<local@domain>" or "Atom Words <local@domain>",
# then "," or the end (the last group).
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*(?:({_DOT_ATOM})@({_DOT_ATOM})"
    rf"|((?:{_ATEXT}[ \t]+)*{_ATEXT})?[ \t]*<({_DOT_ATOM})@({_DOT_ATOM})>)[ \t]*(,|\Z)"
)
_SIMPLE_MSGID = re.compile(rf"[ \t]*<{_DOT_ATOM}@{_DOT_ATOM}>[ \t]*")


class _FastAddressHeader:
    """A simple address header as the stdlib's ``AddressHeader`` would read it."""

    __slots__ = ("_text", "addresses")
    defects: tuple[Exception, ...] = ()

    def __init__(self, addresses: tuple[Address, ...]) -> None:
        self.addresses = addresses
        self._text = ", ".join([str(a) for a in addresses])

    def __str__(self) -> str:
        return self._text


class _FastDateHeader:
    """A date header as the stdlib's ``DateHeader`` would read it."""

    __slots__ = ("_text", "datetime")
    defects: tuple[Exception, ...] = ()

    def __init__(self, dt: datetime) -> None:
        self.datetime = dt
        self._text = email.utils.format_datetime(dt)

    def __str__(self) -> str:
        return self._text


@functools.lru_cache(maxsize=1024)  # header names are the sender's choice: bounded
def _header_kind(name: str) -> str | None:
    cls = _HEADER_CLASSES[name]
    if issubclass(cls, UnstructuredHeader):
        return "text"
    if issubclass(cls, AddressHeader):
        return "address"
    if issubclass(cls, DateHeader):
        return "date"
    if issubclass(cls, MessageIDHeader):
        return "msgid"
    return None  # the MIME headers: parameters, RFC 2231, ...


def _fast_header(name: str, raw: str) -> Any:
    """What ``_POLICY.header_fetch_parse(name, raw)`` gives, or None when not certain."""
    kind = _header_kind(name)
    if kind is None:
        return None
    value = raw.replace("\r", "").replace("\n", "")  # as EmailPolicy.header_fetch_parse
    if kind == "date":
        if not value:  # a defect: the stdlib reports it
            return None
        try:
            # The very calls DateHeader makes; only its unused parse tree is skipped.
            return _FastDateHeader(email.utils.parsedate_to_datetime(value))
        except Exception:
            return None
    if "=?" in value:  # encoded words
        return None
    if kind == "text":
        # Without encoded words the unstructured parse gives the text back as it is and
        # never a defect; lone surrogates would be replaced, so those go the long way.
        if not value.isascii() and _has_surrogates(value):
            return None
        return value
    if kind == "msgid":
        # A plain str: a message-id header offers nothing more than its text and defects.
        return value if _SIMPLE_MSGID.fullmatch(value) else None
    return _simple_address_header(value)


def _simple_address_header(value: str) -> _FastAddressHeader | None:
    addresses: list[Address] = []
    pos = 0
    while True:
        m = _SIMPLE_MAILBOX.match(value, pos)
        if m is None:
            return None
        local, domain, name, angle_local, angle_domain, sep = m.groups()
        if local is None:
            # The stdlib joins the words of a display name with single spaces.
            display = " ".join(name.split()) if name else ""
            addresses.append(Address(display, angle_local, angle_domain))
        else:
            addresses.append(Address("", local, domain))
        if not sep:
            return _FastAddressHeader(tuple(addresses))
        pos = m.end()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_text(found: list[Any], strip: bool = True) -> str | None:
    if not found:
        return None
    text = str(found[0])
    return text.strip() if strip else text


def _date(found: list[Any]) -> str | None:
    dt = getattr(found[0], "datetime", None) if found else None
    if not isinstance(dt, datetime):
        return None
    if dt.tzinfo is None:  # "-0000": UTC with the sender's zone unknown (RFC 5322 3.3)
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()


def _addresses(found: list[Any]) -> list[dict[str, str]]:
    out = []
    for header in found:
        for addr in getattr(header, "addresses", ()):
            out.append({"name": addr.display_name or "", "address": addr.addr_spec})
    return out


def _msgids(found: list[Any]) -> list[str]:
    out: list[str] = []
    for header in found:
        text = str(header)
        out.extend(_MSGID.findall(text) or text.split())
    return out


def _leaves(msg: Message, defects: _Defects) -> Iterator[tuple[str, Message]]:
    """The non-multipart parts in order, each with a "part 1.2"-style location."""
    stack: list[tuple[str, Message, int]] = [("message", msg, 0)]
    while stack:
        where, part, depth = stack.pop()
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            if depth >= MAX_MIME_DEPTH:
                defects.add(where, f"MIME nesting deeper than {MAX_MIME_DEPTH}; not looked into")
                continue
            prefix = "part " if where == "message" else where + "."
            children = part.get_payload()
            if not isinstance(children, list):
                yield where, part
                continue
            for i in reversed(range(len(children))):
                child = children[i]
                if isinstance(child, Message):
                    stack.append((f"{prefix}{i + 1}", child, depth + 1))
        else:
            yield where, part


def _take_part(
    where: str,
    part: Message,
    fields: dict[str, Any],
    attachments: list[Attachment],
    defects: _Defects,
    body: bytes | _BodyRef | None = None,
) -> None:
    """File one leaf part under text, html or attachments; ``body`` is its content when the
    caller took it from the message bytes itself (the body fast path), else it is decoded.
    A ``_BodyRef`` body is read from the message buffer: a text body as a SpooledText."""
    ctype = part.get_content_type()
    disposition = part.get_content_disposition()
    filename = part.get_filename()
    ref: _BodyRef | None = None
    if isinstance(body, _BodyRef):
        ref, content = body, b""  # read below, unless the text is spooled
    else:
        content = _part_bytes(where, part, defects) if body is None else body
    del body  # content is now the only reference: the "del content" below frees the bytes
    part.set_payload("")  # taken: its encoded text need not live as long as the tree
    defects.add_all(where, part.defects)

    maintype, _, subtype = ctype.partition("/")
    # A multipart whose boundary never appears is a leaf: its text is the best we have.
    is_text = ctype in ("text/plain", "text/html") or maintype == "multipart"
    is_body = disposition != "attachment" and (filename is None or disposition == "inline")
    key = "html" if subtype == "html" else "text"
    charset = _declared_charset(part)
    if is_text and is_body and fields[key] is None:
        if ref is not None:
            spooled = ref.spool(charset, where, defects)
            if spooled is not None:
                fields[key] = spooled
                fields[key + "_charset"] = charset
                return
            content = ref.read()  # declined: decoded in memory, as always
        decoded = _decode_text(where, part, content, defects)
        del content  # before the copy below: one big text fewer at the peak
        # MIME text travels with CRLF line ends; receivers expect newlines
        fields[key] = decoded.replace("\r\n", "\n")
        fields[key + "_charset"] = charset
        return
    if ref is not None:
        content = ref.read()
    content_id = part.get("Content-ID")
    text = None
    if maintype == "text" and is_body:
        text = _decode_text(where, part, content, defects).replace("\r\n", "\n")
    attachments.append(
        Attachment(
            filename=filename,
            content_type=ctype,
            disposition=disposition,
            content_id=str(content_id).strip() if content_id is not None else None,
            content=content,
            charset=charset,
            text=text,
        )
    )


def _feed(data: bytes) -> Message:
    # As BytesParser.parsebytes(), which first decodes the whole message into one str.
    parser = BytesFeedParser(policy=_POLICY)
    view = memoryview(data)
    for i in range(0, len(view), _FEED):
        parser.feed(bytes(view[i : i + _FEED]))
    return parser.close()


# --- body fast path --------------------------------------------------------------------
# A single-part body the stdlib hands back unchanged (get_payload(decode=True) with no
# Content-Transfer-Encoding to undo) is still cut by its feed parser into one str per line,
# joined, and encoded back to bytes. So only the header block is fed to the parser and the
# body is sliced from the message bytes (a 10 MiB smtp-source message: parse 64 -> 24 ms,
# traced peak 27 -> 20 MiB). tests/test_payload_bodyfast.py holds the JSON and multipart
# bodies equal to the whole-message parse's.

_FAST_BODY = True  # off: the whole message through the feed parser (the differential tests)
# Below this many bytes of body the checks cost more than the parser's lines (about 0.4 us
# a line against 4 us).
_FAST_BODY_MIN = 2048

# Header lines as the feed parser sees them: a line is cut at CRLF, CR or LF, and a header
# line starts like email.feedparser.headerRE (a name and ":", or a continuation), less its
# "From " alternative: such a line takes the long way.
_HEADER_LINES = re.compile(rb"(?:(?:[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n))*")
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


# --- text body from the buffer ---------------------------------------------------------
# from_buffer: a spooled (or big) message whose body the fast path takes has only its header
# block read into memory; a text body goes through textstream.SpooledText, decoded and
# JSON-escaped once into a temporary file that every send reads back (a 10 MiB message: one
# copy of the text on disk instead of two or three in memory). tests/test_payload_spooled.py
# holds the bodies equal to the in-memory ones.

_SPOOL_TEXT = True  # off: from_buffer parses getvalue() (the differential tests)
# An in-memory message's text is spooled when the message is longer than this (as _BIG_STR).
_SPOOL_TEXT_MIN = 64 * 1024
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
        return b"".join(pieces_from(self.message, self.start))

    def spool(self, charset: str | None, where: str, defects: _Defects) -> SpooledText | None:
        try:
            # An in-memory message (below spool_threshold) keeps its text in memory too: a
            # file would cost more than it saves (256 KiB: 0.54 -> 0.40 ms without it).
            return SpooledText.write(
                self.message,
                self.start,
                charset,
                where,
                defects,
                in_memory=not self.message.spooled,
            )
        except Exception:  # a full spool disk, say: the in-memory decode gives the same
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


def _part_bytes(where: str, part: Message, defects: _Defects) -> bytes:
    try:
        if part.is_multipart():
            # message/rfc822 and friends are parsed into sub-messages: write them back out.
            inner = part.get_payload()
            if isinstance(inner, list):
                messages = [m for m in inner if isinstance(m, Message)]
                if len(messages) == len(inner):
                    return b"".join(_as_bytes(m) for m in messages)
            return _as_bytes(part).partition(b"\r\n\r\n")[2]
        payload = _decoded_payload(part)
        return payload if isinstance(payload, bytes) else b""
    except Exception as exc:
        defects.add(where, f"undecodable content ({type(exc).__name__}: {exc})")
        return b""


def _decoded_payload(part: Message) -> Any:
    """``part.get_payload(decode=True)``, the same bytes and defects, but a large ASCII body
    costs one bytes copy at a time, not the stdlib's str copy, line list and joined lines."""
    payload = getattr(part, "_payload", None)
    cte = str(part.get("content-transfer-encoding", "")).lower()
    if (
        not isinstance(payload, str)
        or len(payload) <= _BIG_STR
        or cte in ("quoted-printable", "x-uuencode", "uuencode", "uue", "x-uue")
        or not payload.isascii()
    ):
        return part.get_payload(decode=True)
    data = payload.encode("ascii")
    del payload
    part.set_payload("")  # the caller has no more use for the text
    if cte != "base64":
        return data
    joined = data.translate(None, b"\r\n")  # == b"".join(data.splitlines()) for bytes
    del data
    value, defects = _decode_b(joined)
    for defect in defects:
        part.policy.handle_defect(part, defect)
    return value


def _as_bytes(msg: Message) -> bytes:
    try:
        return msg.as_bytes(policy=_GENERATOR_POLICY)
    except Exception:  # the bytes generator trips over some broken 8-bit parts
        return _utf8(msg.as_string(policy=_GENERATOR_POLICY))


def _declared_charset(part: Message) -> str | None:
    if part.get_content_maintype() not in ("text", "multipart"):
        return None
    try:
        charset = part.get_param("charset")
    except Exception:
        return None
    if isinstance(charset, tuple):  # RFC 2231 form: (charset, language, value)
        charset = charset[2]
    text = str(charset).strip().strip('"').lower() if charset else ""
    return text or None


def _decode_text(where: str, part: Message, content: bytes, defects: _Defects) -> str:
    """A text part as Unicode: its declared charset (read as mail clients do), else a guess."""
    charset = _declared_charset(part)
    if charset is None or charset in _UNDECLARED:
        return _decode_8bit(content)
    try:
        codec = codecs.lookup(_CHARSET_ALIASES.get(charset, charset))
    except LookupError:
        defects.add(where, f"unknown charset {charset!r}; decoded as UTF-8 or Windows-1252")
        return _decode_8bit(content)
    try:
        return content.decode(codec.name)
    except UnicodeDecodeError:
        if codec.name == "utf-8":
            # Mislabelled mail is common; an 8-bit legacy text is a better guess than U+FFFD.
            defects.add(where, "text is not valid utf-8 as declared; decoded as Windows-1252")
            return _decode_cp1252(content)
        defects.add(where, f"text is not valid {charset}; undecodable bytes replaced")
        return content.decode(codec.name, "replace")


def _decode_8bit(data: bytes) -> str:
    """Undeclared 8-bit text: UTF-8 when it is valid UTF-8, ISO-2022-JP when it has its escapes,
    else Windows-1252 (Latin-1 for its five unassigned bytes), so it never fails."""
    if b"\x1b" in data and b"\x1b$" in data:  # one byte is found by memchr, far faster
        try:
            return data.decode("iso-2022-jp")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _decode_cp1252(data)


def _decode_cp1252(data: bytes) -> str:
    return data.decode("cp1252", "bridge-latin1-fallback")


def _latin1_fallback(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return exc.object[exc.start : exc.end].decode("latin-1"), exc.end


codecs.register_error("bridge-latin1-fallback", _latin1_fallback)


# --- small helpers ---------------------------------------------------------------------


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


def _received_at(envelope: Envelope) -> datetime:
    dt = envelope.received_at or datetime.now(UTC)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _one_line(text: str) -> str:
    # The protocol core rejects CR and LF in commands; this is a second fence for headers.
    return text.replace("\r", " ").replace("\n", " ")


@functools.lru_cache(maxsize=1024)  # the same few MTAs connect again and again
def _address_literal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return _one_line(address)  # "unix", or a name
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _form_quote(text: str) -> str:
    # The WHATWG form encoding: UTF-8 as is, with '"', CR and LF percent-encoded.
    return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
