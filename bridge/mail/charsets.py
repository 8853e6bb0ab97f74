"""A MIME text part's bytes as Unicode: its declared charset read as mail clients read it,
else a guess (UTF-8, ISO-2022-JP, Windows-1252); and the parse's list of defects.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable
from email.message import Message

# Declared charsets decoded as mail clients and browsers do (WHATWG Encoding): supersets that
# only differ where the narrow one has control codes or nothing.
CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "utf8": "utf-8",
}

UNDECLARED = frozenset({"us-ascii", "ascii", "unknown-8bit", "x-unknown", "unknown", "default"})

# Python codecs that are no text charset a mail may declare: transforms (base64, zlib, ...)
# have _is_text_encoding false; these others read as text but are not one. Declared on a text
# part, they would empty or mangle it (punycode is also quadratic), so the part is read as an
# unknown charset is.
NOT_CHARSETS = frozenset(
    {"punycode", "idna", "undefined", "unicode-escape", "raw-unicode-escape", "charmap"}
)
# Lone surrogates (and halves of pairs written as two code points): RFC 8259 8.2.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Decoders that never give a surrogate: their texts need no scan.
_NO_SURROGATES = frozenset({"utf-8", "ascii", "cp1252", "iso8859-1"})


class Defects:
    """Parser defects as readable strings, in order, without repeats."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        line = f"{where}: {what}"
        if line not in self.items:
            self.items.append(line)

    def add_all(self, where: str, defects: Iterable[Exception]) -> None:
        for d in defects:
            text = str(d)
            self.add(where, f"{type(d).__name__}: {text}" if text else type(d).__name__)


def _declared_charset(part: Message) -> str | None:
    if part.get_content_maintype() not in ("text", "multipart"):
        return None
    try:
        charset = part.get_param("charset")
    except Exception:
        return None
    if isinstance(charset, tuple):  # RFC 2231 form: (charset, language, value)
        charset = charset[2]
    text = str(charset).strip().strip('"').lower() if charset else ""
    return text or None


@functools.lru_cache(maxsize=256)  # charset names are the sender's choice: bounded
def text_codec(charset: str) -> str | None:
    """The Python codec that reads the declared ``charset`` as mail clients do; None when it
    is unknown or not a text charset (base64, zlib, punycode, ...)."""
    try:
        info = codecs.lookup(CHARSET_ALIASES.get(charset, charset))
    except Exception:  # LookupError; ValueError for a NUL in the name
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in NOT_CHARSETS:
        return None
    return info.name


def _decode_text(where: str, part: Message, content: bytes, defects: Defects) -> str:
    """A text part as Unicode: its declared charset (read as mail clients do), else a guess."""
    charset = _declared_charset(part)
    if charset is None or charset in UNDECLARED:
        return _decode_8bit(content)
    codec = text_codec(charset)
    if codec is None:
        defects.add(where, f"unknown charset {charset!r}; decoded as UTF-8 or Windows-1252")
        return _decode_8bit(content)
    try:
        text = content.decode(codec)
    except UnicodeDecodeError:
        if codec == "utf-8":
            # Mislabelled mail is common; an 8-bit legacy text is a better guess than U+FFFD.
            defects.add(where, "text is not valid utf-8 as declared; decoded as Windows-1252")
            return _decode_cp1252(content)
        defects.add(where, f"text is not valid {charset}; undecodable bytes replaced")
        text = content.decode(codec, "replace")
    if codec in _NO_SURROGATES:
        return text
    return scrub(where, text, defects)


def scrub(where: str, text: str, defects: Defects) -> str:
    """``text`` with every lone surrogate made U+FFFD (a pair written as two code points made
    one character), a defect saying so: JSON strings must be Unicode (RFC 8259 8.2)."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    defects.add(where, "text held lone surrogates; replaced with U+FFFD")
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _decode_8bit(data: bytes) -> str:
    """Undeclared 8-bit text: UTF-8 when it is valid UTF-8, ISO-2022-JP when it has its escapes,
    else Windows-1252 (Latin-1 for its five unassigned bytes), so it never fails."""
    if b"\x1b" in data and b"\x1b$" in data:  # one byte is found by memchr, far faster
        try:
            return data.decode("iso-2022-jp")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _decode_cp1252(data)


def _decode_cp1252(data: bytes) -> str:
    return data.decode("cp1252", "bridge-latin1-fallback")


def _latin1_fallback(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return exc.object[exc.start : exc.end].decode("latin-1"), exc.end


codecs.register_error("bridge-latin1-fallback", _latin1_fallback)
