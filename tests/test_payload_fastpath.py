"""The json payload's fast paths give the same bytes as the slow ones: headers read without
the stdlib's structured parser, and the message template spliced without a regex."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from email.message import Message
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from payload_samples import ENVELOPE, ROUTE

from bridge.base.transaction import MessageBuffer, Recipient
from bridge.mail import charsets
from bridge.mail import emailpolicy as mailpolicy
from bridge.mail import headers as mimeheaders
from bridge.mail.parsed import ParsedMessage
from bridge.webhook.payload import build_body
from bridge.webhook.pieces import _dumps, _Lazy
from bridge.webhook.render import attachment_object, message_json, rendered
from bridge.webhook.signing import delivery_id

ADDRESS_NAMES = [
    "From",
    "To",
    "Cc",
    "Bcc",
    "Reply-To",
    "Sender",
    "Resent-From",
    "resent-to",
    "FROM",
]
DATE_NAMES = ["Date", "Resent-Date", "Orig-Date", "date"]
TEXT_NAMES = ["Subject", "X-Mailer", "Received", "In-Reply-To", "References", "DKIM-Signature"]
MSGID_NAMES = ["Message-Id", "Message-ID", "message-id"]
MIME_NAMES = ["Content-Type", "MIME-Version", "Content-Transfer-Encoding"]

# What Postfix's smtp-source sends (the benchmark's message): every header is a fast one.
SMTP_SOURCE = (
    b"From: <a@example.com>\r\nTo: <b@example.com>\r\n"
    b"Date: Sat, 28 Nov 2026 14:34:00 +0000 (UTC)\r\nMessage-Id: <3240.0003.0000@vm>\r\n\r\n"
    + b"".join(b"%dXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\r\n" % i for i in range(100))
)


@contextmanager
def fast_headers(on: bool) -> Iterator[None]:
    saved = mimeheaders._FAST_HEADERS
    mimeheaders._FAST_HEADERS = on
    try:
        yield
    finally:
        mimeheaders._FAST_HEADERS = saved


def header(name: str, raw: str, fast: bool) -> Any:
    """The header object ``_parsed_headers`` gives for one raw header."""
    msg = Message(policy=mailpolicy._POLICY)
    msg.set_raw(name, raw)
    with fast_headers(fast):
        [(_, value)] = mimeheaders._parsed_headers(msg)
    return value


def view(h: Any) -> dict[str, Any]:
    """Everything of a header that reaches the payload, as the payload reads it."""
    defects = charsets.Defects()
    defects.add_all("h", getattr(h, "defects", ()))
    dt = getattr(h, "datetime", None)
    return {
        "str": str(h),
        "defects": defects.items,
        "addresses": mimeheaders._addresses([h]),
        "usernames": [(a.username, a.domain) for a in getattr(h, "addresses", ())],
        "date": mimeheaders._date([h]),
        "datetime": (type(dt).__name__, dt.isoformat() if isinstance(dt, datetime) else dt),
        "msgids": mimeheaders._msgids([h]),
    }


def assert_same_or_declined(name: str, raw: str) -> bool:
    """The fast result equals the stdlib's, or the fast path declined; True if it answered."""
    fast = mimeheaders._fast_header(name, raw)
    if fast is None:
        return False
    assert view(fast) == view(header(name, raw, fast=False))
    assert view(header(name, raw, fast=True)) == view(fast)
    return True


# --- header grammars, biased toward the edges of each fast path ---------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
NEAR_MISS = [
    '"', "(", ")", ".", "..", "@", "=?", "?=", "\\", "[", "]", ":", ";", ",", "<", ">",
    " ", "\t", "é", "Ω", "\x00", "\x01", "\x7f", "\x0b", "\x1c", "\xa0", "\u2028",
    "\r\n ", "\r\n\t", "\udce9", "=?utf-8?q?J=C3=B6rg?=",
]  # fmt: skip

