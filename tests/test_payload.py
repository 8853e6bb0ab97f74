"""The webhook bodies a receiver gets: json, raw and multipart, from clean and broken mail."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.base.route import Route
from bridge.base.transaction import Envelope, MessageBuffer, Recipient
from bridge.mail.parsed import ParsedMessage
from bridge.webhook.payload import WebhookBody, build_body, envelope_object
from bridge.webhook.render import attachment_object, message_json
from bridge.webhook.signing import delivery_id

ROUTE = Route(name="default", url="http://127.0.0.1:9/hook")
RECEIVED = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
HOST = "bridge.example.com"


def make_envelope(**overrides: Any) -> Envelope:
    values: dict[str, Any] = {
        "mail_from": "alice@example.org",
        "lhlo": "mx1.example.org",
        "client_address": "127.0.0.1",
        "body": "8BITMIME",
        "smtputf8": False,
        "size": None,
        "received_at": RECEIVED,
    }
    values.update(overrides)
    return Envelope(**values)


def make_buffer(data: bytes, threshold: int = 1 << 20, piece: int = 7) -> MessageBuffer:
    buf = MessageBuffer(threshold)
    for i in range(0, len(data), piece):  # arrives in pieces, as from the socket
        buf.write(data[i : i + piece])
    return buf


def body_bytes(body: WebhookBody) -> bytes:
    data = b"".join(body.chunks())
    assert len(data) == body.length
    assert b"".join(body.chunks()) == data  # a retry re-sends the same bytes
    return data


def build(
    kind: str,
    raw: bytes,
    rcpt: str = "bob@example.net",
    *,
    envelope: Envelope | None = None,
    buf: MessageBuffer | None = None,
    parsed: ParsedMessage | None = None,
    orcpt: str | None = None,
    include_raw: bool = False,
) -> tuple[WebhookBody, bytes]:
    buf = buf or make_buffer(raw)
    recipient = Recipient(address=rcpt, route=ROUTE, orcpt=orcpt)
    body = build_body(
        kind,
        envelope or make_envelope(),
        recipient,
        buf,
        parsed,
        delivery_id(buf.digest(), rcpt),
        HOST,
        include_raw=include_raw,
    )
    return body, body_bytes(body)


def as_json(raw: bytes, **kwargs: Any) -> dict[str, Any]:
    body, data = build("json", raw, **kwargs)
    assert body.content_type == "application/json"
    result: dict[str, Any] = json.loads(data)
    return result


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


PLAIN = crlf(
    """\
From: Alice Example <alice@example.org>
To: Bob <bob@example.net>
Cc: carol@example.net
Reply-To: help@example.org
Subject: Lunch on Friday
Date: Sat, 28 Nov 2026 09:59:58 +0100
Message-ID: <lunch.1@example.org>
In-Reply-To: <prev.0@example.net>
References: <root@example.net>
 <prev.0@example.net>

Shall we meet at noon?
"""
)

ALTERNATIVE = crlf(
    """\
From: alice@example.org
To: bob@example.net
Subject: Report
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8

The report is attached.
--alt
Content-Type: text/html; charset=utf-8

