"""ParsedMessage.from_buffer with a spooled text body (bridge/webhook/textstream.py) gives the
bytes of the in-memory parse: json and multipart bodies, for every recipient and every send."""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from payload_samples import ENVELOPE, ROUTE, SMTP_SOURCE_HEAD, smtp_source, smtp_source_lines
from webhook_server import Step, WebhookServer

from bridge.base.route import Route
from bridge.base.transaction import READ_CHUNK, MessageBuffer, Recipient
from bridge.delivery.deliverer import Deliverer, Transaction
from bridge.lmtp.events import Reply
from bridge.mail import body as mimebody
from bridge.mail import parsed as mime
from bridge.mail.bodytext import BodyText
from bridge.mail.parsed import ParsedMessage
from bridge.webhook import client as webhook
from bridge.webhook.client import WebhookClient
from bridge.webhook.payload import build_body
from bridge.webhook.render import rendered
from bridge.webhook.signing import delivery_id

RECIPIENTS = [
    Recipient(address="bob@example.net", route=ROUTE),
    Recipient(address="carol+news@example.org", route=ROUTE, orcpt="rfc822;carol@example.org"),
]


def make_buffer(
    raw: bytes, spooled: bool, piece: int = 65536, spool_dir: str | None = None
) -> MessageBuffer:
    buf = MessageBuffer(0 if spooled else 1 << 30, spool_dir)
    for i in range(0, len(raw), piece):  # arrives in pieces, as from the socket
        buf.write(raw[i : i + piece])
    assert buf.spooled == spooled
    return buf


@contextmanager
def spool_text(on: bool) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mime, "_SPOOL_TEXT", on)  # read by ParsedMessage.from_buffer
        yield


def parse(buf: MessageBuffer, spool: bool) -> ParsedMessage:
    with spool_text(spool):
        return ParsedMessage.from_buffer(buf)


def bodies(buf: MessageBuffer, parsed: ParsedMessage) -> list[bytes]:
    """Every recipient's json and multipart body, each read twice (a retry) and checked equal
    (the multipart boundary, random, replaced by a fixed one)."""
    out = []
    for rcpt in RECIPIENTS:
        did = delivery_id(buf.digest(), rcpt.address)
        for kind in ("json", "multipart"):
            body = build_body(kind, ENVELOPE, rcpt, buf, parsed, did, "bridge.example.com")
            data = b"".join(body.chunks())
            assert len(data) == body.length
            assert b"".join(body.chunks()) == data  # the body sent again
            if kind == "multipart":
                boundary = body.content_type.partition('boundary="')[2].rstrip('"').encode()
                data = data.replace(boundary, b"BOUNDARY")
            out.append(data)
    return out


def assert_same(raw: bytes, spooled: bool, *, text_spooled: bool | None = None) -> ParsedMessage:
    """The bodies with and without the spooled text are equal; returns the new parse, closed.
    ``text_spooled``: whether the text field must have been left in the buffer (and spooled
    by the render: in memory for a message in memory)."""
    buf = make_buffer(raw, spooled)
    old = parse(buf, False)
    new = parse(buf, True)
    try:
        assert not any(isinstance(v, BodyText) for v in old.fields.values())
        expected = bodies(buf, old)
        assert bodies(buf, new) == expected
        assert new.defects == old.defects
        for key in ("text", "html"):
            assert new.field(key) == old.fields[key]
        json.loads(expected[0])
        if text_spooled is not None:
            value = new.fields["text"]
            assert isinstance(value, BodyText) == text_spooled
            if text_spooled:
                assert [t.in_memory for t in rendered(new).spooled] == [not spooled]
    finally:
        new.close()
        buf.close()
    return new


# --- the benchmark's shapes ---------------------------------------------------------------


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
@pytest.mark.parametrize("size", [4096, 256 * 1024, 10 * 1024 * 1024], ids=["4k", "256k", "10m"])
def test_smtp_source_messages(size: int, spooled: bool) -> None:
    # A small message in memory keeps its text as a str; anything else is spooled.
    assert_same(smtp_source(size), spooled, text_spooled=spooled or size > 64 * 1024)


# --- bytes at the edges of the pieces read ------------------------------------------------