clean_atom = st.text(st.sampled_from(ATEXT), min_size=1, max_size=6).filter(lambda s: "=?" not in s)
spoiled_atom = st.builds(
    lambda a, n, b: a + n + b,
    st.one_of(clean_atom, st.just("")),
    st.sampled_from(NEAR_MISS),
    st.one_of(clean_atom, st.just("")),
)
atom = st.one_of(clean_atom, clean_atom, clean_atom, spoiled_atom)
gap = st.sampled_from([" ", " ", "  ", "\t", " \t ", "\r\n ", "\r\n\t"])


@st.composite
def dot_atoms(draw: st.DrawFn, part: st.SearchStrategy[str] = atom) -> str:
    words = draw(st.lists(part, min_size=1, max_size=3))
    text = draw(st.sampled_from([".", ".", ".", "..", " .", ". "])).join(words)
    lead, trail = draw(st.sampled_from([("", ""), ("", ""), ("", "."), (".", ""), (" ", " ")]))
    return lead + text + trail


@st.composite
def addr_specs(draw: st.DrawFn) -> str:
    local = draw(st.one_of(dot_atoms(), st.just('"quoted local"'), st.just("")))
    at = draw(st.sampled_from(["@", "@", "@", "@", " @", "@ ", "@@", ""]))
    domain = draw(st.one_of(dot_atoms(), st.sampled_from(["[192.0.2.1]", "[IPv6:::1]", ""])))
    return local + at + domain


@st.composite
def phrases(draw: st.DrawFn) -> str:
    words = draw(st.lists(atom, min_size=1, max_size=3))
    text = words[0]
    for word in words[1:]:
        text += draw(gap) + word
    return text


@st.composite
def mailboxes(draw: st.DrawFn) -> str:
    addr = draw(addr_specs())
    name = draw(phrases())
    ws = draw(st.sampled_from(["", " ", "  ", "\t", "\r\n "]))
    forms = [
        addr,
        f"<{addr}>",
        f"{name}{ws}<{addr}>",
        f"{name}{ws}<{addr}>",
        f'"{name}" <{addr}>',
        f"{addr} ({name})",
        f"({name}) {addr}",
        f"< {addr} >",
        f"<@route.example:{addr}>",
        "<>",
        f"{name}: {addr};",
        "undisclosed-recipients:;",
        f"{name} <{addr}> junk",
        f"{name}.{ws}<{addr}>",
        f"{name}@x <{addr}>",
    ]
    return draw(st.sampled_from(forms))


@st.composite
def address_values(draw: st.DrawFn) -> str:
    boxes = draw(st.lists(mailboxes(), max_size=3))
    sep = draw(st.sampled_from([", ", ", ", ",", " , ", ",\r\n ", ",,", ";", " "]))
    lead, trail = draw(st.sampled_from([("", ""), ("", ""), (" ", "\t"), ("", ","), (",", "")]))
    return lead + sep.join(boxes) + trail


