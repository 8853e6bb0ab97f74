"""Events the protocol core hands to the server, and the Reply it sends back.

Every event is a small frozen dataclass; the server answers MAIL and RCPT with
``accept``/``reject`` and the end of a message with one reply per recipient.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Final

MAX_LINE = 512  # octets of one reply line, CRLF included
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One LMTP reply: a 3-digit code, an enhanced status code and text lines."""

    code: int
    status: str  # enhanced status code "x.y.z"; "" for the greeting and LHLO
    text: str | tuple[str, ...] = ""

    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def to_bytes(self) -> bytes:
        return _wire(self)  # most replies are the same few constants: encoded once

    def _encode(self) -> bytes:
        """The reply on the wire: CR, LF and other controls in the text become spaces, and
        every line is cut to 512 octets (RFC 5321 4.5.3.1.5), so text from a peer can never
        forge a reply line."""
        lines = self.lines() or ("",)
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            head = f"{self.code}{sep}{self.status} " if self.status else f"{self.code}{sep}"
            text = _CONTROL.sub(" ", f"{head}{line}").rstrip(" ")
            encoded = text.encode("utf-8", "replace")
            if len(encoded) > MAX_LINE - 2:
                encoded = encoded[: MAX_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
            out.append(encoded + b"\r\n")
        return b"".join(out)

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "replace").rstrip("\r\n")


@functools.lru_cache(maxsize=512)
def _wire(reply: Reply) -> bytes:
    return reply._encode()


class _NeedData:
    """Sentinel: the core needs more bytes before it can produce an event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class _Paused:
    """Sentinel: the core waits for the server's answer to the previous event."""

    def __repr__(self) -> str:
        return "PAUSED"


NEED_DATA: Final = _NeedData()
PAUSED: Final = _Paused()
Sentinel = _NeedData | _Paused


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of all protocol events."""


@dataclass(frozen=True, slots=True)
class Lhlo(Event):
    domain: str


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """``MAIL FROM``, already checked for syntax and SIZE; the server accepts or rejects it."""

    sender: str  # "" for the null sender
    size: int | None = None
    body: str | None = None  # "7BIT", "8BITMIME" or "BINARYMIME"
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """``RCPT TO``, already checked for syntax and limits; the server accepts or rejects it."""

    recipient: str
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class Xforward(Event):
    """Postfix ``XFORWARD`` attributes (already answered with 250)."""

    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MessageStart(Event):
    """DATA was accepted (354 sent) or the first BDAT chunk began."""


@dataclass(frozen=True, slots=True)
class MessageData(Event):
    """A piece of the message, dot-unstuffed, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd(Event):
    """The message is complete; the server owes one reply per accepted recipient.

    ``error`` is set when the core already knows the whole message fails (for example
    it grew past the size limit); the server then answers that reply for every recipient.
    """

    error: Reply | None = None


@dataclass(frozen=True, slots=True)
class MessageAborted(Event):
    """The transaction was dropped before its end (RSET, LHLO, a failed BDAT, lost link)."""


@dataclass(frozen=True, slots=True)
class ProtocolError(Event):
    """A command was refused by the core itself; ``kind`` is a metric label.

    ``recipient`` is set for an RCPT refused as flow control (too many recipients): the
    address is still a recipient whose outcome (deferred) the caller may count.
    """

    kind: str
    reply: Reply
    recipient: str | None = None


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS was accepted (220 queued): flush it, then run the TLS handshake before feeding
    more bytes. ``discarded`` plaintext octets pipelined after the command were thrown away
    (RFC 3207 4: STARTTLS ends a pipelined group); the session starts over, LHLO first."""

    discarded: int = 0


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """The client said QUIT; 221 is queued and the connection should close after flushing."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side, or the core decided to close (421 queued)."""
