"""Header values read in linear time, for those the standard library's parser cannot be given:
its unstructured and address-list parsers copy the rest of the value for every token.

RFC 2047 encoded-words are decoded as mail clients do (adjacent words of one charset joined
before decoding); address lists are cut at their top-level commas and read one mailbox at a time.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from email.headerregistry import Address

from bridge.mail.charsets import text_codec

# RFC 2047 section 2: =?charset[*language]?encoding?encoded-text?= (no "?" or space inside).
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_LINE_BREAKS = re.compile(r"[\r\n]")

# RFC 5322 atext (ASCII only): the plain mailbox forms that need no parser at all.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
# One mailbox of a list: "local@domain", "<local@domain>" or "Atom Words <local@domain>",
# then "," or the end (the last group).
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*(?:({_DOT_ATOM})@({_DOT_ATOM})"
    rf"|((?:{_ATEXT}[ \t]+)*{_ATEXT})?[ \t]*<({_DOT_ATOM})@({_DOT_ATOM})>)[ \t]*(,|\Z)"
)

# The address-list tokens that matter to where a mailbox ends: quoted strings, <angle addrs>,
# comment parentheses, backslash pairs, the separators; everything else in runs.
# Possessive (*+): a plain * keeps a backtracking point for each character of a quoted string.
_ADDRESS_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"?|<[^<>]*>?|\\.?|[(),;:<>]|[^"<>(),;:\\]+', re.S)
_COMMENT_OR_QUOTES = re.compile(r'\((?:[^()\\]|\\.)*+\)?|"')
_ANGLE = re.compile(r"<([^<>]*)>")
_BARE_ADDRESS = re.compile(r"[^\s<>(),;:\"]+@[^\s<>(),;:\"]+")


def unfold(value: str) -> str:
    """As the email policy does before parsing: line breaks dropped, the spaces kept."""
    return _LINE_BREAKS.sub("", value) if ("\n" in value or "\r" in value) else value


def decode_words(value: str, max_words: int) -> tuple[str, int]:
    """``value`` with its first ``max_words`` encoded-words decoded; and how many more were
    left as they are. White space between two encoded-words goes, as RFC 2047 6.2 says."""
    out: list[str] = []
    pending: list[bytes] = []  # the bytes of adjacent encoded-words in one charset
    pending_charset = ""
    pos = 0
    seen = 0
    last_end = -1  # where the previous encoded-word ended, if it was the last thing written

    def flush() -> None:
        if pending:
            out.append(_decode_bytes(b"".join(pending), pending_charset))
            pending.clear()

    for m in _ENCODED_WORD.finditer(value):
        if seen >= max_words:
            break
        data = _word_bytes(m.group(2), m.group(3))
        if data is None:  # not decodable: the text stays as it is
            continue
        seen += 1
        gap = value[pos : m.start()]
        charset = m.group(1).lower()
        if last_end == pos and not gap.strip(" \t"):
            gap = ""  # only white space between two encoded-words
        if gap or charset != pending_charset:
            flush()
            out.append(gap)
        pending.append(data)
        pending_charset = charset
        pos = last_end = m.end()
    flush()
    rest = value[pos:]
    out.append(rest)
    left = rest.count("=?") if seen >= max_words else 0
    return "".join(out), left


def _word_bytes(encoding: str, text: str) -> bytes | None:
    try:
        if encoding in "qQ":
            return binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
        data = text.encode("ascii", "replace")
        data += b"=" * (-len(data) % 4)
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            return binascii.a2b_base64(data[:-4] + data[-4:].rstrip(b"=")[:-1] + b"==")
    except (binascii.Error, ValueError):
        return None


def _decode_bytes(data: bytes, charset: str) -> str:
    codec = text_codec(charset)
    if codec is None:  # unknown or not a text charset: as undeclared 8-bit text
        codec = "utf-8" if _valid_utf8(data) else "cp1252"
    try:
        return data.decode(codec, "replace")
    except Exception:  # a codec that fails otherwise than by a decode error
        return data.decode("utf-8", "replace")


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_addresses(value: str, most: int) -> tuple[list[str], bool]:
    """The mailboxes of an address list as text, group names dropped (as the stdlib's
    ``addresses`` flattens groups): at most ``most``, and whether there were more."""
    items: list[str] = []
    current: list[str] = []
    depth = 0  # comment nesting

    def end_item() -> bool:
        text = "".join(current).strip()
        current.clear()
        if text:
            items.append(text)
        return len(items) > most

    for m in _ADDRESS_TOKEN.finditer(value):
        tok = m.group()
        if depth:
            if tok == "(":
                depth += 1
            elif tok == ")":
                depth -= 1
            current.append(tok)
            continue
        if tok == "(":
            depth = 1
            current.append(tok)
        elif tok in (",", ";"):
            if end_item():
                return items[:most], True
        elif tok == ":":
            current.clear()  # "group name:" starts a group; its members follow
        else:
            current.append(tok)
    if end_item():
        return items[:most], True
    return items, False


def simple_mailbox(item: str) -> Address | None:
    """The mailbox of ``item`` when it has one of the plain forms, else None."""
    m = _SIMPLE_MAILBOX.fullmatch(item)
    if m is None or m.group(6):
        return None
    local, domain, name, angle_local, angle_domain, _ = m.groups()
    if local is not None:
        return Address("", local, domain)
    return Address(" ".join(name.split()) if name else "", angle_local, angle_domain)


def cheap_mailbox(item: str, decode: Callable[[str], str]) -> Address | None:
    """A best reading of one mailbox without a parser: the last <addr-spec> (or the bare word
    with an "@"), and the rest, comments and quotes dropped and ``decode``d, as its name."""
    angle = None
    for m in _ANGLE.finditer(item):
        angle = m  # the last one
    if angle is not None:
        spec = angle.group(1).strip()
        name = item[: angle.start()]
    else:
        bare = _BARE_ADDRESS.search(_COMMENT_OR_QUOTES.sub(" ", item))
        if bare is None:
            return None
        spec, name = bare.group(), ""
    local, at, domain = spec.rpartition("@")
    if not at:
        local, domain = spec, ""
    name = " ".join(_COMMENT_OR_QUOTES.sub(" ", name).replace("\\", "").split())
    try:
        return Address(decode(name), local.strip(), domain.strip())
    except Exception:  # the Address constructor refuses CR, LF and the like
        return None