<p>The report is <b>attached</b>.</p>
--alt--
--outer
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename="report.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcOkw7zDtsOf
--outer
Content-Type: image/png
Content-Disposition: inline
Content-ID: <logo@example.org>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--outer--
"""
)


# --- json ---------------------------------------------------------------------------


def test_plain_text_mail() -> None:
    doc = as_json(PLAIN, orcpt="rfc822;bob@example.net")
    assert doc["version"] == 1
    assert doc["delivery_id"].startswith("msg_")
    assert doc["envelope"] == {
        "mail_from": "alice@example.org",
        "rcpt_to": "bob@example.net",
        "rcpt_local": "bob",
        "rcpt_domain": "example.net",
        "rcpt_user": "bob",
        "rcpt_tag": None,
        "lhlo": "mx1.example.org",
        "client_address": "127.0.0.1",
        "body": "8BITMIME",
        "smtputf8": False,
        "size": len(PLAIN),
        "orcpt": "rfc822;bob@example.net",
        "xforward": {},
        "received_at": "2026-11-28T10:00:00Z",
    }
    msg = doc["message"]
    assert msg["message_id"] == "<lunch.1@example.org>"
    assert msg["subject"] == "Lunch on Friday"
    assert msg["date"] == "2026-11-28T09:59:58+01:00"
    assert msg["from"] == [{"name": "Alice Example", "address": "alice@example.org"}]
    assert msg["to"] == [{"name": "Bob", "address": "bob@example.net"}]
    assert msg["cc"] == [{"name": "", "address": "carol@example.net"}]
    assert msg["reply_to"] == [{"name": "", "address": "help@example.org"}]
    assert msg["in_reply_to"] == "<prev.0@example.net>"
    assert msg["references"] == ["<root@example.net>", "<prev.0@example.net>"]
    assert [name for name, _ in msg["headers"]] == [
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
    ]
    assert ["Subject", "Lunch on Friday"] in msg["headers"]
    assert msg["text"] == "Shall we meet at noon?\n"
    assert msg["html"] is None
    assert (msg["text_charset"], msg["html_charset"]) == (None, None)
    assert msg["auth"] is None
    assert msg["attachments"] == []
    assert doc["defects"] == []
    assert "raw" not in doc


def test_envelope_details_from_the_session() -> None:
    envelope = make_envelope(
        body=None,
        smtputf8=True,
        client_address="unix",
        xforward={"NAME": "mail.example.org", "ADDR": "192.0.2.7", "PROTO": "ESMTP"},
        received_at=datetime(2026, 11, 28, 11, 0, 0, tzinfo=timezone(timedelta(hours=1))),
    )
    env = as_json(PLAIN, envelope=envelope)["envelope"]
    assert env["body"] is None
    assert env["smtputf8"] is True
    assert env["client_address"] == "unix"
    assert env["xforward"] == {"name": "mail.example.org", "addr": "192.0.2.7", "proto": "ESMTP"}
    assert env["received_at"] == "2026-11-28T10:00:00Z"


def test_multipart_alternative_with_attachment() -> None:
    msg = as_json(ALTERNATIVE)["message"]
    assert msg["text"] == "The report is attached."
    assert msg["html"] == "<p>The report is <b>attached</b>.</p>"
    assert (msg["text_charset"], msg["html_charset"]) == ("utf-8", "utf-8")
    pdf, logo = msg["attachments"]
    pdf_bytes = base64.b64decode(pdf.pop("content"))
    assert pdf_bytes.startswith(b"%PDF-1.4")
    assert pdf == {
        "filename": "report.pdf",
        "content_type": "application/pdf",
        "size": len(pdf_bytes),
        "disposition": "attachment",
        "content_id": None,
        "charset": None,
        "text": None,
    }
    assert base64.b64decode(logo["content"]) == b"\x89PNG\r\n\x1a\n"
    assert logo["disposition"] == "inline"
    assert logo["content_id"] == "<logo@example.org>"
    assert logo["filename"] is None


def test_later_text_parts_and_forwarded_mail_become_attachments() -> None:
    raw = crlf(
        """\
Subject: fwd
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

first
--b
Content-Type: text/plain; charset=utf-8

footer
--b
Content-Type: text/plain
Content-Disposition: attachment; filename="notes.txt"

notes
--b
Content-Type: message/rfc822

Subject: inner
Content-Type: text/html

<p>inner html</p>
--b--
"""
    )
    msg = as_json(raw)["message"]
    assert msg["text"] == "first"
    assert msg["html"] is None  # the forwarded message's HTML is not this message's
    names = [(a["content_type"], a["filename"]) for a in msg["attachments"]]
    assert names == [
        ("text/plain", None),
        ("text/plain", "notes.txt"),
        ("message/rfc822", None),
    ]
    inner = base64.b64decode(msg["attachments"][2]["content"])
    assert b"Subject: inner" in inner
    assert b"<p>inner html</p>" in inner


def test_rfc2047_subject_and_names() -> None:
    raw = crlf(
        """\
From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.org>
To: bob@example.net
Subject: =?iso-8859-1?q?Gr=FC=DFe?= aus =?utf-8?b?S8O2bG4=?=