@st.composite
def clean_address_values(draw: st.DrawFn) -> str:
    """Simple forms only: the fast path must answer these."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        local, domain = draw(dot_atoms(clean_atom)), draw(dot_atoms(clean_atom))
        addr = f"{local.strip(' .')}@{domain.strip(' .')}".replace("..", ".").replace(" ", "")
        words = draw(st.lists(clean_atom, max_size=3))
        name = ""
        for word in words:
            name += (draw(gap) if name else "") + word
        form = draw(st.integers(0, 2))
        if form == 0:
            out.append(addr)
        elif form == 1 or not name:
            out.append(f"<{addr}>")
        else:
            ws = draw(st.sampled_from(["", " ", " ", "  ", "\t"]))
            out.append(f"{name}{ws}<{addr}>")
    sep = draw(st.sampled_from([", ", ",", " ,\t", ",\r\n "]))
    return draw(st.sampled_from(["", " "])) + sep.join(out) + draw(st.sampled_from(["", " "]))


@st.composite
def date_values(draw: st.DrawFn) -> str:
    dow = draw(st.sampled_from(["Sat, ", "Sat, ", "Sat,", "sat, ", "Xyz, ", "", "Sat "]))
    day = draw(st.sampled_from(["28", "1", "01", "0", "31", "32", "x"]))
    month = draw(st.sampled_from(["Nov", "Nov", "nov", "NOV", "November", "Foo", "11"]))
    year = draw(st.sampled_from(["2026", "2026", "26", "99", "69", "1999", "10000", "0"]))
    clock = draw(
        st.sampled_from(["14:34:00", "14:34:00", "14:34", "24:00:00", "14:60:61", "1:2:3", "14.34"])
    )
    zone = draw(
        st.sampled_from(
            [
                "+0000", "-0000", "+0100", "-0830", "+0000 (UTC)", "-0000 (UTC)", "(UTC)",
                "+0000 (Coordinated Universal Time)", "UTC", "GMT", "UT", "EST", "PDT", "Z",
                "A", "CET", "", "+2500", "+00:00", "+0000 junk", "0100", "+0000\t(UTC)",
            ]
        )
    )  # fmt: skip
    sep = draw(gap)
    text = f"{dow}{day} {month} {year}{sep}{clock} {zone}"
    return draw(st.sampled_from(["", "", " ", "\r\n "])) + text + draw(st.sampled_from(["", " "]))


TEXT_PIECES = [
    *NEAR_MISS,
    "Re: lunch",
    "=?utf-8?b?w6k=?=",
    "=?iso-8859-1?q?caf=E9?= ",
    "from mx.example.org (mx [192.0.2.1]) by",
    "v=1; a=rsa-sha256; d=example.org;",
    "<a.b@example.org>",
    "  ",
]
text_values = st.lists(
    st.one_of(st.sampled_from(TEXT_PIECES), st.text(max_size=4)), max_size=8
).map("".join)


@st.composite
def msgid_values(draw: st.DrawFn) -> str:
    left, right = draw(dot_atoms()), draw(st.one_of(dot_atoms(), st.just("[192.0.2.1]")))
    at = draw(st.sampled_from(["@", "@", "@", "", "@@"]))
    core = f"<{left}{at}{right}>"
    form = draw(
        st.sampled_from(
            ["{}", "{}", " {}", "{} ", "\t{} ", "{} (comment)", "{} <x@y>", "{}>", "<{}", "x{}"]
        )
    )
    return form.format(core)


@st.composite
def clean_msgids(draw: st.DrawFn) -> str:
    left, right = draw(dot_atoms(clean_atom)), draw(dot_atoms(clean_atom))
    core = f"<{left.strip(' .')}@{right.strip(' .')}>".replace("..", ".").replace(" ", "")
    return draw(st.sampled_from(["", " ", "\r\n "])) + core + draw(st.sampled_from(["", " "]))


@st.composite
def near_misses(draw: st.DrawFn, clean: st.SearchStrategy[str]) -> str:
    """A value the fast path answers, spoiled in one place: one piece put in, or one
    character replaced or dropped."""
    value = draw(clean)
    at = draw(st.integers(0, len(value)))
    piece = draw(st.sampled_from(NEAR_MISS))
    how = draw(st.sampled_from(["insert", "replace", "drop"]))
    if how == "insert":
        return value[:at] + piece + value[at:]
    if how == "replace":
        return value[:at] + piece + value[at + 1 :]
    return value[:at] + value[at + 1 :]


names_and_values = st.one_of(
    st.tuples(
        st.sampled_from(ADDRESS_NAMES),
        st.one_of(address_values(), near_misses(clean_address_values()), text_values),
    ),
    st.tuples(
        st.sampled_from(DATE_NAMES),
        st.one_of(date_values(), near_misses(date_values()), text_values),
    ),
    st.tuples(st.sampled_from(TEXT_NAMES), st.one_of(text_values, near_misses(text_values))),
    st.tuples(
        st.sampled_from(MSGID_NAMES),
        st.one_of(msgid_values(), near_misses(clean_msgids()), text_values),
    ),
    st.tuples(st.sampled_from(MIME_NAMES), text_values),
)


# --- one header: fast equals stdlib, or declined ---------------------------------------


@settings(max_examples=1500, deadline=None)
@given(names_and_values)
def test_fast_header_equals_the_stdlib_or_declines(name_value: tuple[str, str]) -> None:
    assert_same_or_declined(*name_value)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ADDRESS_NAMES), clean_address_values())
def test_simple_address_lists_take_the_fast_path(name: str, value: str) -> None:
    assert assert_same_or_declined(name, value), value


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(MSGID_NAMES), clean_msgids())
def test_simple_message_ids_take_the_fast_path(name: str, value: str) -> None:
    assert assert_same_or_declined(name, value), value


@settings(max_examples=200, deadline=None)
@given(date_values())
def test_dates_the_stdlib_reads_take_the_fast_path(value: str) -> None:
    answered = assert_same_or_declined("Date", value)
    assert answered == (mimeheaders._date([header("Date", value, fast=False)]) is not None)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TEXT_NAMES), text_values)
def test_text_without_encoded_words_takes_the_fast_path(name: str, value: str) -> None:
    answered = assert_same_or_declined(name, value)
    unfolded = value.replace("\r", "").replace("\n", "")
    assert answered == ("=?" not in unfolded and "\udce9" not in unfolded)


def single_edits(value: str) -> Iterator[str]:
    """Every value one edit away: a near-miss piece put in or in place of a character, or
    a character dropped, at every position."""
    for at in range(len(value) + 1):
        yield value[:at] + value[at + 1 :]
        for piece in NEAR_MISS:
            yield value[:at] + piece + value[at:]
            yield value[:at] + piece + value[at + 1 :]


@pytest.mark.parametrize(
    ("name", "seed"),
    [
        ("From", "Bob Example <bob.x@example.net>, carol@mail.example.net"),
        ("To", " <a@b.c>,d-e@f"),
        ("Message-Id", "<3240.0003.0000@vm.example>"),
        ("Date", "Sat, 28 Nov 2026 14:34:00 +0000 (UTC)"),
        ("Subject", "Re: lunch"),
    ],
)
def test_every_single_edit_of_a_simple_value(name: str, seed: str) -> None:
    assert assert_same_or_declined(name, seed)
    answered = sum(assert_same_or_declined(name, value) for value in single_edits(seed))
    assert answered > 0


@pytest.mark.parametrize(
    ("name", "value", "answered"),
    [
        ("From", "<a@example.com>", True),
        ("To", "Bob Example <bob@example.net>, carol@example.net", True),
        ("Cc", "  Tab\tSeparated   Words<x.y@a.b.c> ,\r\n z@q ", True),
        ("Sender", "a@b", True),
        ("Date", "Sat, 28 Nov 2026 14:34:00 +0000 (UTC)", True),
        ("Date", "Sat, 28 Nov 2026 14:34:00 -0000", True),
        ("Date", "28 Nov 26 14:34 EST", True),
        ("Message-Id", "<3240.0003.0000@vm>", True),
        ("Message-Id", "\r\n <a.b@c.d> ", True),
        ("Subject", "Grüße aus Köln", True),
        ("Subject", "", True),
        ("From", '"Quoted, Name" <a@b.c>', False),
        ("From", "John Q. Public <jqp@example.org>", False),
        ("From", "a@b.c (comment)", False),
        ("From", "=?utf-8?q?J=C3=B6rg?= <j@example.org>", False),
        ("From", "Jörg <j@example.org>", False),
        ("To", "a@b.c,", False),
        ("To", "a@b.c,,d@e.f", False),
        ("To", "Group: a@b.c;", False),
        ("To", "<@route:a@b.c>", False),
        ("To", "a@[192.0.2.1]", False),
        ("To", "a.@b.c", False),
        ("To", "", False),
        ("Date", "", False),
        ("Date", "not a date", False),
        ("Message-Id", "<a@b> <c@d>", False),
        ("Message-Id", "<a@[192.0.2.1]>", False),
        ("Subject", "=?utf-8?q?caf=C3=A9?=", False),
        ("Content-Type", "text/plain", False),
    ],
)
def test_known_forms(name: str, value: str, answered: bool) -> None:
    assert assert_same_or_declined(name, value) == answered


# --- whole messages: the JSON body with the fast paths on equals it with them off -------


def json_body(raw: bytes, fast: bool) -> bytes:
    buf = MessageBuffer(1 << 20)
    buf.write(raw)
    rcpt = Recipient(address="bob@example.net", route=ROUTE)
    with fast_headers(fast):
        parsed = ParsedMessage.parse(raw)
    body = build_body(
        "json", ENVELOPE, rcpt, buf, parsed, delivery_id(buf.digest(), rcpt.address), "bridge"
    )
    data = b"".join(body.chunks())
    assert len(data) == body.length
    return data


def assert_same_body(raw: bytes) -> None:
    fast = json_body(raw, fast=True)
    assert fast == json_body(raw, fast=False)
    json.loads(fast)


def corpus_dir() -> Path:
    """CPython's email test messages (as tests/test_charsets.py uses them)."""
    try:
        import test.test_email
    except ImportError:
        pytest.fail("CPython's test package is missing (Debian: libpython3.11-testsuite)")
    return Path(os.path.dirname(test.test_email.__file__)) / "data"


