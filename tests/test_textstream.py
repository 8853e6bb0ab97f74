"""The spooled JSON string of a text body is byte for byte what the in-memory path makes.

Differential: charsets._decode_text + CRLF->LF + json.dumps is the reference, for any bytes.
"""

from __future__ import annotations

import codecs
import encodings
import gc
import hashlib
import json
import os
import pkgutil
import tracemalloc
from collections.abc import Iterator
from email.message import Message

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge.base.transaction import READ_CHUNK, MessageBuffer
from bridge.mail.bodytext import defined_bytes as _defined_bytes
from bridge.mail.bodytext import is_single_byte as _is_single_byte
from bridge.mail.charsets import Defects, _declared_charset, _decode_text
from bridge.mail.parsed import ParsedMessage
from bridge.webhook.textstream import SpooledText

# Accepted whatever the bytes: the guess, UTF-8 and the single-byte codecs.
ALWAYS = [
    None,
    "us-ascii",
    "unknown-8bit",
    "x-no-such-charset",  # unknown: a defect, then the guess
    "utf-8",
    "utf8",
    "iso-8859-1",
    "latin1",
    "windows-1252",
    "iso-8859-2",
    "iso-8859-5",
    "iso-8859-7",
    "iso-8859-8-i",
    "iso-8859-15",
    "koi8-r",
    "macintosh",
    "tis-620",
    "ansi_x3.4-1968",  # the ascii codec itself
    "iso-ir-100",  # latin-1 itself (not in the alias table)
    "cp037",  # EBCDIC: CR and LF are other bytes, so line ends are found in the text
]
GUESSED = [None, "us-ascii", "unknown-8bit", "x-no-such-charset"]
# Accepted only when the text decodes strictly; declined (None) otherwise or always.
SOMETIMES = ["iso-2022-jp", "shift_jis", "euc-kr", "gb2312", "big5", "utf-7", "utf-16"]
CHUNKS = [1, 2, 3, 4, 5, 6, 7, 64, READ_CHUNK]

EDGES = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\r\n",
    b"\n\r",
    b"\x1b$",
    b"\x1b$B",
    b"\x1b(B",
    b"\x1b",
    b"$",
    b"\x00",
    b'"',
    b"\\",
    b"\t\x08\x0c\x7f",
    "é".encode(),
    "€".encode(),
    "😀".encode(),
    "\u2028".encode(),
    b"\xff",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xed\xa0\x80",  # an encoded surrogate: never valid UTF-8
    b"\x81\x8d\x8f\x90\x9d",  # the bytes cp1252 leaves undefined
]
bodies = st.lists(
    st.one_of(
        st.sampled_from(EDGES),
        st.binary(max_size=6),
        st.text(max_size=6).map(str.encode),
    ),
    max_size=30,
).map(b"".join)
# Mostly plain lines, as most mail is: the pieces that take the byte-level ways.
plain_lines = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=9).map(
            lambda line: line.encode() + b"\r\n"
        ),
        st.sampled_from([b"\r", b"\n", b"\r\n", b'"', b"\\", b"\t", "é".encode(), b"\xff"]),
    ),
    max_size=25,
).map(b"".join)


def make_buffer(prefix: bytes, body: bytes, spooled: bool, piece: int = 5) -> MessageBuffer:
    buf = MessageBuffer(0 if spooled else 1 << 30)
    data = prefix + body
    for i in range(0, len(data), piece):  # arrives in pieces, as from the socket
        buf.write(data[i : i + piece])
    assert buf.spooled == (spooled and bool(data))
    return buf


def text_part(charset: str | None) -> Message:
    part = Message()
    if charset is not None:
        part["Content-Type"] = f'text/plain; charset="{charset}"'
    return part