hi
"""
    )
    msg = as_json(raw)["message"]
    assert msg["subject"] == "Grüße aus Köln"
    assert msg["from"] == [{"name": "Jörg Müller", "address": "joerg@example.org"}]
    assert ["Subject", "Grüße aus Köln"] in msg["headers"]


def test_latin1_declared_body() -> None:
    raw = (
        b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe aus K\xf6ln\r\n"
    )
    assert as_json(raw)["message"]["text"] == "Grüße aus Köln\n"


def test_quoted_printable_windows_1252_html() -> None:
    raw = (
        b"Content-Type: text/html; charset=windows-1252\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n<p>=80 5 =96 caf=E9</p>\r\n"
    )
    assert as_json(raw)["message"]["html"] == "<p>\u20ac 5 \u2013 caf\u00e9</p>\n"


def test_undeclared_8bit_utf8_body_and_headers() -> None:
    # Postfix passes UTF-8 headers as raw 8-bit bytes, without RFC 2047.
    raw = (
        "From: Jörg <jörg@exämple.org>\r\n"
        "To: bob@example.net\r\n"
        "Subject: Grüße aus Köln ✓\r\n\r\n"
        "Hällo, wie geht's? ✓\r\n"
    ).encode()
    msg = as_json(raw)["message"]
    assert msg["subject"] == "Grüße aus Köln ✓"
    assert msg["from"] == [{"name": "Jörg", "address": "jörg@exämple.org"}]
    assert ["Subject", "Grüße aus Köln ✓"] in msg["headers"]
    assert msg["text"] == "Hällo, wie geht's? ✓\n"


def test_undeclared_8bit_that_is_not_utf8_falls_back_to_windows_1252() -> None:
    raw = b"Subject: Gr\xfc\xdfe \x80\r\n\r\nK\xf6ln \x93quoted\x94 \x81\r\n"
    msg = as_json(raw)["message"]
    assert msg["subject"] == "Grüße €"
    # Windows-1252 where it assigns a character, Latin-1 for its five holes (0x81 here)
    assert msg["text"] == "Köln \u201cquoted\u201d \x81\n"


def test_unknown_charset_is_decoded_and_reported() -> None:
    raw = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nK\xc3\xb6ln\r\n"
    doc = as_json(raw)
    assert doc["message"]["text"] == "Köln\n"
    assert any("x-no-such-charset" in d for d in doc["defects"])


def test_unparsable_date_is_null() -> None:
    raw = b"Date: the day after tomorrow\r\nSubject: x\r\n\r\nbody\r\n"
    doc = as_json(raw)
    assert doc["message"]["date"] is None
    assert ["Date", "the day after tomorrow"] in doc["message"]["headers"]
    assert any(d.startswith("Date: InvalidDateDefect") for d in doc["defects"])


def test_null_sender_is_empty_string() -> None:
    envelope = make_envelope(mail_from="")
    assert as_json(PLAIN, envelope=envelope)["envelope"]["mail_from"] == ""
    body, data = build("raw", PLAIN, envelope=envelope)
    assert data.startswith(b"Return-Path: <>\r\n")
    assert ("X-Lmtp-Mail-From", "") in body.headers


def test_include_raw_round_trips() -> None:
    doc = as_json(ALTERNATIVE, include_raw=True)
    assert base64.b64decode(doc["raw"]) == ALTERNATIVE


def test_broken_mime_is_still_delivered_with_defects() -> None:
    raw = crlf(
        """\
Subject: broken
Content-Type: multipart/mixed; boundary="zzz"

--zzz
Content-Type: text/plain

still readable
--zzz
Content-Type: application/octet-stream; name="data.bin"
Content-Disposition: attachment; filename="data.bin"
Content-Transfer-Encoding: base64

QUJD*REVG=x=
"""
    )
    for kind in ("json", "multipart"):
        _, data = build(kind, raw)
        assert data
    doc = as_json(raw)
    assert doc["message"]["subject"] == "broken"
    assert doc["message"]["text"] == "still readable"
    [attachment] = doc["message"]["attachments"]
    assert attachment["filename"] == "data.bin"
    assert doc["defects"]
    assert any("CloseBoundaryNotFound" in d for d in doc["defects"])
    assert any("Base64" in d for d in doc["defects"])


def test_missing_boundary_parameter_keeps_the_text() -> None:
    raw = b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\nwhat is left\r\n"
    doc = as_json(raw)
    assert doc["message"]["text"] == "what is left\n"
    assert doc["defects"]


def test_header_that_crashes_the_stdlib_parser_keeps_the_structure() -> None:
    # A trailing "charset*" makes email._header_value_parser raise IndexError.
    raw = crlf(
        """\
Subject: odd
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain; charset*

hello
--b
Content-Type: application/zip; name*
Content-Disposition: attachment; filename="a.zip"