CRAFTED = [
    SMTP_SOURCE,
    b"From: Alice Example <alice@example.org>\r\nTo: Bob <bob@example.net>, c@example.net\r\n"
    b"Cc: carol@example.net\r\nReply-To: help@example.org\r\nSubject: Lunch on Friday\r\n"
    b"Date: Sat, 28 Nov 2026 09:59:58 +0100\r\nMessage-ID: <lunch.1@example.org>\r\n"
    b"In-Reply-To: <prev.0@example.net>\r\nReferences: <root@example.net>\r\n"
    b" <prev.0@example.net>\r\n\r\nShall we meet at noon?\r\n",
    "From: Jörg <j@example.org>\r\nTo: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\n"
    "Subject: Grüße =?utf-8?q?aus_K=C3=B6ln?=\r\nDate: 28 Nov 2026 09:59:58 -0000\r\n"
    "Message-Id: <a@[192.0.2.1]>\r\n\r\nbody\r\n".encode(),
    b"From: \xe9t\xe9 <x@example.org>\r\nSubject: caf\xe9\r\nTo: Group: a@b.c;\r\n"
    b"Date: yesterday\r\nMessage-Id: junk\r\nCc: a@b.c,\r\n\r\nbody\r\n",
    b"From:\r\n <a@example.org>\r\nTo:\r\nSubject:\r\nDate:\r\nX-Empty:\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=q\r\nFrom: a@b.c\r\n\r\n--q\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n--q\r\n"
    b"Content-Type: message/rfc822\r\n\r\nFrom: Inner Person <i@example.org>\r\n"
    b"Subject: inner\r\n\r\ninner body\r\n--q\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n%PDF\r\n--q--\r\n',
]


