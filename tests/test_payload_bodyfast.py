"""The body fast path of the json payload (a single-part body sliced from the message bytes,
only the header block fed to the parser) gives the same bytes as the whole-message parse."""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from payload_samples import ENVELOPE, ROUTE, smtp_source

from bridge.base.transaction import MessageBuffer, Recipient
from bridge.mail import body as mimebody
from bridge.mail import emailpolicy as mailpolicy
from bridge.mail import parsed as mime
from bridge.mail.parsed import ParsedMessage
from bridge.webhook.payload import build_body
from bridge.webhook.signing import delivery_id

SMTP_SOURCE_SIZES = [4096, 256 * 1024, 10 * 1024 * 1024]
DEFAULT_MIN = mimebody._FAST_BODY_MIN
# Where the feed parser is called: the whole message (mime) and the header block (mimebody).
FEEDERS = [mime, mimebody]


@contextmanager
def fast_body(on: bool, min_body: int = 0) -> Iterator[None]:
    """The fast path on or off; when on, for bodies of any size (by default it leaves small
    ones to the parser, as cheaper): the tests cover a superset of what it takes in use."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mime, "_FAST_BODY", on)  # read by ParsedMessage
        mp.setattr(mimebody, "_FAST_BODY_MIN", min_body)
        yield


def traced_parse(raw: bytes, min_body: int = 0) -> tuple[int | None, list[bytes]]:
    """Parse with the fast path on: where it found the body (None: it was not taken), and
    every input the feed parser was given."""
    found: list[int | None] = []
    fed: list[bytes] = []
    real_head_only, real_feed = mimebody._head_only, mailpolicy._feed

    def head_only(data: bytes) -> tuple[Any, int] | None:
        head = real_head_only(data)
        found.append(None if head is None else head[1])
        return head

    def feed(data: bytes) -> Any:
        fed.append(bytes(data))
        return real_feed(data)

    with fast_body(True, min_body), pytest.MonkeyPatch.context() as mp:
        mp.setattr(mime, "_head_only", head_only)
        for module in FEEDERS:
            mp.setattr(module, "_feed", feed)
        ParsedMessage.parse(raw)
    assert len(found) == 1
    return found[0], fed


def takes_fast_path(raw: bytes, min_body: int = 0) -> bool:
    """True if the parse fed only the header block to the parser and sliced off the body."""
    body_at, fed = traced_parse(raw, min_body)
    if body_at is None:
        assert fed[-1] == raw  # the whole message, as without the fast path
        return False
    assert fed == [raw[:body_at]]
    return True


def bodies(raw: bytes, fast: bool) -> tuple[bytes, bytes]:
    """The json and multipart webhook bodies of ``raw`` (the multipart one with its random
    boundary replaced by a fixed one)."""
    buf = MessageBuffer(1 << 30)
    buf.write(raw)
    rcpt = Recipient(address="bob@example.net", route=ROUTE)
    with fast_body(fast):
        parsed = ParsedMessage.parse(raw)
    did = delivery_id(buf.digest(), rcpt.address)
    out = []
    for kind in ("json", "multipart"):
        body = build_body(kind, ENVELOPE, rcpt, buf, parsed, did, "bridge.example.com")
        data = b"".join(body.chunks())
        assert len(data) == body.length
        if kind == "multipart":
            boundary = body.content_type.partition('boundary="')[2].rstrip('"').encode()
            data = data.replace(boundary, b"BOUNDARY")
        out.append(data)
    return out[0], out[1]


def assert_same_bodies(raw: bytes) -> None:
    fast = bodies(raw, fast=True)
    assert fast == bodies(raw, fast=False)
    json.loads(fast[0])


# --- the benchmark's shapes ---------------------------------------------------------------


@pytest.mark.parametrize("size", SMTP_SOURCE_SIZES, ids=["4k", "256k", "10m"])
def test_smtp_source_messages_take_the_fast_path_and_give_the_same_bodies(size: int) -> None:
    raw = smtp_source(size)
    assert takes_fast_path(raw, min_body=DEFAULT_MIN)
    assert_same_bodies(raw)
    text = json.loads(bodies(raw, fast=True)[0])["message"]["text"]
    assert text == raw.partition(b"\r\n\r\n")[2].decode("ascii").replace("\r\n", "\n")


def test_a_big_body_costs_the_text_and_its_copy_at_most() -> None:
    # Peak while parsing: the body as bytes and its text, then the text and its CRLF-less
    # copy. The whole-message parse also holds every line as a str, and joins them.
    raw = smtp_source(10 * 1024 * 1024)
    with fast_body(True):
        tracemalloc.start()
        try:
            parsed = ParsedMessage.parse(raw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(parsed.fields["text"]) > 10_000_000
    assert peak < 2.1 * len(raw)


# --- which messages take it ---------------------------------------------------------------

PLAIN_HEAD = b"From: <a@example.com>\r\nSubject: hi\r\n"


@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        (PLAIN_HEAD + b"\r\nbody\r\n", True),
        (PLAIN_HEAD + b"\r\n", True),  # empty body
        (b"\r\nno headers at all\r\n", True),
        (b"Subject: lf\n\nbody\n", True),
        (b"Subject: cr\r\rbody\r", True),
        (b"Subject: x\r\n folded\r\n\tagain\r\n\r\nbody", True),
        (PLAIN_HEAD + b"\r\nFrom the start\r\n", True),
        (PLAIN_HEAD + b"\r\n leading space\r\nX-Header-Like: v\r\n", True),
        (b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n", True),
        (b"Content-Type: text/html\r\nContent-Transfer-Encoding: 8BIT\r\n\r\n<p>\r\n", True),
        (b"Content-Transfer-Encoding: Binary\r\n\r\n\x00\xff\r\n", True),
        (b"Content-Type: application/pdf\r\nContent-Disposition: attachment\r\n\r\n%PDF", True),
        (PLAIN_HEAD, False),  # no blank line: all header
        (PLAIN_HEAD + b"X-Last: no newline", False),
        (b"", False),
        (PLAIN_HEAD + b"not a header\r\n\r\nbody\r\n", False),  # ends the headers, a defect
        (b"From a@b Sat Nov 28 14:34:00 2026\r\nSubject: x\r\n\r\nbody\r\n", False),
        (PLAIN_HEAD + b"From a@b\r\n\r\nbody\r\n", False),  # the stdlib pushes it to the body
        (PLAIN_HEAD + b" \r\nbody\r\n", False),  # a whitespace line continues a header
        (b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n", False),
        (b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\nx\r\n--q--\r\n", False),
        (b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx\r\n", False),
        (b"Content-Type: Message/Delivery-Status\r\n\r\nA: b\r\n\r\nC: d\r\n", False),
        (b"Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n", False),
        (b"Content-Transfer-Encoding: Quoted-Printable\r\n\r\n=41\r\n", False),
        (b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n", False),
        (b"Content-Transfer-Encoding: 7bit (really)\r\n\r\nx\r\n", False),
        (b"Content-Type: multipart\r\n /mixed\r\n\r\nx\r\n", False),  # declined by the hint
        # encoded words the stdlib reads in MIME headers: past the hint, caught by the check
        (b"Content-Type: =?us-ascii?b?bXVsdGlwYXJ0L21peGVk?=; boundary=q\r\n\r\n--q\r\n", False),
        (b"Content-Type: =?us-ascii?b?bWVzc2FnZS9yZmM4MjI=?=\r\n\r\nSubject: x\r\n\r\ny", False),
        (b"Content-Transfer-Encoding: =?us-ascii?b?YmFzZTY0?=\r\n\r\naGk=\r\n", False),
        (b"Content-Type: message /rfc822\r\n\r\nSubject: x\r\n\r\ny\r\n", True),  # no type
    ],
)
def test_which_messages_take_the_fast_path(raw: bytes, fast: bool) -> None:
    assert takes_fast_path(raw) == fast
    assert_same_bodies(raw)


def test_small_bodies_are_left_to_the_parser() -> None:
    assert 0 < DEFAULT_MIN <= 4096  # the benchmark's smallest message still takes it
    for size, fast in [(DEFAULT_MIN - 1, False), (DEFAULT_MIN, True), (10, False)]:
        raw = PLAIN_HEAD + b"\r\n" + b"x" * size
        assert takes_fast_path(raw, min_body=DEFAULT_MIN) == fast
        assert takes_fast_path(raw)


def test_the_switch_turns_it_off() -> None:
    raw = smtp_source(4096)
    real_feed = mailpolicy._feed
    fed: list[bytes] = []

    def feed(data: bytes) -> Any:
        fed.append(data)
        return real_feed(data)

    with fast_body(False), pytest.MonkeyPatch.context() as mp:
        for module in FEEDERS:
            mp.setattr(module, "_feed", feed)
        ParsedMessage.parse(raw)
    assert fed == [raw]


# --- corpora ------------------------------------------------------------------------------


def corpus_dir() -> Path:
    """CPython's email test messages (as tests/test_charsets.py uses them)."""
    try:
        import test.test_email
    except ImportError:
        pytest.fail("CPython's test package is missing (Debian: libpython3.11-testsuite)")
    return Path(os.path.dirname(test.test_email.__file__)) / "data"


