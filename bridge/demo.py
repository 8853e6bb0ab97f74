"""The built-in demo webhook receiver behind `lmtp-bridge demo`: prints every delivery it gets.
A recipient `status-NNN@...` is answered with HTTP NNN, to try the status map by hand.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import hmac
import json
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from typing import Any, TextIO
from urllib.parse import unquote

from bridge.ops.httpserver import Handler, HttpRequest, HttpResponse, text_response

TEXT_LINES = 5
MAX_REMEMBERED = 10_000  # delivery ids whose tries the demo counts
TEXT_LINE_WIDTH = 100
SIGNATURE_TOLERANCE = 5 * 60
"""Seconds a webhook-timestamp may be off, as in the Standard Webhooks libraries."""

_STATUS_LOCAL_PART = re.compile(r"status-([2-5][0-9][0-9])", re.IGNORECASE)


@dataclass
class Delivery:
    """What the demo could read from one request, whatever its payload type."""

    payload: str
    delivery_id: str = "-"
    attempt: int = 1  # how many times this receiver has seen this delivery id
    rcpt_to: str = ""
    recipients: list[str] = field(default_factory=list)  # a per-message request's, in order
    mail_from: str = ""
    subject: str = ""
    size: int = 0
    text: str = ""
    attachments: list[str] = field(default_factory=list)
    problem: str = ""


def demo_handler(out: TextIO = sys.stdout, secrets: Sequence[str] = ()) -> Handler:
    """A handler that prints each POSTed delivery to `out` and answers 200 (or `status-NNN`).

    `secrets` are `whsec_...` strings; when given, each delivery shows whether its Standard
    Webhooks signature verified. Raises ValueError for a secret that is not base64.
    """
    keys = [_secret_key(secret) for secret in secrets]
    # Tries per delivery id (a retry, in the session or from the MTA's queue, keeps the id):
    # the most recent ids only, so a long demo cannot grow it without end.
    tries: OrderedDict[str, int] = OrderedDict()

    async def handle(request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return text_response(405, "demo: POST deliveries here", [("allow", "POST")])
        delivery = parse_delivery(request)
        delivery.attempt = tries.pop(delivery.delivery_id, 0) + 1
        tries[delivery.delivery_id] = delivery.attempt
        if len(tries) > MAX_REMEMBERED:
            tries.popitem(last=False)
        requested = _requested_status(delivery.rcpt_to)
        if delivery.recipients and not delivery.problem:  # per-message: a verdict each
            verdicts = {r: s for r in delivery.recipients if (s := _requested_status(r))}
            signature = _signature_line(request, keys) if keys else None
            _print_block(out, delivery, signature, 200, verdicts)
            body = json.dumps({"recipients": verdicts}).encode()
            return HttpResponse(200, [("content-type", "application/json")], body)
        if requested is not None:
            status, answer = requested, f"demo: answering {requested}"
        elif delivery.problem:
            status = 415 if delivery.payload == "unknown" else 400
            answer = f"demo: {delivery.problem}"
        else:
            status, answer = 200, "demo: delivered"
        signature = _signature_line(request, keys) if keys else None
        _print_block(out, delivery, signature, status)
        return text_response(status, answer)

    return handle


def parse_delivery(request: HttpRequest) -> Delivery:
    """Read the envelope and message summary out of a json, raw or multipart request."""
    content_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    delivery_id = request.header("webhook-id") or request.header("x-lmtp-bridge-delivery-id") or "-"
    if content_type == "application/json":
        delivery = Delivery("json", delivery_id, size=len(request.body))
        try:
            document = json.loads(request.body)
        except ValueError as exc:
            delivery.problem = f"cannot parse JSON: {exc}"
            return delivery
        _read_json(delivery, document)
    elif content_type == "message/rfc822":
        delivery = Delivery("raw", delivery_id, size=len(request.body))
        _read_raw(delivery, request)
    elif content_type == "multipart/form-data":
        delivery = Delivery("multipart", delivery_id, size=len(request.body))
        _read_multipart(delivery, request)
    else:
        delivery = Delivery("unknown", delivery_id, size=len(request.body))
        delivery.problem = f"unsupported content type {content_type or '(none)'}"
    # The header is present on every payload type; the JSON envelope wins when both exist.
    if not delivery.rcpt_to and not delivery.recipients:
        named = [unquote(v) for k, v in request.headers if k == "x-lmtp-rcpt-to"]
        if len(named) > 1:  # a per-message raw request names each recipient
            delivery.recipients = named
        else:
            delivery.rcpt_to = named[0] if named else ""
    if not delivery.mail_from:
        delivery.mail_from = unquote(request.header("x-lmtp-mail-from") or "")
    return delivery


def _read_json(delivery: Delivery, document: Any) -> None:
    if not isinstance(document, dict):
        delivery.problem = "JSON payload is not an object"
        return
    _read_envelope(delivery, document.get("envelope"))
    _read_message(delivery, document.get("message"))


def _read_envelope(delivery: Delivery, envelope: Any) -> None:
    if not isinstance(envelope, dict):
        delivery.problem = "no envelope object"
        return
    delivery.rcpt_to = str(envelope.get("rcpt_to") or "")
    listed = envelope.get("recipients")
    if isinstance(listed, list):
        delivery.recipients = [str(r.get("address")) for r in listed if isinstance(r, dict)]
    delivery.mail_from = str(envelope.get("mail_from") or "")
    if isinstance(envelope.get("size"), int):
        delivery.size = envelope["size"]


def _read_message(delivery: Delivery, message: Any) -> None:
    if not isinstance(message, dict):
        delivery.problem = "no message object"
        return
    delivery.subject = str(message.get("subject") or "")
    delivery.text = str(message.get("text") or "")
    for attachment in message.get("attachments") or []:
        if isinstance(attachment, dict):
            delivery.attachments.append(_attachment_label(attachment))


def _attachment_label(attachment: dict[str, Any]) -> str:
    name = attachment.get("filename") or "(no name)"
    return f"{name} ({attachment.get('content_type', '?')}, {attachment.get('size', '?')} bytes)"


def _read_raw(delivery: Delivery, request: HttpRequest) -> None:
    message = email.message_from_bytes(request.body, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    delivery.subject = str(message.get("subject") or "")
    body = message.get_body(preferencelist=("plain",))
    if body is not None:
        try:
            delivery.text = body.get_content() if isinstance(body, EmailMessage) else ""
        except (LookupError, ValueError):  # unknown charset or broken encoding: show nothing
            delivery.text = ""
    for part in message.iter_attachments():
        size = len(part.get_payload(decode=True) or b"")
        label = {"filename": part.get_filename(), "content_type": part.get_content_type()}
        delivery.attachments.append(_attachment_label({**label, "size": size}))


def _read_multipart(delivery: Delivery, request: HttpRequest) -> None:
    # The email parser reads multipart/form-data once it is given the Content-Type line.
    head = f"content-type: {request.header('content-type')}\r\n\r\n".encode("latin-1")
    form = email.message_from_bytes(head + request.body, policy=email.policy.default)
    assert isinstance(form, EmailMessage)
    if not form.is_multipart():
        delivery.problem = "multipart body without parts"
        return
    for part in form.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name in ("envelope", "message"):
            try:
                document = json.loads(_part_bytes(part))
            except ValueError as exc:
                delivery.problem = f"cannot parse form field {name}: {exc}"
                return
            reader = _read_envelope if name == "envelope" else _read_message
            reader(delivery, document)
        elif part.get_filename() is not None:
            size = len(_part_bytes(part))
            label = {"filename": part.get_filename(), "content_type": part.get_content_type()}
            delivery.attachments.append(_attachment_label({**label, "size": size}))


def _part_bytes(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _requested_status(rcpt_to: str) -> int | None:
    local_part = rcpt_to.rpartition("@")[0] or rcpt_to
    match = _STATUS_LOCAL_PART.fullmatch(local_part)
    return int(match.group(1)) if match else None


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ValueError("a webhook secret must be whsec_ followed by base64") from exc
    if not key:
        raise ValueError("a webhook secret must not be empty")
    return key


def verify_signature(request: HttpRequest, keys: Sequence[bytes], now: float) -> str | None:
    """None when a `v1` signature matches one of `keys`, else why not (Standard Webhooks)."""
    delivery_id = request.header("webhook-id")
    timestamp = request.header("webhook-timestamp")
    signatures = request.header("webhook-signature")
    if not (delivery_id and timestamp and signatures):
        return "webhook-id, webhook-timestamp or webhook-signature missing"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "webhook-timestamp is not a number"
    if abs(now - sent_at) > SIGNATURE_TOLERANCE:
        return f"webhook-timestamp is {int(now - sent_at)} s off"
    signed = b"%s.%s.%s" % (delivery_id.encode(), timestamp.encode(), request.body)
    expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in keys]
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            continue
        if any(hmac.compare_digest(given, digest) for digest in expected):
            return None
    return "no signature matches the configured secrets"


def _signature_line(request: HttpRequest, keys: Sequence[bytes]) -> str:
    problem = verify_signature(request, keys, time.time())
    return "verified" if problem is None else f"NOT verified ({problem})"


def _print_block(
    out: TextIO,
    delivery: Delivery,
    signature: str | None,
    status: int,
    verdicts: dict[str, int] | None = None,
) -> None:
    to = delivery.rcpt_to or ", ".join(delivery.recipients) or "(unknown)"
    lines = [
        f"--- delivery {delivery.delivery_id} (attempt {delivery.attempt}) ---",
        f"  to:          {to}",
        f"  from:        {delivery.mail_from or '<>'}",
        f"  subject:     {delivery.subject or '(none)'}",
        f"  size:        {delivery.size} bytes",
        f"  payload:     {delivery.payload}",
    ]
    if signature is not None:
        lines.append(f"  signature:   {signature}")
    if delivery.attachments:
        lines.append(f"  attachments: {', '.join(delivery.attachments)}")
    if delivery.problem:
        lines.append(f"  problem:     {delivery.problem}")
    text_lines = delivery.text.splitlines()
    if text_lines:
        lines.append("  text:")
        for line in text_lines[:TEXT_LINES]:
            cut = line[:TEXT_LINE_WIDTH] + ("..." if len(line) > TEXT_LINE_WIDTH else "")
            lines.append(f"    | {cut}")
        if len(text_lines) > TEXT_LINES:
            lines.append(f"    | ... ({len(text_lines) - TEXT_LINES} more lines)")
    lines.append(f"  answer:      {status}")
    if verdicts:
        lines.append("  verdicts:    " + ", ".join(f"{r} {s}" for r, s in verdicts.items()))
    block = "\n".join(lines) + "\n\n"
    try:
        out.write(block)
    except UnicodeEncodeError:  # a terminal that cannot show the subject must not fail delivery
        out.write(block.encode("ascii", "backslashreplace").decode("ascii"))
    out.flush()
