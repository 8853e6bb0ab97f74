"""One recipient's copy of a message as a webhook request body: ``json``, ``raw`` or ``multipart``.


The MIME parse runs once per message (``bridge.mail.parsed.ParsedMessage``), and so does its JSON
rendering (``bridge.webhook.render``); each recipient only adds its envelope.

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

import email.utils
import functools
import ipaddress
import secrets
import string
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.base.route import split_address, split_extension
from bridge.base.transaction import Envelope, MessageBuffer, Recipient
from bridge.mail.names import FALLBACK_TYPE, checked_content_type, safe_filename
from bridge.mail.parsed import ParsedMessage
from bridge.webhook.pieces import _dumps, _expand, _Piece, _utf8
from bridge.webhook.render import raw_pieces, rendered

PAYLOAD_KINDS = ("json", "raw", "multipart")
JSON_VERSION = 1

# Everything printable stays readable except "%" itself, so the encoding can be undone.
_HEADER_SAFE = "".join(c for c in string.punctuation if c != "%")


@dataclass(frozen=True)
class WebhookBody:
    """A request body and its payload-specific headers (not the id or signature headers)."""

    content_type: str
    headers: list[tuple[str, str]]
    chunks: Callable[[], Iterable[bytes]]  # each call yields the whole body again from the start
    length: int  # total bytes


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
    return _parsed_body(kind, env, message, parsed, delivery_id, include_raw)


def build_message_body(
    kind: str,
    envelope: Envelope,
    recipients: Sequence[tuple[Recipient, str]],
    message: MessageBuffer,
    parsed: ParsedMessage | None,
    request_id: str,
    hostname: str,
    include_raw: bool = False,
    *,
    trace_headers: bool = True,
    delimiter: str = "+",
) -> WebhookBody:
    """The request body for one message and every recipient of one route (SPEC section 8):
    ``recipients`` are (recipient, its delivery id) in RCPT order."""
    if kind == "raw":
        trace = b""
        if trace_headers:
            only = recipients[0][0] if len(recipients) == 1 else None
            trace = trace_header_bytes(envelope, only, request_id, hostname)
        return _raw_message(envelope, [r.address for r, _ in recipients], message, trace)
    if kind not in PAYLOAD_KINDS:
        raise ValueError(f"unknown payload kind {kind!r}; expected one of {PAYLOAD_KINDS}")
    if parsed is None:
        parsed = ParsedMessage.parse(message.getvalue())
    env = message_envelope_object(envelope, recipients, message, delimiter)
    return _parsed_body(kind, env, message, parsed, request_id, include_raw)


def _parsed_body(
    kind: str,
    env: dict[str, Any],
    message: MessageBuffer,
    parsed: ParsedMessage,
    delivery_id: str,
    include_raw: bool,
) -> WebhookBody:
    if kind == "json":
        json_message = rendered(parsed)
        pieces: list[_Piece] = [
            b'{"version":%d,"delivery_id":' % JSON_VERSION,
            _dumps(delivery_id),
            b',"envelope":',
            _dumps(env),
            b',"message":',
            *json_message.message_pieces(with_content=True),
            b',"defects":',
            json_message.defects_json(),
        ]
        if include_raw:
            pieces += [b',"raw":', *raw_pieces(message)]
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
        **_session_fields(envelope, message, recipient.orcpt),
    }


def _session_fields(
    envelope: Envelope, message: MessageBuffer, orcpt: str | None = None
) -> dict[str, Any]:
    """The envelope's fields besides the addresses, ``orcpt`` in its place of recipient mode."""
    fields: dict[str, Any] = {
        "lhlo": envelope.lhlo,
        "client_address": envelope.client_address,
        "body": envelope.body,
        "smtputf8": envelope.smtputf8,
        "size": message.size,
        "orcpt": orcpt,
    }
    return fields | {
        "xforward": {k.lower(): v for k, v in envelope.xforward.items()},
        "received_at": _received_at(envelope).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def message_envelope_object(
    envelope: Envelope,
    recipients: Sequence[tuple[Recipient, str]],
    message: MessageBuffer,
    delimiter: str = "+",
) -> dict[str, Any]:
    """The ``envelope`` object of a per-message request: ``recipients`` (each with the delivery
    id it would have in recipient mode) instead of ``rcpt_to`` and its parts."""
    listed = []
    for recipient, rid in recipients:
        local, domain = split_address(recipient.address)
        user, tag = split_extension(local, delimiter)
        listed.append(
            {
                "address": recipient.address,
                "orcpt": recipient.orcpt,
                "local": local,
                "domain": domain,
                "user": user,
                "tag": tag,
                "id": rid,
            }
        )
    fields = {
        "mail_from": envelope.mail_from,
        "recipients": listed,
        **_session_fields(envelope, message),
    }
    del fields["orcpt"]  # each recipient has its own
    return fields


def trace_header_bytes(
    envelope: Envelope, recipient: Recipient | None, delivery_id: str, hostname: str
) -> bytes:
    """``Return-Path``, ``Delivered-To`` and ``Received`` (RFC 3848 "with LMTP", or "with
    LMTPS" after STARTTLS), CRLF-ended. Without a ``recipient`` (a per-message request for
    several), no ``Delivered-To``: it names one mailbox."""
    short_id = delivery_id.removeprefix("msg_")[:16]
    date = email.utils.format_datetime(_received_at(envelope))
    lines = [
        f"Return-Path: <{_one_line(envelope.mail_from)}>",
        *([f"Delivered-To: {_one_line(recipient.address)}"] if recipient else []),
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
    return _raw_message(envelope, [recipient.address], message, trace)


def _raw_message(
    envelope: Envelope, addresses: Sequence[str], message: MessageBuffer, trace: bytes
) -> WebhookBody:
    def chunks() -> Iterator[bytes]:
        if trace:
            yield trace
        # Streamed piece by piece: a spooled message is never read whole into memory.
        yield from message.iter_chunks()

    headers = [("X-Lmtp-Mail-From", quote_header(envelope.mail_from))]
    headers += [("X-Lmtp-Rcpt-To", quote_header(address)) for address in addresses]
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

    json_message = rendered(parsed)
    field("envelope", "application/json", [_dumps(env)])
    field("message", "application/json", json_message.message_pieces(with_content=False))
    field("defects", "application/json", [json_message.defects_json()])
    for n, att in enumerate(parsed.attachments, start=1):
        name = f"attachment{n}"
        # mail checked both already (with defects); a form part's head is ours to keep whole
        content_type = checked_content_type(att.content_type) or FALLBACK_TYPE
        field(name, content_type, [att.content], att.filename or name)
    pieces.append(f"--{boundary}--\r\n".encode("ascii"))
    return _body(f'multipart/form-data; boundary="{boundary}"', [], pieces)


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
    # The WHATWG form encoding: UTF-8 as is, with '"', CR and LF percent-encoded; no control
    # or bidi character at all (safe_filename), whatever handed us the name.
    text = safe_filename(text)
    return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
