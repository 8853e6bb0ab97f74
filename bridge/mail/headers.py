"""The message's headers decoded, and read into the payload's fields (addresses, date, ids).

Plain headers take a fast path that tests/test_payload_fastpath.py holds equal to the stdlib.
"""

from __future__ import annotations

import email.utils
import functools
import re
from datetime import UTC, datetime
from email.headerregistry import (
    Address,
    AddressHeader,
    DateHeader,
    MessageIDHeader,
    UnstructuredHeader,
)
from email.message import Message
from typing import Any

from bridge.mail.emailpolicy import _HEADER_CLASSES, _POLICY
from bridge.mail.limits import ParseState, current
from bridge.mail.linear import _DOT_ATOM, _SIMPLE_MAILBOX

_MSGID = re.compile(r"<[^<>]*>")


def _parsed_headers(msg: Message, state: ParseState | None = None) -> list[tuple[str, Any]]:
    """The headers in order, decoded, as many as the limits let in; a header the library
    cannot parse stays a plain str."""
    state = state or current()
    limits = state.limits
    out: list[tuple[str, Any]] = []
    items = list(msg.raw_items())
    size = 0
    for i, (name, raw) in enumerate(items):
        if i >= limits.max_header_count:
            more = len(items) - i
            state.hit("message", "max_header_count", f"{more} more header fields not read")
            break
        size += len(name) + len(raw) + 4  # "Name: value\r\n", about
        if size > limits.max_header_block_bytes:
            more = len(items) - i
            state.hit("message", "max_header_block_bytes", f"{more} header fields not read")
            break
        if i % 16 == 15 and state.out_of_time("message"):
            break
        value: Any = None
        if _FAST_HEADERS and type(raw) is str and len(raw) <= limits.max_header_bytes:
            value = _fast_header(name, raw, limits.max_addresses_per_header)
        if value is None:
            try:
                value = _POLICY.header_fetch_parse(name, raw)
                str(value)
            except Exception:
                value = " ".join(str(raw).split())
        out.append((name, value))
    return out


# --- header fast paths -----------------------------------------------------------------
# The stdlib's structured header parser costs tens of microseconds a header. For the plain
# forms below its result (str, defects, addresses, datetime: what the payload reads) is
# known without it; anything else takes the stdlib path. tests/test_payload_fastpath.py
# holds the two paths equal.

_FAST_HEADERS = True  # off: every header through the stdlib (the differential tests)

_SIMPLE_MSGID = re.compile(rf"[ \t]*<{_DOT_ATOM}@{_DOT_ATOM}>[ \t]*")


class _FastAddressHeader:
    """A simple address header as the stdlib's ``AddressHeader`` would read it."""

    __slots__ = ("_text", "addresses")
    defects: tuple[Exception, ...] = ()

    def __init__(self, addresses: tuple[Address, ...]) -> None:
        self.addresses = addresses
        self._text = ", ".join([str(a) for a in addresses])

    def __str__(self) -> str:
        return self._text


class _FastDateHeader:
    """A date header as the stdlib's ``DateHeader`` would read it."""

    __slots__ = ("_text", "datetime")
    defects: tuple[Exception, ...] = ()

    def __init__(self, dt: datetime) -> None:
        self.datetime = dt
        self._text = email.utils.format_datetime(dt)

    def __str__(self) -> str:
        return self._text


@functools.lru_cache(maxsize=1024)  # header names are the sender's choice: bounded
def _header_kind(name: str) -> str | None:
    cls = _HEADER_CLASSES[name]
    if issubclass(cls, UnstructuredHeader):
        return "text"
    if issubclass(cls, AddressHeader):
        return "address"
    if issubclass(cls, DateHeader):
        return "date"
    if issubclass(cls, MessageIDHeader):
        return "msgid"
    return None  # the MIME headers: parameters, RFC 2231, ...


def _fast_header(name: str, raw: str, most_addresses: int = 1 << 30) -> Any:
    """What ``_POLICY.header_fetch_parse(name, raw)`` gives, or None when not certain (or
    when an address list has more than ``most_addresses``: the long way cuts it)."""
    kind = _header_kind(name)
    if kind is None:
        return None
    value = raw.replace("\r", "").replace("\n", "")  # as EmailPolicy.header_fetch_parse
    if kind == "date":
        if not value:  # a defect: the stdlib reports it
            return None
        try:
            # The very calls DateHeader makes; only its unused parse tree is skipped.
            return _FastDateHeader(email.utils.parsedate_to_datetime(value))
        except Exception:
            return None
    if "=?" in value:  # encoded words
        return None
    if kind == "text":
        # Without encoded words the unstructured parse gives the text back as it is and
        # never a defect; lone surrogates would be replaced, so those go the long way.
        if not value.isascii() and _has_surrogates(value):
            return None
        return value
    if kind == "msgid":
        # A plain str: a message-id header offers nothing more than its text and defects.
        return value if _SIMPLE_MSGID.fullmatch(value) else None
    return _simple_address_header(value, most_addresses)


def _simple_address_header(value: str, most: int) -> _FastAddressHeader | None:
    addresses: list[Address] = []
    pos = 0
    while True:
        m = _SIMPLE_MAILBOX.match(value, pos)
        if m is None or len(addresses) >= most:
            return None
        local, domain, name, angle_local, angle_domain, sep = m.groups()
        if local is None:
            # The stdlib joins the words of a display name with single spaces.
            display = " ".join(name.split()) if name else ""
            addresses.append(Address(display, angle_local, angle_domain))
        else:
            addresses.append(Address("", local, domain))
        if not sep:
            return _FastAddressHeader(tuple(addresses))
        pos = m.end()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_text(found: list[Any], strip: bool = True) -> str | None:
    if not found:
        return None
    text = str(found[0])
    return text.strip() if strip else text


def _date(found: list[Any]) -> str | None:
    dt = getattr(found[0], "datetime", None) if found else None
    if not isinstance(dt, datetime):
        return None
    if dt.tzinfo is None:  # "-0000": UTC with the sender's zone unknown (RFC 5322 3.3)
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()


def _addresses(found: list[Any]) -> list[dict[str, str]]:
    out = []
    for header in found:
        for addr in getattr(header, "addresses", ()):
            out.append({"name": addr.display_name or "", "address": addr.addr_spec})
    return out


def _msgids(found: list[Any]) -> list[str]:
    out: list[str] = []
    for header in found:
        text = str(header)
        out.extend(_MSGID.findall(text) or text.split())
    return out