PK
--b--
"""
    )
    doc = as_json(raw)
    assert doc["message"]["text"] == "hello"
    [attachment] = doc["message"]["attachments"]
    assert attachment["content_type"] == "application/zip"
    assert attachment["filename"] == "a.zip"
    assert not any("ParserError" in d for d in doc["defects"])


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_valid_json(noise: bytes) -> None:
    for raw in (noise, ALTERNATIVE[: len(noise)] + noise):
        doc = as_json(raw)
        assert doc["envelope"]["size"] == len(raw)
        assert isinstance(doc["defects"], list)


def test_addresses_that_are_not_utf8_still_give_valid_json() -> None:
    rcpt = b"b\xf6b@example.net".decode("utf-8", "surrogateescape")
    doc = as_json(PLAIN, rcpt=rcpt)
    assert doc["envelope"]["rcpt_to"] == rcpt


# --- one parse, many recipients -----------------------------------------------------


RECIPIENTS = ["bob@example.net", "carol@example.net", "dave+tag@example.com"]


@pytest.mark.parametrize("kind", ["json", "raw", "multipart"])
def test_bcc_each_copy_names_only_its_own_recipient(kind: str) -> None:
    raw = crlf("From: alice@example.org\nTo: team@example.org\nSubject: plans\n\nhello\n")
    buf = make_buffer(raw)
    parsed = ParsedMessage.parse(buf.getvalue())  # once, shared by all three
    for rcpt in RECIPIENTS:
        body, data = build(kind, raw, rcpt, buf=buf, parsed=parsed)
        header_text = " ".join(v for _, v in body.headers)
        assert rcpt.encode() in data
        for other in RECIPIENTS:
            if other != rcpt:
                assert other.encode() not in data
                assert other.split("@")[0] not in header_text
        if kind == "json":
            assert json.loads(data)["envelope"]["rcpt_to"] == rcpt


def test_ids_differ_per_recipient_and_parse_is_optional() -> None:
    buf = make_buffer(PLAIN)
    parsed = ParsedMessage.parse(PLAIN)
    shared = [json.loads(build("json", PLAIN, r, buf=buf, parsed=parsed)[1]) for r in RECIPIENTS]
    alone = [json.loads(build("json", PLAIN, r, buf=buf)[1]) for r in RECIPIENTS]
    assert shared == alone
    assert len({doc["delivery_id"] for doc in shared}) == len(RECIPIENTS)


def test_unknown_payload_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        build("xml", PLAIN)


# --- raw ----------------------------------------------------------------------------


def test_raw_is_trace_headers_then_the_exact_message() -> None:
    body, data = build("raw", ALTERNATIVE)
    assert body.content_type == "message/rfc822"
    assert data.endswith(ALTERNATIVE)
    trace = data[: -len(ALTERNATIVE)]
    did = delivery_id(make_buffer(ALTERNATIVE).digest(), "bob@example.net")
    assert trace == (
        b"Return-Path: <alice@example.org>\r\n"
        b"Delivered-To: bob@example.net\r\n"
        b"Received: from mx1.example.org ([127.0.0.1])\r\n"
        b"\tby bridge.example.com with LMTP id "
        + did.removeprefix("msg_")[:16].encode()
        + b"; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    )
    # The trace headers read back as ordinary headers of the message.
    parsed = BytesParser(policy=policy.default).parsebytes(data)
    assert parsed["Return-Path"] == "<alice@example.org>"
    assert parsed["Delivered-To"] == "bob@example.net"
    assert "with LMTP" in parsed["Received"]
    assert parsed["Subject"] == "Report"


def test_raw_from_a_spooled_message_streams_the_file() -> None:
    # Bare LF, a lone CR and a long line must all survive byte for byte.
    raw = crlf("Subject: big\n\n") + b"bare\nlf and lone\rcr\r\n" + b"x" * 70_000 + b"\r\n"
    buf = make_buffer(raw, threshold=64, piece=1000)
    assert buf.spooled
    body, data = build("raw", raw, buf=buf)
    assert data.endswith(raw)
    assert body.length == len(data)
    assert data.count(b"Received: ") == 1


def test_raw_ipv6_client_and_addresses_with_utf8() -> None:
    envelope = make_envelope(mail_from="jörg+news@exämple.org", client_address="2001:db8::1")
    body, data = build("raw", PLAIN, "zoë.o'neil@example.net", envelope=envelope)
    headers = dict(body.headers)
    assert headers["X-Lmtp-Mail-From"] == "j%C3%B6rg+news@ex%C3%A4mple.org"
    assert headers["X-Lmtp-Rcpt-To"] == "zo%C3%AB.o'neil@example.net"
    assert all(v.isascii() for v in headers.values())
    assert "Return-Path: <jörg+news@exämple.org>\r\n".encode() in data
    assert b"([IPv6:2001:db8::1])" in data


def test_percent_and_space_are_encoded_so_decoding_is_exact() -> None:
    from urllib.parse import unquote

    rcpt = '"odd %20 name"@example.net'
    body, _ = build("raw", PLAIN, rcpt)
    assert unquote(dict(body.headers)["X-Lmtp-Rcpt-To"]) == rcpt


# --- multipart ----------------------------------------------------------------------


def payload_of(part: Any) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def parse_form(body: WebhookBody, data: bytes) -> EmailMessage:
    head = f"Content-Type: {body.content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    form = BytesParser(policy=policy.default).parsebytes(head + data)
    assert isinstance(form, EmailMessage)
    assert not form.defects
    return form


def test_multipart_form_fields() -> None:
    body, data = build("multipart", ALTERNATIVE)
    assert body.content_type.startswith("multipart/form-data; boundary=")
    form = parse_form(body, data)
    parts = list(form.iter_parts())
    names = [p.get_param("name", header="content-disposition") for p in parts]
    assert names == ["envelope", "message", "defects", "attachment1", "attachment2"]

    envelope = json.loads(payload_of(parts[0]))
    assert parts[0].get_content_type() == "application/json"
    assert envelope["rcpt_to"] == "bob@example.net"
    assert envelope["size"] == len(ALTERNATIVE)

    message = json.loads(payload_of(parts[1]))
    assert message["subject"] == "Report"
    assert message["text"] == "The report is attached."
    assert all("content" not in a for a in message["attachments"])
    assert [a["filename"] for a in message["attachments"]] == ["report.pdf", None]
    assert json.loads(payload_of(parts[2])) == []

    pdf, logo = parts[3], parts[4]
    assert pdf.get_filename() == "report.pdf"
    assert pdf.get_content_type() == "application/pdf"
    assert payload_of(pdf).startswith(b"%PDF-1.4")
    assert len(payload_of(pdf)) == message["attachments"][0]["size"]
    assert logo.get_filename() == "attachment2"
    assert payload_of(logo) == b"\x89PNG\r\n\x1a\n"


def test_multipart_boundary_is_random_and_filenames_are_escaped() -> None:
    raw = crlf(
        """\
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

