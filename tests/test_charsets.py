"""Charsets and MIME structure: CPython's own email test corpus (``test.test_email``'s
``data/msg_*.txt``) and crafted messages in the charsets and shapes mail really comes in."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bridge.mail.parsed import ParsedMessage
from bridge.webhook.render import message_json


def corpus_dir() -> Path:
    """CPython's email test messages; a Python without its test package fails the test."""
    try:
        import test.test_email  # type: ignore[import-not-found]
    except ImportError:
        pytest.fail(
            "CPython's test package is missing (Debian: apt-get install libpython3.11-testsuite)"
        )
    data = Path(os.path.dirname(test.test_email.__file__)) / "data"
    if not list(data.glob("msg_*.txt")):
        pytest.fail(f"no msg_*.txt in {data}")
    return data


CORPUS = sorted(p.name for p in corpus_dir().glob("msg_*.txt"))


def parse(raw: bytes) -> tuple[dict[str, Any], list[str]]:
    parsed = ParsedMessage.parse(raw)
    encoded = message_json(parsed, with_content=True)
    encoded.decode("utf-8")  # strict: no lone surrogates, no broken bytes
    return json.loads(encoded), parsed.defects


@pytest.mark.parametrize("name", CORPUS)
def test_every_cpython_corpus_message_gives_clean_json(name: str) -> None:
    msg, defects = parse((corpus_dir() / name).read_bytes())
    assert not any(d.startswith("ParserError") for d in defects), defects
    assert not any("unreadable part" in d for d in defects), defects
    for part in msg["attachments"]:
        assert part["size"] == len(base64.b64decode(part["content"]))
    texts = [msg["text"], msg["html"], *(a["text"] for a in msg["attachments"])]
    assert not any("\ufffd" in t for t in texts if t), "a text part did not decode"


def test_corpus_is_complete() -> None:
    assert len(CORPUS) >= 45


def test_corpus_charsets_are_decoded_and_reported() -> None:
    # msg_12: text/plain parts in us-ascii, iso-8859-2, iso-8859-3 and koi8-r, one after another
    msg, _ = parse((corpus_dir() / "msg_12.txt").read_bytes())
    assert msg["text_charset"] == "us-ascii"
    charsets = [(a["charset"], a["content_type"]) for a in msg["attachments"]]
    assert charsets == [
        ("iso-8859-2", "text/plain"),
        ("iso-8859-3", "text/plain"),
        ("us-ascii", "text/plain"),
        ("koi8-r", "text/plain"),
    ]
    assert all(a["text"] is not None for a in msg["attachments"])


def test_corpus_binary_attachment_and_message_rfc822() -> None:
    msg, _ = parse((corpus_dir() / "msg_07.txt").read_bytes())
    (gif,) = msg["attachments"]
    assert gif["filename"] == "dingusfish.gif" and gif["content_type"] == "image/gif"
    assert base64.b64decode(gif["content"]).startswith(b"GIF87a")
    msg, _ = parse((corpus_dir() / "msg_02.txt").read_bytes())
    forwarded = [a for a in msg["attachments"] if a["content_type"] == "message/rfc822"]
    assert len(forwarded) == 5  # a multipart/digest of five messages
    assert b"Subject:" in base64.b64decode(forwarded[0]["content"])


def test_corpus_broken_mime_is_delivered_with_defects() -> None:
    msg, defects = parse((corpus_dir() / "msg_17.txt").read_bytes())  # no start boundary
    assert "dingus fish" in msg["text"]
    assert any("StartBoundaryNotFoundDefect" in d for d in defects)


# --- crafted ------------------------------------------------------------------------------