def test_cpython_corpus_gives_the_same_bodies() -> None:
    files = sorted(corpus_dir().glob("msg_*.txt"))
    assert len(files) >= 45
    fast = 0
    for path in files:
        raw = path.read_bytes()
        assert_same_bodies(raw)
        fast += takes_fast_path(raw)
    assert fast >= 5  # the corpus really exercises the fast path


def messages_parsed_by(module: ModuleType) -> list[bytes]:
    """Every message the module's tests hand to ParsedMessage.parse, recorded by running them
    (each parametrized case too; the hypothesis tests are left out: their inputs vary)."""
    seen: dict[bytes, None] = {}  # in order, without repeats
    real = ParsedMessage.parse

    def recording(data: bytes, *args: Any) -> ParsedMessage:
        seen[bytes(data)] = None
        return real(data, *args)

    tests = [
        f
        for name, f in vars(module).items()
        if name.startswith("test_") and inspect.isfunction(f) and not hasattr(f, "hypothesis")
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ParsedMessage, "parse", staticmethod(recording))
        for test in tests:
            for kwargs in parametrized_calls(test):
                test(**kwargs)
    return list(seen)


def parametrized_calls(test: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    axes = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names = mark.args[0]
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
            values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
            axes.append([dict(zip(names, v, strict=True)) for v in values])
    wanted = set(inspect.signature(test).parameters)
    for combo in itertools.product(*axes):
        kwargs = {k: v for d in combo for k, v in d.items()}
        assert set(kwargs) == wanted, f"{test.__name__} needs fixtures: {wanted - set(kwargs)}"
        yield kwargs


@pytest.mark.parametrize("name", ["test_payload", "test_charsets", "test_payload_fastpath"])
def test_messages_of_the_other_payload_tests_give_the_same_bodies(name: str) -> None:
    module = importlib.import_module(name)  # tests/ is on sys.path, as conftest.py needs
    if name == "test_payload_fastpath":  # its tests are mostly about single headers
        messages = [*module.CRAFTED, module.with_attachments("é\r\n" * 30_000)]
    else:
        messages = messages_parsed_by(module)
    assert len(messages) >= 5
    for raw in messages:
        assert_same_bodies(raw)
    assert any(takes_fast_path(raw) for raw in messages)


# --- generated messages, biased to the edges ----------------------------------------------

EOLS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]
HEADER_LINES = [
    b"From: <a@example.com>",
    b"To: Bob <b@example.net>, c@example.net",
    b"Subject: hello",
    b"Subject: caf\xc3\xa9 \xe2\x9c\x93",
    b"Subject: caf\xe9",
    b"Date: Sat, 28 Nov 2026 14:34:00 +0000",
    b"Message-Id: <1.2@vm>",
    b"MIME-Version: 1.0",
    b"X-Folded: one",
    b" continued",
    b"\tcontinued",
    b" ",
    b"X-Nul: a\x00b",
    b"X-Empty:",
    b":no name",
    b"no colon",
    b"From sender@example.com Sat Nov 28 14:34:00 2026",
    b"\xe9t\xe9: 8-bit name",
    b"X-Bare: a\rY-Next: b",
    b"Content-Disposition: attachment; filename=a.txt",
    b"Content-Disposition: inline",
    b'Content-Disposition: inline; filename="b.txt"',
    b"Content-ID: <part@example.org>",
]
TYPES = [
    b"text/plain",
    b"TEXT/PLAIN",
    b"text/html",
    b"text/enriched",
    b"text",
    b"",
    b"application/octet-stream",
    b"image/png",
    b"multipart/mixed",
    b"multipart/alternative; boundary=q",
    b'Multipart/Mixed; boundary="q"',
    b"message/rfc822",
    b"message/delivery-status",
    b"Message/Partial; id=1",
]
PARAMS = [
    b"",
    b"; charset=utf-8",
    b'; charset="UTF-8"',
    b"; charset=iso-8859-1",
    b"; charset=us-ascii",
    b"; charset=koi8-r",
    b"; charset=shift_jis",
    b"; charset=iso-2022-jp",
    b"; charset=utf-16",
    b"; charset=unknown-8bit",
    b"; charset=x-no-such",
    b"; charset*=utf-8''x",
    b"; charset*",
    b"; format=flowed",
]
CTES = [
    b"7bit",
    b"7BIT",
    b"8bit",
    b"8Bit",
    b"binary",
    b"Binary",
    b" 7bit ",
    b"7bit (comment)",
    b"",
    b"bogus",
    b"base64",
    b"BASE64",
    b"quoted-printable",
    b"Quoted-Printable",
    b"x-uuencode",
    b"uue",
]
SEPARATORS = [b"\r\n", b"\r\n", b"\n", b"\r", b"", b" \r\n", b"\t\n"]
BODY_LINES = [
    b"",
    b"plain text",
    b"From the start of a line",
    b" leading space",
    b"\tleading tab",
    b"Header-Like: value",
    b"--q",
    b"--q--",
    b"=3D soft break=",
    b"aGVsbG8gd29ybGQ=",
    b"begin 644 x.txt",
    b"caf\xc3\xa9 \xf0\x9f\x98\x80",
    b"caf\xe9 \x93q\x94 \x81",
    b"\xff\xfe\xc3",
    b"\x1b$B$3$s\x1b(B",
    b"\x00NUL\x00",
    b"x\ry",
    b"\r",
]

