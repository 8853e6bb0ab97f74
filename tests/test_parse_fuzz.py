"""A property-based fuzz target for the parse path (issue 15): hostile, broken and mutated
messages through ParsedMessage (in memory and from a spooled buffer) and the json and multipart
bodies. Never raises; every json body is strict JSON (UTF-8, no lone surrogate escapes); every
string in it is Unicode a strict parser takes; the parse stays bounded in CPU.

Brief in CI (the ``ci`` profile, tests/conftest.py); long on demand:
``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_parse_fuzz.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from payload_samples import ENVELOPE, ROUTE

from bridge.base.transaction import MessageBuffer, Recipient
from bridge.mail.limits import DEFAULT_LIMITS, ParseLimits
from bridge.mail.parsed import ParsedMessage
from bridge.webhook.payload import build_body
from bridge.webhook.render import message_json

# Runaways only: the CPU budget is 2 s; a parse that takes many times that is unbounded.
CPU_CEILING = 30.0

CHARSETS = ["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "utf-7", "utf-16", "shift_jis",
            "iso-2022-jp", "gb2312", "koi8-r", "punycode", "base64", "zlib", "rot13",
            "undefined", "uu", "hex", "bz2", "quopri", "idna", "unicode_escape",
            "raw_unicode_escape", "charmap", "x-unknown", "bad\x00name", ""]  # fmt: skip
NAMES = ["Subject", "From", "To", "Cc", "Reply-To", "Sender", "Message-ID", "In-Reply-To",
         "References", "Date", "Content-Type", "Content-Disposition", "Content-ID",
         "Content-Transfer-Encoding", "MIME-Version", "Authentication-Results", "X-Custom",
         "Resent-To", "Comments"]  # fmt: skip

_bytes = st.binary(max_size=40)
_word_text = st.one_of(st.text(max_size=12), _bytes.map(lambda b: b.decode("latin-1")))


@st.composite
def encoded_word(draw: st.DrawFn) -> str:
    charset = draw(st.sampled_from(CHARSETS + ["utf-8"] * 4)).replace("\x00", "")
    data = draw(_bytes)
    if draw(st.booleans()):
        text = base64.b64encode(data).decode()
        if draw(st.booleans()):
            text = text[: draw(st.integers(0, len(text)))]  # broken padding
        return f"=?{charset}?b?{text}?="
    text = "".join(chr(b) if 33 <= b < 127 and chr(b) not in "=?_" else f"={b:02X}" for b in data)
    return f"=?{charset}?q?{text}?="


@st.composite
def mailbox(draw: st.DrawFn) -> str:
    local = draw(st.from_regex(r"[a-z0-9.+\-\"\\ ]{0,10}", fullmatch=True))
    domain = draw(st.from_regex(r"[a-z0-9.\[\]]{0,10}", fullmatch=True))
    name = draw(st.one_of(st.just(""), encoded_word(), st.text(max_size=10)))
    shape = draw(st.integers(0, 4))
    if shape == 0:
        return f"{local}@{domain}"
    if shape == 1:
        return f"{name} <{local}@{domain}>"
    if shape == 2:
        return f'"{name}" <{local}@{domain}> ({draw(st.text(max_size=8))})'
    if shape == 3:
        return f"group: {local}@{domain}, {name} <x@y>;"
    return draw(st.text(max_size=20))


@st.composite
def header_value(draw: st.DrawFn, name: str) -> str:
    pieces = draw(
        st.lists(
            st.one_of(
                encoded_word(),
                mailbox(),
                st.text(max_size=15),
                st.sampled_from(["(", ")", '"', "\\", ";", ",", ":", "<", ">", "*=", "''"]),
                st.builds(
                    lambda k, v: f"; {k}*={v}",
                    st.sampled_from(["name", "filename", "charset"]),
                    st.sampled_from(["utf-8''%E2%82%AC.txt", "x'en'%FF", "''", "utf-8''"]),
                ),
            ),
            max_size=8,
        )
    )
    value = " ".join(pieces)
    if name.lower() == "content-type" and draw(st.booleans()):
        kind = draw(st.sampled_from(["text/plain", "text/html", "multipart/mixed",
                                     "message/rfc822", "application/pdf", "text/x"]))  # fmt: skip
        charset = draw(st.sampled_from(CHARSETS))
        value = f"{kind}; charset={charset}; boundary=b{value[:10]}"
    return value


@st.composite
def header_block(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 10))):
        name = draw(st.sampled_from(NAMES))
        value = draw(header_value(name))
        raw = value.encode("utf-8", "surrogatepass")
        if draw(st.booleans()):
            raw = raw.replace(b" ", b"\r\n ", 1)  # folded
        lines.append(name.encode() + b": " + raw + b"\r\n")
    return b"".join(lines)


@st.composite
def part(draw: st.DrawFn, depth: int = 0) -> bytes:
    head = draw(header_block())
    if depth < 3 and draw(st.integers(0, 3)) == 0:
        boundary = draw(st.sampled_from([b"b", b"=_x", b"--", b"b b", b""])) + b"%d" % depth
        children = draw(st.lists(part(depth + 1), max_size=4))
        body = b"".join(b"--" + boundary + b"\r\n" + c + b"\r\n" for c in children)
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
        ctype = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n'
        return head + ctype + b"\r\n" + body
    charset = draw(st.sampled_from(CHARSETS)).encode("utf-8", "surrogatepass")
    cte = draw(st.sampled_from([b"", b"base64", b"quoted-printable", b"7bit", b"x-uue", b"gzip"]))
    body = draw(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"+2D0-", b"+2D3eAA-", b"\\ud83d \\x00", b"-ab" * 30, b"=FF=ED=A0"]),
            st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
        )
    )
    if cte == b"base64" and draw(st.booleans()):
        body = base64.encodebytes(body)
    ctype = draw(st.sampled_from([b"text/plain", b"text/html", b"application/octet-stream"]))
    return (
        head
        + b"Content-Type: "
        + ctype
        + b"; charset="
        + charset
        + b"\r\n"
        + (b"Content-Transfer-Encoding: " + cte + b"\r\n" if cte else b"")
        + b"\r\n"
        + body
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(part()))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        end = draw(st.integers(at, min(len(data), at + 40)))
        op = draw(st.integers(0, 3))
        if op == 0:
            del data[at:end]
        elif op == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=20))
        elif op == 2:
            data[at:at] = data[at:end] * draw(st.integers(2, 50))  # a repeated region
        else:
            data[at:end] = bytes(len(data[at:end]))  # NULs
    return bytes(data)


_limits = st.one_of(
    st.just(DEFAULT_LIMITS),
    st.builds(
        lambda n: dataclasses.replace(
            DEFAULT_LIMITS,
            max_header_bytes=n * 8,
            max_header_count=n,
            max_encoded_words=n // 2,
            max_addresses_per_header=max(1, n // 4),
            max_mime_parts=n,
            max_mime_depth=max(1, n // 4),
            max_header_block_bytes=n * 40,
        ),
        st.integers(1, 12),
    ),
)


def check_body(body: bytes) -> Any:
    """Strict JSON, no lone surrogate in it (orjson refuses a lone escaped one); its value."""
    body.decode("utf-8")  # strict: no raw surrogates, no broken bytes
    return orjson.loads(body)


def walk_strings(value: Any) -> None:
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate raises
    elif isinstance(value, dict):
        for k, v in value.items():
            walk_strings(k)
            walk_strings(v)
    elif isinstance(value, list):
        for v in value:
            walk_strings(v)


def exercise(data: bytes, limits: ParseLimits, spooled: bool) -> None:
    started = time.thread_time()
    buffer = MessageBuffer(spool_threshold=0 if spooled else 1 << 30)
    buffer.write(data)
    parsed = ParsedMessage.from_buffer(buffer, (), limits)
    try:
        obj = check_body(message_json(parsed, with_content=True))
        walk_strings(obj)
        assert isinstance(obj["headers"], list)
        check_body(orjson.dumps(parsed.defects))
        if parsed.limits_hit:
            event("a limit hit")
            for name in parsed.limits_hit:
                assert any(f"parse limit {name} = " in d for d in parsed.defects)
        recipient = Recipient(address="bob@example.net", route=ROUTE)
        for kind in ("json", "multipart"):
            body = build_body(kind, ENVELOPE, recipient, buffer, parsed, "msg_x", "mx.test")
            joined = b"".join(body.chunks())
            assert len(joined) == body.length
            if kind == "json":
                walk_strings(check_body(joined))
    finally:
        parsed.close()
        buffer.close()
    assert time.thread_time() - started < CPU_CEILING


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated(), _limits, st.booleans())
def test_any_message_parses_to_strict_json(data: bytes, limits: ParseLimits, spooled: bool) -> None:
    exercise(data, limits, spooled)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(max_size=2000), st.booleans())
def test_any_bytes_parse_to_strict_json(data: bytes, spooled: bool) -> None:
    exercise(data, DEFAULT_LIMITS, spooled)