def crlf(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("ascii") + body


def test_iso_2022_jp_body_and_subject() -> None:
    text = "こんにちは、世界"
    subject = "=?ISO-2022-JP?B?" + base64.b64encode("日本語".encode("iso-2022-jp")).decode() + "?="
    raw = crlf(
        f"Subject: {subject}\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=ISO-2022-JP\nContent-Transfer-Encoding: 7bit\n\n",
        text.encode("iso-2022-jp") + b"\r\n",
    )
    msg, defects = parse(raw)
    assert (msg["subject"], msg["text"], msg["text_charset"]) == (
        "日本語",
        text + "\n",
        "iso-2022-jp",
    )
    assert defects == []


def test_undeclared_iso_2022_jp_is_recognised_by_its_escapes() -> None:
    raw = crlf("Subject: x\n\n", "お元気ですか".encode("iso-2022-jp") + b"\r\n")
    msg, _ = parse(raw)
    assert (msg["text"], msg["text_charset"]) == ("お元気ですか\n", None)


def test_latin1_quoted_printable_and_encoded_word_name() -> None:
    raw = crlf(
        "From: =?iso-8859-1?Q?Fran=E7ois_L=E9ger?= <fl@example.fr>\n"
        "Subject: =?ISO-8859-1?Q?D=E9j=E0_vu?=\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
        "Tr=E8s bien, merci. =A0=BD\n"
    )
    msg, _ = parse(raw)
    assert msg["from"] == [{"name": "François Léger", "address": "fl@example.fr"}]
    assert msg["subject"] == "Déjà vu"
    assert msg["text"] == "Très bien, merci. \u00a0½\n"
    assert msg["text_charset"] == "iso-8859-1"


def test_latin1_label_with_windows_1252_bytes_reads_as_clients_do() -> None:
    # Outlook labels Windows-1252 text "iso-8859-1"; 0x80-0x9f are control codes in Latin-1
    raw = crlf(
        "Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n",
        b"\x93Smart quotes\x94 cost \x80 5 \x96 ok\r\n",
    )
    msg, _ = parse(raw)
    assert msg["text"] == "\u201cSmart quotes\u201d cost \u20ac 5 \u2013 ok\n"


def test_windows_1252_base64_html() -> None:
    html = "<p>\u201cCaf\u00e9\u201d \u2013 \u20ac 3</p>"
    raw = crlf(
        "Content-Type: text/html; charset=windows-1252\nContent-Transfer-Encoding: base64\n\n",
        base64.encodebytes(html.encode("cp1252")).replace(b"\n", b"\r\n"),
    )
    msg, _ = parse(raw)
    assert (msg["html"], msg["html_charset"], msg["text"]) == (html, "windows-1252", None)


def test_koi8_r_body_and_subject() -> None:
    subject = "=?koi8-r?B?" + base64.b64encode("Привет".encode("koi8-r")).decode() + "?="
    raw = crlf(
        f'Subject: {subject}\nContent-Type: text/plain; charset="KOI8-R"\n'
        "Content-Transfer-Encoding: 8bit\n\n",
        "Как дела?".encode("koi8-r") + b"\r\n",
    )
    msg, _ = parse(raw)
    assert (msg["subject"], msg["text"], msg["text_charset"]) == ("Привет", "Как дела?\n", "koi8-r")


def test_undeclared_utf8_body_and_header() -> None:
    raw = "Subject: Grüße ✓\r\nTo: Zoë <zoe@example.org>\r\n\r\nnaïve café ✓\r\n".encode()
    msg, defects = parse(raw)
    assert (msg["subject"], msg["text"], msg["text_charset"]) == (
        "Grüße ✓",
        "naïve café ✓\n",
        None,
    )
    assert msg["to"] == [{"name": "Zoë", "address": "zoe@example.org"}]
    assert defects == []


def test_utf8_label_on_latin1_bytes_is_rescued_and_reported() -> None:
    raw = crlf("Content-Type: text/plain; charset=utf-8\n\n", b"K\xf6ln\r\n")
    msg, defects = parse(raw)
    assert msg["text"] == "Köln\n"
    assert any("not valid utf-8" in d for d in defects)


NESTED = crlf(
    """\
From: alice@example.org
Subject: nested
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mixed"

--mixed
Content-Type: multipart/related; boundary="related"

--related
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Grafik unten =E2=80=93 sch=C3=B6n.
--alt
Content-Type: text/html; charset=utf-8

<p>Grafik: <img src="cid:chart@example.org"></p>
--alt--
--related
Content-Type: image/png
Content-ID: <chart@example.org>
Content-Disposition: inline
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--related--
--mixed
Content-Type: message/rfc822
Content-Disposition: attachment

From: carol@example.org
Subject: the original

original body
--mixed
Content-Type: application/pdf
Content-Disposition: attachment; filename*0*=utf-8''Pr%C3%BCfbericht%20;
 filename*1*=%E2%84%962.pdf
Content-Transfer-Encoding: base64

JVBERi0=
--mixed
Content-Type: text/plain; name="=?UTF-8?B?w7xiZXJzaWNodC50eHQ=?="
Content-Disposition: attachment; filename="=?UTF-8?B?w7xiZXJzaWNodC50eHQ=?="

a text file
--mixed--
"""
)


def test_alternative_in_related_in_mixed_with_inline_image_and_forwarded_mail() -> None:
    msg, defects = parse(NESTED)
    assert defects == []
    assert msg["text"] == "Grafik unten \u2013 schön."
    assert msg["html"] == '<p>Grafik: <img src="cid:chart@example.org"></p>'
    image, forwarded, pdf, txt = msg["attachments"]
    assert (image["content_id"], image["disposition"]) == ("<chart@example.org>", "inline")
    assert base64.b64decode(image["content"]) == b"\x89PNG\r\n\x1a\n"
    assert forwarded["content_type"] == "message/rfc822"
    inner = base64.b64decode(forwarded["content"])
    assert b"Subject: the original" in inner and b"original body" in inner
    # RFC 2231 continuations with a charset, and RFC 2047 in a quoted parameter (common)
    assert pdf["filename"] == "Prüfbericht №2.pdf"
    assert txt["filename"] == "übersicht.txt"
    assert txt["text"] is None  # an attachment stays bytes, with its charset if declared


def test_unterminated_multipart_still_delivers_what_it_has() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=B\n\n--B\n"
        "Content-Type: text/plain; charset=utf-8\n\nfirst part\n--B\n"
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        "AAEC!!!not base64\n"
    )
    msg, defects = parse(raw)
    assert msg["text"].startswith("first part")
    assert defects  # the missing end boundary (and the bad base64) are reported
    assert len(msg["attachments"]) == 1