header_lines = st.one_of(
    st.sampled_from(HEADER_LINES),
    st.builds(
        lambda t, p: b"Content-Type: " + t + p, st.sampled_from(TYPES), st.sampled_from(PARAMS)
    ),
    st.builds(lambda c: b"Content-Transfer-Encoding: " + c, st.sampled_from(CTES)),
)
body_lines = st.one_of(st.sampled_from(BODY_LINES), st.binary(max_size=12))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    heads = draw(st.lists(st.tuples(header_lines, st.sampled_from(EOLS)), max_size=6))
    lines = draw(st.lists(st.tuples(body_lines, st.sampled_from([*EOLS, b""])), max_size=8))
    return (
        b"".join(h + eol for h, eol in heads)
        + draw(st.sampled_from(SEPARATORS))
        + b"".join(line + eol for line, eol in lines)
    )


@settings(max_examples=400, deadline=None)
@given(messages())
def test_generated_messages_give_the_same_bodies(raw: bytes) -> None:
    event("fast path" if takes_fast_path(raw) else "whole parse")
    assert_same_bodies(raw)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(HEADER_LINES[:9]), max_size=4),
    st.sampled_from([b"", b"Content-Type: text/plain; charset=utf-8\r\n"]),
    st.sampled_from([b"\r\n", b"\n", b"\r"]),
    st.lists(st.tuples(body_lines, st.sampled_from([*EOLS, b""])), max_size=8),
)
def test_plain_generated_messages_take_the_fast_path(
    heads: list[bytes], mime: bytes, separator: bytes, lines: list[tuple[bytes, bytes]]
) -> None:
    raw = b"".join(h + b"\r\n" for h in heads) + mime + separator
    raw += b"".join(line + eol for line, eol in lines)
    assert takes_fast_path(raw)
    assert_same_bodies(raw)