EDGE_TOKENS = [
    b"\r\n",
    b"\r",
    b"\n",
    b"\r\r\n",
    b"\n\r",
    b'"',
    b"\\",
    b'\\"',
    b"\t",
    b"\x00\x01\x1f",
    b"\x7f",
    "é".encode(),
    "€".encode(),
    "😀".encode(),
    "\u2028".encode(),
    b"\xff",  # not UTF-8: the whole text is Windows-1252
    b"\xe9",
    b"\x81",  # undefined in cp1252
    b"\xc3",  # a UTF-8 lead byte with no continuation
    b"\x1b$B",  # an ISO-2022-JP escape that does not decode here
]


def edged(token: bytes) -> bytes:
    """A ~1.3 MiB message with ``token`` just before, at and after the places where the
    pieces are cut: every READ_CHUNK bytes of the message (a spooled message is read so) and
    of the body (an in-memory message is sliced so)."""
    head = SMTP_SOURCE_HEAD + b"Subject: edges\r\n\r\n"
    body = bytearray(smtp_source_lines(5 * READ_CHUNK + 1000))
    places = [k * READ_CHUNK + d - len(head) for k, d in ((1, -2), (2, -1), (3, 0), (4, 1))]
    places += [k * READ_CHUNK + d for k, d in ((1, -1), (2, 0), (3, 1), (4, -2))]
    for at in places:
        body[at : at + len(token)] = token
    return head + bytes(body)


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
@pytest.mark.parametrize("token", EDGE_TOKENS, ids=repr)
def test_special_bytes_at_piece_edges(token: bytes, spooled: bool) -> None:
    assert_same(edged(token), spooled, text_spooled=True)


@pytest.mark.parametrize("charset", ["utf-8", "iso-8859-1", "windows-1252", "koi8-r"])
@pytest.mark.parametrize("token", [b"\r\n", b"\r", b"\xff", b"\x81", "😀".encode()], ids=repr)
def test_special_bytes_at_piece_edges_with_a_charset(token: bytes, charset: str) -> None:
    raw = edged(token).replace(
        b"Subject: edges\r\n", b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n"
    )
    assert_same(raw, True, text_spooled=True)


# --- declared charsets and the part's kind ------------------------------------------------

TEXT = 'Grüße, "quoted" and \\ back\tslash; 日本語テキスト €\r\n'


def single_part(
    body: bytes,
    content_type: str = "text/plain",
    charset: str | None = None,
    extra: bytes = b"",
) -> bytes:
    ctype = content_type + (f'; charset="{charset}"' if charset else "")
    return SMTP_SOURCE_HEAD + b"Content-Type: " + ctype.encode() + b"\r\n" + extra + b"\r\n" + body