hi
--b
Content-Type: text/csv
Content-Disposition: attachment; filename="=?utf-8?q?na=22me_=C3=A4.csv?="

a,b
--b--
"""
    )
    first, data = build("multipart", raw)
    second, _ = build("multipart", raw)
    assert first.content_type != second.content_type
    assert 'filename="na%22me ä.csv"'.encode() in data
    message = json.loads(payload_of(list(parse_form(first, data).iter_parts())[1]))
    assert message["attachments"][0]["filename"] == 'na"me ä.csv'


# --- large messages: the body is spliced from pieces, byte for byte the simple dump ----------


def _simple_dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _simple_json_body(
    parsed: ParsedMessage, buf: MessageBuffer, rcpt: str, include_raw: bool
) -> bytes:
    """The json body built the plain way: each section dumped whole."""
    recipient = Recipient(address=rcpt, route=ROUTE)
    message = dict(parsed.fields)
    message["attachments"] = [attachment_object(a, with_content=True) for a in parsed.attachments]
    did = delivery_id(buf.digest(), rcpt)
    out = b'{"version":1,"delivery_id":' + _simple_dumps(did)
    out += b',"envelope":' + _simple_dumps(envelope_object(make_envelope(), recipient, buf))
    out += b',"message":' + _simple_dumps(message)
    out += b',"defects":' + _simple_dumps(parsed.defects)
    if include_raw:
        out += b',"raw":' + _simple_dumps(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out + b"}"


def _large_message() -> bytes:
    text = "".join(f'line {i}: ünïcödé "quoted" \\ tab\t 😀 €\n' for i in range(40_000))
    msg = EmailMessage()
    msg["From"] = "Zoë <zoe@example.org>"
    msg["Subject"] = "large"
    msg.set_content(text)
    msg.add_alternative(f"<p>{text}</p>", subtype="html")
    msg.add_attachment(
        bytes(range(256)) * 8_000 + b"x",
        maintype="application",
        subtype="octet-stream",
        filename="data.bin",
    )
    msg.add_attachment(text, subtype="plain", disposition="inline")
    return msg.as_bytes()


@pytest.mark.parametrize("include_raw", [False, True])
@pytest.mark.parametrize("threshold", [1 << 24, 1 << 16])  # in memory, spooled
def test_large_json_body_equals_the_simple_dump(include_raw: bool, threshold: int) -> None:
    raw = _large_message()
    buf = make_buffer(raw, threshold=threshold, piece=65_536)
    parsed = ParsedMessage.parse(buf.getvalue())
    assert parsed.fields["text"] and len(parsed.fields["text"]) > 1_000_000
    assert len(parsed.attachments) == 2 and parsed.attachments[1].text
    body, data = build("json", raw, buf=buf, parsed=parsed, include_raw=include_raw)
    assert data == _simple_json_body(parsed, buf, "bob@example.net", include_raw)
    # really spliced: no piece holds a whole big text or the whole base64 content
    assert max(len(c) for c in body.chunks()) < 1_500_000
    # the variant without content (multipart) is the same object minus "content"
    message = json.loads(message_json(parsed, with_content=False))
    for att in message["attachments"]:
        assert "content" not in att
    full = json.loads(message_json(parsed, with_content=True))
    for att in full["attachments"]:
        del att["content"]
    assert full == message


def test_large_text_with_a_lone_surrogate_is_escaped_alike_in_every_piece() -> None:
    # A lone surrogate cannot be UTF-8: the whole message object falls back to \u-escapes.
    big = "é😀 text\n" * 50_000 + "\udcff end"
    fields = ParsedMessage.parse(b"Subject: x\r\n\r\nx").fields
    fields["text"] = big
    fields["html"] = "<b>é</b>" * 20_000
    parsed = ParsedMessage(fields, [], [])
    raw = b"Subject: x\r\n\r\nx"
    buf = make_buffer(raw)
    _, data = build("json", raw, buf=buf, parsed=parsed)
    assert data == _simple_json_body(parsed, buf, "bob@example.net", False)
    assert b"\\udcff" in data and b"\\u00e9" in data
    assert json.loads(data)["message"]["text"] == big


@pytest.mark.parametrize("tail", [b"", b"A", b"AB", b"!!*", b"ABCDE"])
def test_large_base64_parts_decode_as_the_stdlib_does(tail: bytes) -> None:
    # Large parts are decoded without the stdlib's copies: same bytes, same defects.
    blob = bytes(range(256)) * 1_000
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: BASE64\r\n\r\n"
        + base64.encodebytes(blob).replace(b"\n", b"\r\n")
        + tail
        + b"\r\n--q\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + b"plain text line\r\n" * 10_000
        + b"--q--\r\n"
    )
    parsed = ParsedMessage.parse(raw)
    reference = BytesParser(policy=policy.default).parsebytes(raw)
    binary = reference.get_payload()[0]
    assert parsed.attachments[0].content == binary.get_payload(decode=True)
    assert parsed.fields["text"] == ("plain text line\n" * 10_000)[:-1]  # CRLF before "--q"
    expected = [f"part 1: {type(d).__name__}" for d in binary.defects]
    assert [d for d in parsed.defects if d.startswith("part 1:")] == expected
    assert bool(expected) == (tail != b"")


# --- the JSON encoder --------------------------------------------------------------------


def test_encoder_writes_json_module_bytes_for_every_code_point() -> None:
    """Payloads are encoded with orjson; receivers were promised the json module's bytes."""
    from bridge.webhook.pieces import _encode

    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    for i in range(0, len(chars), 4096):
        block = chars[i : i + 4096]
        expected = json.dumps(block, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        assert _encode(block, ensure_ascii=False) == expected


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.text(st.characters(blacklist_categories=())),  # lone surrogates too
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_encoder_matches_json_module_on_payload_shaped_values(value: Any) -> None:
    from bridge.webhook.pieces import _dumps

    try:
        expected = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the \u-escaped form instead
        expected = json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    assert _dumps(value) == expected
