"""Nothing a message names about a part steers the multipart form: no decoded header value,
RFC 2047/2231 name or content type adds a header or a parameter to a form part; file names
carry no control or bidi character; content types are type/subtype tokens (issue 15, item 5)."""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.base.route import Route
from bridge.base.transaction import Envelope, MessageBuffer, Recipient
from bridge.mail.names import checked_content_type, safe_filename
from bridge.webhook.payload import WebhookBody, build_body
from bridge.webhook.signing import delivery_id

ROUTE = Route(name="default", url="http://127.0.0.1:9/hook")
ENVELOPE = Envelope("alice@example.org", "mx.example.org", "127.0.0.1", None, False, None,
                    received_at=datetime(2026, 11, 28, tzinfo=UTC))  # fmt: skip
TOKEN_TYPE = re.compile(r"[!#$%&'*+\-.^_`{|}~0-9a-z]+/[!#$%&'*+\-.^_`{|}~0-9a-z]+")


def build(kind: str, raw: bytes) -> tuple[WebhookBody, bytes]:
    buf = MessageBuffer(1 << 20)
    buf.write(raw)
    recipient = Recipient("bob@example.net", ROUTE)
    body = build_body(
        kind, ENVELOPE, recipient, buf, None, delivery_id(buf.digest(), "b"), "bridge.test"
    )
    return body, b"".join(body.chunks())


def with_attachment(*headers: str, content: bytes = b"%PDF-1.4 ...") -> bytes:
    lines = [
        "Subject: hostile names",
        'Content-Type: multipart/mixed; boundary="b"',
        "",
        "--b",
        "Content-Type: text/plain",
        "",
        "see attached",
        "--b",
        *headers,
        "Content-Transfer-Encoding: base64",
        "",
        base64.b64encode(content).decode(),
        "--b--",
        "",
    ]
    return "\r\n".join(lines).encode()


def form_heads(body: WebhookBody, data: bytes) -> list[list[bytes]]:
    """The header lines of each form part, straight from the bytes (no lenient parser)."""
    boundary = body.content_type.split('boundary="', 1)[1].rstrip('"').encode()
    parts = data.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    heads = []
    for part in parts[1:-1]:
        assert part.startswith(b"\r\n")
        head, sep, _ = part[2:].partition(b"\r\n\r\n")
        assert sep
        heads.append(head.split(b"\r\n"))
    return heads


def parse_form(body: WebhookBody, data: bytes) -> EmailMessage:
    head = f"Content-Type: {body.content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    form = BytesParser(policy=policy.default).parsebytes(head + data)
    assert isinstance(form, EmailMessage)
    return form


def json_message(kind: str, raw: bytes) -> dict[str, Any]:
    body, data = build(kind, raw)
    if kind == "json":
        result: dict[str, Any] = json.loads(data)
        return result
    parts = list(parse_form(body, data).iter_parts())
    message = json.loads(parts[1].get_payload(decode=True))
    message["defects"] = json.loads(parts[2].get_payload(decode=True))
    return {"message": message, "defects": message["defects"]}


def check_attachment_head(head: list[bytes]) -> None:
    """Exactly our two header lines: a disposition with name and filename, a token type."""
    assert len(head) == 2, head
    disposition, ctype = (line.decode("utf-8") for line in head)
    match = re.fullmatch(r'Content-Disposition: form-data; name="(attachment\d+)"; '
                         r'filename="([^"\r\n]*)"', disposition)  # fmt: skip
    assert match, disposition
    assert safe_filename(match.group(2)) == match.group(2)  # no control or bidi character
    assert ctype.startswith("Content-Type: ") and TOKEN_TYPE.fullmatch(ctype[14:]), ctype