def test_the_benchmark_message_takes_only_fast_paths() -> None:
    heads, _, _ = SMTP_SOURCE.partition(b"\r\n\r\n")
    for line in heads.decode().split("\r\n"):
        name, _, value = line.partition(": ")
        assert mimeheaders._fast_header(name, value) is not None, line
    assert_same_body(SMTP_SOURCE)


@pytest.mark.parametrize("index", range(len(CRAFTED)))
def test_crafted_messages_give_the_same_body(index: int) -> None:
    assert_same_body(CRAFTED[index])


def test_cpython_corpus_gives_the_same_bodies() -> None:
    files = sorted(corpus_dir().glob("msg_*.txt"))
    assert len(files) >= 45
    answered = 0
    for path in files:
        raw = path.read_bytes()
        assert_same_body(raw)
        for name, value in _raw_headers(raw):
            answered += mimeheaders._fast_header(name, value) is not None
    assert answered >= 100  # the corpus really exercises the fast paths


def _raw_headers(raw: bytes) -> list[tuple[str, str]]:
    return list(BytesParser(policy=mailpolicy._POLICY).parsebytes(raw).raw_items())


@settings(max_examples=200, deadline=None)
@given(st.lists(names_and_values, min_size=1, max_size=8), st.text(max_size=40))
def test_generated_messages_give_the_same_body(headers: list[tuple[str, str]], body: str) -> None:
    text = "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n" + body
    assert_same_body(text.encode("utf-8", "surrogateescape"))