def reference(
    body: bytes, charset: str | None, ensure_ascii: bool
) -> tuple[bytes | None, list[str]]:
    """What payload.py puts in the JSON for this text (None: it cannot be UTF-8 unescaped)."""
    defects = Defects()
    text = _decode_text("part 1", text_part(charset), body, defects).replace("\r\n", "\n")
    try:
        out = json.dumps(text, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        out = None
    return out, defects.items


def sent(spooled: SpooledText, ensure_ascii: bool = False) -> bytes:
    """The JSON string as the body carries it: quotes, then the pieces as read."""
    data = b"".join(spooled.chunks(ensure_ascii))
    assert len(data) == spooled.length(ensure_ascii)
    return b'"' + data + b'"'


def check(
    body: bytes,
    charset: str | None,
    *,
    prefix: bytes = b"",
    spooled: bool = False,
    in_memory: bool = False,
    chunk_size: int = READ_CHUNK,
) -> SpooledText | None:
    buf = make_buffer(prefix, body, spooled)
    expected, expected_defects = reference(body, charset, False)
    defects = Defects()
    streamed = SpooledText.write(
        buf,
        len(prefix),
        _declared_charset(text_part(charset)),
        "part 1",
        defects,
        in_memory=in_memory,
        chunk_size=chunk_size,
    )
    if streamed is None:
        # Declined: a charset that may be, or the guess's ISO-2022-JP try, whose incremental
        # decoder can fail otherwise than the whole decode does.
        assert charset not in ALWAYS or (charset in GUESSED and b"\x1b$" in body)
        assert defects.items == []  # the in-memory path records them
        return None
    assert expected is not None  # never accepted when the text could not be sent as is
    assert sent(streamed) == expected
    assert defects.items == expected_defects
    assert sent(streamed) == expected  # a retry sends the same bytes
    assert sent(streamed, True) == reference(body, charset, True)[0]
    assert streamed.text() == json.loads(expected)
    streamed.close()
    return streamed


@settings(max_examples=1000, deadline=None)
@given(
    body=st.one_of(bodies, plain_lines),
    charset=st.sampled_from(ALWAYS + SOMETIMES),
    prefix=st.binary(max_size=12),
    spooled=st.booleans(),
    in_memory=st.booleans(),
    chunk_size=st.sampled_from(CHUNKS),
)
@example(body=b"a\r\nb", charset=None, prefix=b"", spooled=True, in_memory=False, chunk_size=2)
# A lone CR, then a lone LF: as many of each as CRLF pairs would have, but no pair.
@example(body=b"a\rb\nc", charset=None, prefix=b"", spooled=False, in_memory=True, chunk_size=64)
def test_any_bytes_spool_as_the_in_memory_path(
    body: bytes,
    charset: str | None,
    prefix: bytes,
    spooled: bool,
    in_memory: bool,
    chunk_size: int,
) -> None:
    check(
        body,
        charset,
        prefix=prefix,
        spooled=spooled,
        in_memory=in_memory,
        chunk_size=chunk_size,
    )


CJK = "日本語のテキスト、漢字とカタカナ。ｶﾀｶﾅ中文文本\uff0c简体繁體한국어 텍스트①"
cjk_text = st.text(alphabet=st.sampled_from(CJK + 'ab \r\n"\\\x00\x1b$(B'), max_size=40)
MULTIBYTE = ["iso-2022-jp", "euc-jp", "shift_jis", "cp932", "gb18030", "gbk", "gb2312", "big5"]
MULTIBYTE += ["cp950", "big5hkscs", "cp949", "euc-kr"]


@settings(max_examples=600, deadline=None)
@given(
    text=cjk_text,
    codec=st.sampled_from(MULTIBYTE),
    declared=st.booleans(),
    junk=st.one_of(st.just(b""), st.sampled_from(EDGES), st.binary(min_size=1, max_size=3)),
    junk_at=st.floats(0, 1),
    spooled=st.booleans(),
    chunk_size=st.sampled_from(CHUNKS),
)
def test_multibyte_text_split_anywhere(
    text: str,
    codec: str,
    declared: bool,
    junk: bytes,
    junk_at: float,
    spooled: bool,
    chunk_size: int,
) -> None:
    encoded = text.encode(codec, "ignore")
    at = int(len(encoded) * junk_at)
    body = encoded[:at] + junk + encoded[at:]
    # Undeclared, an ISO-2022-JP text is recognised by its escapes.
    check(body, codec if declared else None, spooled=spooled, chunk_size=chunk_size)


def test_valid_multibyte_text_is_spooled() -> None:
    text = (CJK + "\r\n") * 50
    for codec in MULTIBYTE:
        body = text.encode(codec, "ignore")  # each codec has some of these characters
        assert len(body.decode(codec)) > len(text.encode("ascii", "ignore"))
        assert check(body, codec, chunk_size=3) is not None, codec
    streamed = check(text.encode("iso-2022-jp", "ignore"), None, chunk_size=1)
    assert streamed is not None and streamed.codec == "iso2022_jp"


@pytest.mark.parametrize("in_memory", [False, True])
def test_crlf_split_between_chunks_becomes_one_newline(in_memory: bool) -> None:
    for chunk_size in (1, 2, 3, 4):
        for body, expected in [
            (b"ab\r\ncd\r", b'"ab\\ncd\\r"'),
            (b"ab\r\n\r\n\r\r\n\n", b'"ab\\n\\n\\r\\n\\n"'),
            (b'a"\r\nb\\\r\n', b'"a\\"\\nb\\\\\\n"'),
        ]:
            streamed = check(body, None, chunk_size=chunk_size, spooled=True, in_memory=in_memory)
            assert streamed is not None
            streamed = SpooledText.write(
                make_buffer(b"", body, spooled=True),
                0,
                None,
                "m",
                Defects(),
                chunk_size=chunk_size,
            )
            assert streamed is not None and sent(streamed) == expected
            streamed.close()


def test_escape_split_between_chunks_is_seen() -> None:
    body = "こんにちは".encode("iso-2022-jp")
    assert body.startswith(b"\x1b$")
    for chunk_size in (1, 2, 4):  # the ESC and the "$" in two chunks, or in one
        streamed = check(b"x" * 3 + body, None, chunk_size=chunk_size)
        assert streamed is not None and streamed.codec == "iso2022_jp"


def test_a_late_escape_that_does_not_decode_leaves_utf8() -> None:
    # Plain text, then "\x1b$" that is no ISO-2022-JP: written three times, UTF-8 at last.
    body = b"plain line\r\n" * 30_000 + b"\x1b$\xff" + "é".encode()
    streamed = check(body, None, spooled=True)
    assert streamed is not None and streamed.codec == "cp1252"
    body = b"plain line\r\n" * 30_000 + b"\x1b$ \x1b(B" + "é".encode()
    streamed = check(body, None, spooled=True)
    assert streamed is not None and streamed.codec == "utf-8"


def test_an_escape_after_bytes_that_are_not_utf8_still_counts() -> None:
    # ISO-2022-JP lets an 8-bit byte after an ESC through: not UTF-8, and yet ISO-2022-JP.
    body = b"\x1b\x80" + b"plain\r\n" * 10 + "亜".encode("iso-2022-jp")
    assert body.decode("iso-2022-jp")
    for chunk_size in (1, 3, READ_CHUNK):
        streamed = check(body, None, chunk_size=chunk_size)
        assert streamed is not None and streamed.codec == "iso2022_jp"


def test_invalid_utf8_at_the_very_end_decides_the_whole_text() -> None:
    body = ("grüße\r\n" * 40_000).encode() + b"\xe9t\xe9"
    declared = check(body, "utf-8", spooled=True)
    assert declared is not None and declared.codec == "cp1252"
    guessed = check(body, None, spooled=True, chunk_size=7)
    assert guessed is not None and guessed.codec == "cp1252"
    # A lead byte, an ASCII chunk, a continuation byte: invalid, though each chunk looks fine.
    split = check(b"\xc3a\xa9", None, chunk_size=1)
    assert split is not None and split.codec == "cp1252"
    truncated = check("é".encode()[:1], "utf-8", chunk_size=1)  # a sequence cut by the end
    assert truncated is not None and truncated.codec == "cp1252"
    # A lead byte at the end of a plain chunk, a plain chunk after it: still invalid.
    lead = check(b"ab\xc3" + b"cd\r\n", None, chunk_size=3)
    assert lead is not None and lead.codec == "cp1252"


def test_a_broken_escape_the_incremental_decoder_cannot_hold_is_declined() -> None:
    # ISO-2022-JP's incremental decoder raises "pending buffer overflow", not a decode error.
    # (One decode of the whole reports a decode error; the text would be UTF-8.)
    body = b"\x1b$" + b"\r" * 7
    for chunk_size in (2, READ_CHUNK):
        assert check(body, None, chunk_size=chunk_size) is None


def open_fds() -> int:
    gc.collect()  # earlier tests' unreachable buffers close their files now, not between counts
    return len(os.listdir("/proc/self/fd"))


def test_declined_without_defects_and_without_files() -> None:
    defects = Defects()
    before = open_fds()
    buf = make_buffer(b"", "x".encode("utf-16"), spooled=False)
    assert SpooledText.write(buf, 0, "utf-16", "part 1", defects) is None
    buf = make_buffer(b"", b"\x82\xa0\x85\x40" * 1000, spooled=True)
    assert SpooledText.write(buf, 0, "shift_jis", "part 1", defects) is None
    assert defects.items == []
    buf.close()
    assert open_fds() == before


def test_a_charset_name_with_a_nul_is_an_unknown_charset_streamed_too() -> None:
    # It raised in the in-memory decode (an "unreadable part"), so it was declined here; both
    # now read it as an unknown charset is.
    defects = Defects()
    buf = make_buffer(b"", b"caf\xc3\xa9 " * 1000, spooled=True)
    spooled = SpooledText.write(buf, 0, "bad\x00name", "part 1", defects)
    assert spooled is not None
    assert spooled.text() == "café " * 1000
    note = "part 1: unknown charset 'bad\\x00name'; decoded as UTF-8 or Windows-1252"
    assert defects.items == [note]
    spooled.close()
    buf.close()


def test_every_single_byte_codec_decodes_byte_by_byte() -> None:
    """Single-byte codecs are decoded piece by piece with "replace", and their undefined bytes
    found byte by byte: both hold for every codec in the standard library taken that way."""
    every_byte = bytes(range(256)) * 2 + b"\r\n\r\r\n"
    accepted = []
    for module in pkgutil.iter_modules(encodings.__path__):
        try:
            name = codecs.lookup(module.name).name
        except LookupError:
            continue
        if not _is_single_byte(name):
            continue
        accepted.append(name)
        for errors in ("replace", "bridge-latin1-fallback"):
            whole = every_byte.decode(name, errors)
            assert "".join(bytes([b]).decode(name, errors) for b in every_byte) == whole
        undefined = every_byte.translate(None, _defined_bytes(name))
        try:
            every_byte.decode(name)
        except UnicodeDecodeError:
            assert undefined
        else:
            assert not undefined
    assert {"cp1252", "iso8859-15", "koi8-r", "ascii", "iso8859-1", "cp037"} <= set(accepted)
    for name in sorted(set(accepted)):
        streamed = check(every_byte, name, chunk_size=7)
        assert streamed is not None, name


def test_same_as_the_parsed_message_text() -> None:
    """Through payload.ParsedMessage: the body of a single-part message starts after the
    header block, and the spooled string is its "text" field with the same defects."""
    header = b"From: a@example.org\r\nContent-Type: text/plain; charset=utf-8\r\n"
    header += b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    for body in [
        ("line é\r\n" * 20_000).encode(),  # big: payload.py's fast path
        b"short \xff body\r\n\r\n.\r\n",
        b"",
    ]:
        parsed = ParsedMessage.parse(header + body)
        defects = Defects()
        buf = make_buffer(header, body, spooled=True, piece=4096)
        streamed = SpooledText.write(buf, len(header), "utf-8", "message", defects)
        assert streamed is not None
        assert sent(streamed) == json.dumps(parsed.fields["text"], ensure_ascii=False).encode()
        assert defects.items == parsed.defects
        streamed.close()


def test_large_spooled_body_is_written_and_read_in_small_memory() -> None:
    line = 'Grüße aus dem Süden, "quoted" and a tab\there, then more text........\r\n'
    body = (line * (20 * 1024 * 1024 // len(line.encode()))).encode()
    buf = make_buffer(b"Subject: big\r\n\r\n", body, spooled=True, piece=64 * 1024)
    tracemalloc.start()
    try:
        streamed = SpooledText.write(buf, 16, None, "message", Defects())
        assert streamed is not None
        digest = hashlib.sha256()
        size = 0
        for piece in streamed.chunks():
            digest.update(piece)
            size += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == streamed.length()
    assert peak < 4 * 1024 * 1024, peak
    expected, _ = reference(body, None, False)
    assert expected is not None
    assert digest.digest() == hashlib.sha256(expected[1:-1]).digest()
    streamed.close()
    buf.close()


@pytest.mark.parametrize("header", [b"", b"Subject: x\r\n\r\n"])
def test_pieces_stay_small_for_a_message_held_in_one_piece(header: bytes) -> None:
    body = ("\x00 control and 😀 wide\r\n" * 2000).encode()
    buf = make_buffer(header, body, spooled=False)
    buf.getvalue()  # joins the in-memory pieces into one
    for in_memory in (False, True):
        streamed = SpooledText.write(
            buf, len(header), None, "part 1", Defects(), in_memory=in_memory, chunk_size=100
        )
        assert streamed is not None
        for ensure_ascii in (False, True):
            # Each input byte makes at most 6 bytes of JSON (\u0000); one CR may be held over.
            assert max(len(piece) for piece in streamed.chunks(ensure_ascii)) <= 6 * 101
            assert sent(streamed, ensure_ascii) == reference(body, None, ensure_ascii)[0]


@pytest.mark.parametrize("in_memory", [False, True])
def test_reading_after_close_fails(in_memory: bool) -> None:
    buf = make_buffer(b"", b"some text\r\n" * 100, spooled=True)
    streamed = SpooledText.write(
        buf, 0, None, "part 1", Defects(), in_memory=in_memory, chunk_size=100
    )
    assert streamed is not None
    pieces = streamed.chunks()
    assert next(pieces)
    streamed.close()
    streamed.close()  # twice is fine
    with pytest.raises(RuntimeError):
        list(pieces)  # mid-way: the body must fail, never go out short
    with pytest.raises(RuntimeError):
        list(streamed.chunks())
    with pytest.raises(RuntimeError):
        streamed.length(ensure_ascii=True)


def test_the_message_is_read_once_for_plain_text() -> None:
    """The common case is one pass: the text is written as it is found to be UTF-8."""
    buf = make_buffer(b"", b"plain text\r\n" * 100_000, spooled=True, piece=65536)
    reads = 0
    real = buf.iter_chunks

    def counting(chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        nonlocal reads
        reads += 1
        return real(chunk_size)

    buf.iter_chunks = counting  # type: ignore[method-assign]
    streamed = SpooledText.write(buf, 0, None, "part 1", Defects())
    assert streamed is not None and streamed.codec == "utf-8"
    assert reads == 1
    streamed.close()


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_chunk_size_must_be_positive(chunk_size: int) -> None:
    buf = make_buffer(b"", b"x", spooled=False)
    with pytest.raises(ValueError):
        SpooledText.write(buf, 0, None, "part 1", Defects(), chunk_size=chunk_size)


# --- the buffer as BodyText.decide reads it ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.lists(st.sampled_from([b"a", b"\r\n", b"\x7f", b"\x00", b"\x1b", b"\x80", b"\xff"]))
        .map(b"".join),
        max_size=8,
    ),
    spooled=st.booleans(),
    start=st.integers(min_value=0, max_value=40),
)
def test_the_buffer_knows_where_plain_text_starts(
    pieces: list[bytes], spooled: bool, start: int
) -> None:
    """plain_from answers from what write() noted (the decision's read-free case): it must
    be what a look at the bytes says, whatever the pieces and wherever the body starts."""
    buf = MessageBuffer(0 if spooled else 1 << 30)
    for piece in pieces:
        buf.write(piece)
    data = b"".join(pieces)
    tail = data[start:]
    assert buf.plain_from(start) == (tail.isascii() and b"\x1b" not in tail)
    for chunk_size in (1, 3, READ_CHUNK):
        got = list(buf.chunks_from(start, chunk_size))
        assert b"".join(got) == tail and all(0 < len(c) <= chunk_size for c in got)
    buf.close()


def test_an_8bit_text_is_read_to_decide_and_to_escape() -> None:
    """Not plain ASCII: the charset is decided by reading the body (the model must carry its
    defects), then the webhook side escapes it: two reads, never more."""
    buf = make_buffer(b"", "caf\xe9 text\r\n".encode() * 100_000, spooled=True, piece=65536)
    reads = 0
    real = buf.iter_chunks

    def counting(chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        nonlocal reads
        reads += 1
        return real(chunk_size)

    buf.iter_chunks = counting  # type: ignore[method-assign]
    streamed = SpooledText.write(buf, 0, None, "part 1", Defects())
    assert streamed is not None and streamed.codec == "utf-8"
    assert reads == 2
    streamed.close()


@pytest.mark.parametrize("charset", [None, "utf-8"])
def test_utf8_characters_cut_between_pieces_are_written_whole(charset: str | None) -> None:
    """Valid UTF-8 is written byte by byte where JSON keeps its bytes: a character cut at a
    piece's end must reach the next piece whole, whichever way that piece is written (a
    quote, a tab or a lone CR make it the decoder's)."""
    body = ('é"\r€\r\n😀\\\t"x\ré plain\r\n😀😀\r' * 3).encode()
    for chunk_size in range(1, 24):
        for spooled in (False, True):
            check(body, charset, spooled=spooled, chunk_size=chunk_size)
