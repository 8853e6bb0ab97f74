"""What a message may name about a part, made safe before anyone renders it: a content type is
``type/subtype`` of RFC 2045 tokens, a file name carries no control, bidi or invisible format
characters. Each change is a defect, so a receiver learns the name was not taken as it came."""

from __future__ import annotations

import re
import unicodedata

FALLBACK_TYPE = "application/octet-stream"  # RFC 2046 4.5.1: what an unknown part is
# RFC 2045 token: US-ASCII printable, no space, no tspecials ()<>@,;:\"/[]?=
_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+"
_CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")
REPLACEMENT = "\ufffd"  # where a character was that is not passed on
# Zero-width (non-)joiners are format characters too, but emoji sequences and Persian or Indic
# names need them; they neither reorder text nor break a line.
_KEEP_FORMAT = frozenset("\u200c\u200d")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def checked_content_type(value: str) -> str | None:
    """``value`` lower-cased if it is ``type/subtype`` of tokens, else None."""
    return value.lower() if _CONTENT_TYPE.fullmatch(value) else None


def safe_filename(name: str) -> str:
    """``name`` with each control (C0, DEL, C1), bidi or other invisible format character, line
    or paragraph separator and lone surrogate replaced by U+FFFD: such a name can neither
    break a header it is put in nor show one name while being another (U+202E)."""
    if name.isprintable() and name.isascii():  # the common case, at C speed
        return name
    return "".join(
        REPLACEMENT
        if unicodedata.category(c) in _UNSAFE_CATEGORIES and c not in _KEEP_FORMAT
        else c
        for c in name
    )