# --- the message template: spliced without a per-message regex, the same bytes ----------


def whole(parsed: ParsedMessage, with_content: bool) -> bytes:
    """The message object dumped in one go: what the template must reproduce."""
    obj = dict(parsed.fields)
    obj["attachments"] = [attachment_object(a, with_content) for a in parsed.attachments]
    return _dumps(obj)


def with_attachments(text: str, filename: str = "a.bin") -> bytes:
    return (
        b"Content-Type: multipart/mixed; boundary=q\r\nSubject: s\r\n\r\n--q\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + text.encode("utf-8", "surrogateescape")
        + b"\r\n--q\r\nContent-Type: application/octet-stream\r\n"
        + f'Content-Disposition: attachment; filename="{filename}"\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n--q\r\n"
        + b"Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: inline\r\n\r\n"
        + text.encode("utf-8", "surrogateescape")
        + b"\r\n--q--\r\n"
    )


@pytest.mark.parametrize(
    "raw",
    [
        SMTP_SOURCE,
        with_attachments("short ünïcode"),
        with_attachments('big é 😀 "q" \\ line\n' * 4_000),  # > 64 Ki characters: spliced
        with_attachments("x", filename='n\\"ame ä.bin'),
    ],
    ids=["plain", "attachments", "big-text", "quoted-filename"],
)
def test_template_is_the_whole_dump(raw: bytes) -> None:
    parsed = ParsedMessage.parse(raw)
    for with_content in (True, False):
        assert message_json(parsed, with_content) == whole(parsed, with_content)
    pieces = rendered(parsed).message_pieces()
    # attachment content is never part of the template: it is encoded as the body is sent
    assert any(isinstance(p, _Lazy) for p in pieces) == bool(parsed.attachments)


def test_template_with_a_lone_surrogate_falls_back_to_ascii_escapes() -> None:
    parsed = ParsedMessage.parse(with_attachments("x"))
    for key in ("text", "subject"):
        parsed.fields[key] = "caf\udce9 " + ("long " * 20_000 if key == "text" else "")
        parsed.close()  # the template made again
        data = message_json(parsed)
        assert data == whole(parsed, True)
        assert b"\\udce9" in data and data.isascii()


# --- a big base64 body decoded a slice at a time ----------------------------------------------

_B64_TEXT = st.lists(
    st.sampled_from([*"ABCDwxyz0189+/", "=", "==", "\r\n", "\n", "\r", " ", "*"]), max_size=120
).map("".join)


@settings(max_examples=500, deadline=None)
@given(payload=_B64_TEXT, slice_size=st.integers(1, 24))
def test_base64_in_slices_is_the_stdlib_decode_or_steps_aside(
    payload: str, slice_size: int
) -> None:
    """The sliced decode (so no single C call holds the GIL for a whole attachment) gives
    decode_b's bytes, without defects, or None, leaving the input to decode_b."""
    from bridge.mail import parts

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parts, "_DECODE_SLICE", slice_size)
        got = parts._b64_in_slices(payload)
    if got is None:
        return
    want, defects = parts._decode_b(payload.encode("ascii").translate(None, b"\r\n"))
    assert (got, defects) == (want, [])


def test_base64_in_slices_takes_real_attachments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Well-formed base64 as MUAs write it (76-column lines, CRLF, padding) is sliced, across
    slice boundaries that fall inside lines and inside 4-character groups."""
    import base64

    from bridge.mail import parts

    monkeypatch.setattr(parts, "_DECODE_SLICE", 1000)
    for size in (0, 1, 2, 3, 57, 3000, 3001, 3002):
        content = os.urandom(size)
        text = base64.encodebytes(content).decode().replace("\n", "\r\n")
        assert parts._b64_in_slices(text) == content, size
        assert parts._b64_in_slices(text.replace("\r\n", "\n")) == content, size