def test_an_encoded_content_type_cannot_add_a_form_header() -> None:
    # issue 15: this put "x-inj: 1" into the attachment's form part
    raw = with_attachment(
        "Content-Type: =?utf-8?q?text/html=0D=0AX-Inj:_1?=",
        'Content-Disposition: attachment; filename="a.html"',
    )
    body, data = build("multipart", raw)
    heads = form_heads(body, data)
    assert len(heads) == 4
    check_attachment_head(heads[3])
    assert heads[3][1] == b"Content-Type: application/octet-stream"
    assert b"x-inj" not in data.lower().split(b"\r\n\r\n", 1)[0]
    assert all(b"x-inj" not in line.lower() for head in heads for line in head)
    for kind in ("json", "multipart"):
        got = json_message(kind, raw)
        (attachment,) = got["message"]["attachments"]
        assert attachment["content_type"] == "application/octet-stream"
        assert any("invalid content type" in d and "taken as application/octet-stream" in d
                   for d in got["defects"]), got["defects"]  # fmt: skip


HOSTILE_NAME = "in\x00voice\u202efdp.exe\r\nX-Inj: 1\u200e\x85\u2028\ud800.pdf"
SAFE_NAME = "in\ufffdvoice\ufffdfdp.exe\ufffd\ufffdX-Inj: 1\ufffd\ufffd\ufffd\ufffd.pdf"


@pytest.mark.parametrize(
    "disposition",
    [
        # RFC 2231: any octet, percent-encoded
        "Content-Disposition: attachment; filename*=utf-8''"
        + urllib.parse.quote(HOSTILE_NAME.encode("utf-8", "surrogatepass")),
        # RFC 2047 inside the quoted parameter, as many mailers write it
        'Content-Disposition: attachment; filename="=?utf-8?b?'
        + base64.b64encode(HOSTILE_NAME.encode("utf-8", "surrogatepass")).decode()
        + '?="',
    ],
)
def test_control_and_bidi_characters_in_file_names_are_replaced(disposition: str) -> None:
    raw = with_attachment("Content-Type: application/pdf", disposition)
    body, data = build("multipart", raw)
    heads = form_heads(body, data)
    check_attachment_head(heads[3])
    for kind in ("json", "multipart"):
        got = json_message(kind, raw)
        (attachment,) = got["message"]["attachments"]
        name = attachment["filename"]
        assert safe_filename(name) == name and "\u202e" not in name and "\x00" not in name
        assert name.startswith("in\ufffdvoice\ufffdfdp.exe") and name.endswith(".pdf")
        assert any("file name replaced" in d for d in got["defects"]), got["defects"]
    # the form's filename is the JSON's, with only '"', CR and LF percent-encoded
    form_name = heads[3][0].decode().split('filename="', 1)[1][:-1]
    assert form_name == attachment["filename"]


def test_ordinary_names_and_types_are_kept() -> None:
    name = "Résumé 👨\u200d👩\u200d👧 نامه\u200c.pdf"  # joiners stay: emoji and Persian need them
    assert safe_filename(name) == name
    assert checked_content_type("Application/PDF") == "application/pdf"
    assert checked_content_type("application/vnd.ms-excel.sheet.macroEnabled.12") is not None
    for bad in ("text/html\r\nx-inj: 1", "text/", "/x", "text/html; x=1", "a/b/c", "tëxt/x", ""):
        assert checked_content_type(bad) is None, bad


@settings(max_examples=150, deadline=None)
@given(name=st.text(min_size=1, max_size=40), ctype=st.text(min_size=1, max_size=40))
def test_no_name_or_type_adds_a_header_or_parameter_to_a_form_part(name: str, ctype: str) -> None:
    encoded_name = urllib.parse.quote(name.encode("utf-8", "surrogatepass"))
    encoded_type = base64.b64encode(ctype.encode("utf-8", "surrogatepass")).decode()
    raw = with_attachment(
        f"Content-Type: =?utf-8?b?{encoded_type}?=",
        f"Content-Disposition: attachment; filename*=utf-8''{encoded_name}",
    )
    body, data = build("multipart", raw)
    heads = form_heads(body, data)
    assert [len(h) for h in heads[:3]] == [2, 2, 2]
    for head in heads[3:]:
        check_attachment_head(head)
    # a strict reading agrees: one name and one filename parameter per attachment part
    for part in list(parse_form(body, data).iter_parts())[3:]:
        params = [k for k, _ in part.get_params(header="content-disposition") or []]
        assert params == ["form-data", "name", "filename"], params