def repeat(text: str, codec: str, size: int = 100_000) -> bytes:
    unit = text.encode(codec, "ignore")
    return unit * (size // len(unit) + 1)


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
@pytest.mark.parametrize(
    ("charset", "body", "text_spooled"),
    [
        ("utf-8", repeat(TEXT, "utf-8"), True),
        ("utf-8", repeat(TEXT, "utf-8") + b"\xff", True),  # not UTF-8: cp1252, a defect
        ("iso-8859-1", repeat(TEXT, "latin-1") + b"\x81\x9d", True),  # undefined: a defect
        ("windows-1252", repeat(TEXT, "cp1252"), True),
        ("iso-8859-15", repeat(TEXT, "iso-8859-15"), True),
        ("koi8-r", repeat("Привет, мир\r\n", "koi8-r"), True),
        ("shift_jis", repeat(TEXT, "shift_jis"), True),
        ("shift_jis", repeat(TEXT, "shift_jis") + b"\x82", False),  # declined: in memory
        ("iso-2022-jp", repeat(TEXT, "iso-2022-jp"), True),
        ("us-ascii", repeat(TEXT, "utf-8"), True),  # the guess: UTF-8
        ("x-unknown-charset", repeat(TEXT, "cp1252"), True),  # a defect, then the guess
        ("utf-16", repeat(TEXT, "utf-16"), False),  # declined
        (None, repeat(TEXT, "iso-2022-jp"), True),  # the guess: ISO-2022-JP by its escapes
        (None, repeat(TEXT, "cp1252"), True),  # the guess: Windows-1252
    ],
)
def test_declared_charsets(
    charset: str | None, body: bytes, text_spooled: bool, spooled: bool
) -> None:
    assert_same(single_part(body, charset=charset), spooled, text_spooled=text_spooled)


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
@pytest.mark.parametrize(
    ("content_type", "extra", "text_spooled"),
    [
        ("text/html", b"", False),  # the html field is spooled instead
        ("text/plain", b"Content-Disposition: attachment; filename=a.txt\r\n", False),
        ("text/plain", b"Content-Disposition: inline; filename=a.txt\r\n", True),
        ("text/markdown", b"", False),  # an attachment with its text
        ("application/octet-stream", b"Content-Transfer-Encoding: binary\r\n", False),
        ("text/plain", b"Content-Transfer-Encoding: 8bit\r\n", True),
        ("text/plain", b"Content-Transfer-Encoding: quoted-printable\r\n", False),
    ],
)
def test_kinds_of_single_part(
    content_type: str, extra: bytes, text_spooled: bool, spooled: bool
) -> None:
    raw = single_part(repeat(TEXT, "utf-8"), content_type, "utf-8", extra)
    new = assert_same(raw, spooled, text_spooled=text_spooled)
    assert isinstance(new.fields["html"], BodyText) == (content_type == "text/html")


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
def test_multipart_message_takes_the_whole_parse(spooled: bool) -> None:
    raw = (
        SMTP_SOURCE_HEAD + b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\n" + smtp_source_lines(200_000) + b"--b--\r\n"
    )
    assert_same(raw, spooled, text_spooled=False)


# --- the header block, read from the buffer -----------------------------------------------


def with_headers(extra: bytes, body_size: int = 300_000) -> bytes:
    return SMTP_SOURCE_HEAD + extra + b"\r\n" + smtp_source_lines(body_size)


@pytest.mark.parametrize(
    ("raw", "text_spooled"),
    [
        # headers across two pieces of the spool file
        (with_headers(b"X-Long: " + b"y" * 300_000 + b"\r\n"), True),
        (with_headers(b"".join(b"X-N%d: %s\r\n" % (i, b"v" * 50) for i in range(6_000))), True),
        # longer than the 1 MiB read for headers: the whole message is parsed
        (with_headers(b"X-Huge: " + b"z" * (1 << 20) + b"\r\n"), False),
        # LF-only and CR-only line ends
        (smtp_source(300_000).replace(b"\r\n", b"\n"), True),
        (smtp_source(300_000).replace(b"\r\n", b"\r"), True),
        # a line that is no header ends the headers: the body with a defect, no fast path
        (SMTP_SOURCE_HEAD + b"not a header\r\n\r\n" + smtp_source_lines(300_000), False),
        (b"From nobody Sat Nov 28 14:42:08 2026\r\n" + smtp_source(300_000), False),
        # no body separator at all
        (SMTP_SOURCE_HEAD, False),
    ],
    ids=["long-header", "many-headers", "huge-header", "lf", "cr", "no-header", "from", "none"],
)
def test_header_blocks(raw: bytes, text_spooled: bool) -> None:
    assert_same(raw, True, text_spooled=text_spooled)


@pytest.mark.parametrize("shift", range(-3, 4))
def test_blank_line_across_the_first_piece_edge(shift: int) -> None:
    # The header block ends right at (or around) the end of the first piece read.
    filler = READ_CHUNK - len(SMTP_SOURCE_HEAD) - len(b"X-Fill: \r\n") - 2 + shift
    raw = with_headers(b"X-Fill: " + b"f" * filler + b"\r\n")
    assert_same(raw, True, text_spooled=True)


header_lines = st.lists(
    st.sampled_from(
        [
            *(b"A: b\r\n", b"Subject: x\n", b" cont\r\n", b"\tcont\r", b"\r\n", b"\n", b"\r"),
            *(b"\r\n\r\n", b"bad line\r\n", b"X", b"From x\r\n", b"K:v", b"body text"),
        ]
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=header_lines)
def test_header_end_from_a_prefix_is_the_whole_message_answer(data: bytes) -> None:
    whole = mimebody._header_end(data, len(data))
    assert whole is not mimebody._MORE
    for n in range(len(data)):
        found = mimebody._header_end(data[:n], len(data))
        assert found is mimebody._MORE or found == whole, (n, found, whole)


# --- sends, recipients, surrogates, failures ----------------------------------------------


def test_a_lone_surrogate_elsewhere_escapes_the_text_alike() -> None:
    # The whole message object falls back to \u-escapes: the spooled text too.
    raw = single_part(repeat(TEXT, "utf-8", 300_000), charset="utf-8")
    buf = make_buffer(raw, True)
    old, new = parse(buf, False), parse(buf, True)
    for parsed in (old, new):
        parsed.fields["subject"] = "caf\udce9"
    try:
        data = bodies(buf, new)
        assert data == bodies(buf, old)
        assert b"\\udce9" in data[0] and b"\\u00fc" in data[0] and data[0].isascii()
    finally:
        new.close()


def test_text_spool_failure_falls_back_to_memory() -> None:
    spool_dir = tempfile.mkdtemp()
    raw = smtp_source(300_000)
    buf = make_buffer(raw, True, spool_dir=spool_dir)
    shutil.rmtree(spool_dir)  # the message's own file is open already; no new file can be
    old, new = parse(buf, False), parse(buf, True)
    assert bodies(buf, new) == bodies(buf, old)
    assert isinstance(new.fields["text"], BodyText) and rendered(new).spooled == []


def spool_files() -> int:
    """The process's open temporary files (unnamed or deleted, in the temp directory).

    Earlier tests' unreachable buffers close their files now, not in the middle of a count: a
    collection that ran between two counts made the second one short."""
    gc.collect()
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(tempfile.gettempdir()) and target.endswith("(deleted)")
    return count


def test_close_frees_the_file_and_fails_later_sends() -> None:
    buf = make_buffer(smtp_source(300_000), True)
    before = spool_files()
    parsed = parse(buf, True)
    did = delivery_id(buf.digest(), RECIPIENTS[0].address)
    body = build_body("json", ENVELOPE, RECIPIENTS[0], buf, parsed, did, "bridge.example.com")
    assert spool_files() == before + 1  # the escaped text's file
    parsed.close()
    parsed.close()  # twice is fine
    assert spool_files() == before
    with pytest.raises(RuntimeError):
        b"".join(body.chunks())  # never a short body under a Content-Length already sent


def test_spooled_message_is_never_read_whole() -> None:
    raw = smtp_source(20 * 1024 * 1024)
    buf = make_buffer(raw, True)
    did = delivery_id(buf.digest(), RECIPIENTS[0].address)
    size = 0
    tracemalloc.start()
    try:
        parsed = ParsedMessage.from_buffer(buf)
        for _ in range(2):  # a retry
            body = build_body("json", ENVELOPE, RECIPIENTS[0], buf, parsed, did, "bridge")
            for piece in body.chunks():
                size += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == 2 * body.length > 2 * 20 * 1024 * 1024
    assert peak < 4 * 1024 * 1024, peak
    parsed.close()
    buf.close()


async def test_deliverer_sends_equal_bodies_and_closes_the_text(
    monkeypatch: pytest.MonkeyPatch, webhook_server: WebhookServer
) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_BASE", 0.001)
    route = Route(name="default", url=webhook_server.url, retries=1)
    rcpts = [Recipient(r.address, route, r.orcpt) for r in RECIPIENTS]
    # the first copy of the first recipient fails: retried, the body sent again
    webhook_server.behave(rcpts[0].address, [Step(503), Step(200)])
    buf = make_buffer(smtp_source(3 * 1024 * 1024), True)
    closed: list[ParsedMessage] = []
    real_close = ParsedMessage.close

    def close(self: ParsedMessage) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(ParsedMessage, "close", close)
    replies: list[Reply] = []

    async def emit(batch: Sequence[Reply]) -> None:
        replies.extend(batch)

    async with WebhookClient() as client:
        deliverer = Deliverer(client, "bridge.example.com")
        before = spool_files()
        txn = Transaction(ENVELOPE, [rcpts[0], rcpts[1], rcpts[0]], buf)
        await deliverer.deliver(txn, emit)
        assert spool_files() == before  # the text's file is closed
    assert [r.code for r in replies] == [250, 250, 250]
    assert len(closed) == 1 and isinstance(closed[0].fields["text"], BodyText)
    old = parse(buf, False)
    for rcpt in rcpts[:2]:
        did = delivery_id(buf.digest(), rcpt.address)
        expected = b"".join(
            build_body("json", ENVELOPE, rcpt, buf, old, did, "bridge.example.com").chunks()
        )
        sends = [r.body for r in webhook_server.requests_for(rcpt.address)]
        assert sends == [expected] * (2 if rcpt == rcpts[0] else 1)
