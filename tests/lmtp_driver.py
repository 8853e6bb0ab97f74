"""Drive the sans-IO LMTP core with plain bytes, the way the server does, for tests.

Every reply the core produces through this driver is checked for form and enhanced status codes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bridge.lmtp.connection import Limits, LmtpServerConnection
from bridge.lmtp.events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    MailFrom,
    MessageAborted,
    MessageData,
    MessageEnd,
    MessageStart,
    ProtocolError,
    Quit,
    RcptTo,
    Reply,
    StartTls,
)

HOSTNAME = "test.example"
OK = Reply(250, "2.0.0", "delivered")

_REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)", re.DOTALL)
_ENHANCED = re.compile(rb"([245])\.\d{1,3}\.\d{1,3}(?: |$)")


def default_rcpt_policy(rcpt: str) -> Reply | None:
    """Accept every recipient except those whose local part starts with 'bad'."""
    return Reply(550, "5.1.1", "no such user") if rcpt.startswith("bad") else None


class ReplyChecker:
    """Checks a session's reply stream: line form, length, and RFC 2034 codes (L15/X09).

    Every 2xx/4xx/5xx reply line carries an enhanced status code of the same class, except
    the greeting (the first reply) and the LHLO answer (a 250 whose first line is our name).
    """

    def __init__(self) -> None:
        self._pending = b""
        self._reply: list[tuple[bytes, bytes]] = []  # (code, text) of the reply being read
        self.replies = 0

    def feed(self, wire: bytes) -> None:
        data = self._pending + wire
        *lines, self._pending = data.split(b"\r\n")
        for line in lines:
            assert len(line) + 2 <= 512, f"reply line over 512 octets: {line[:80]!r}..."
            match = _REPLY_LINE.fullmatch(line)
            assert match is not None, f"malformed reply line {line!r}"
            code, sep, text = match.groups()
            assert b"\r" not in text and b"\n" not in text, f"bare CR/LF in reply {line!r}"
            if self._reply:
                assert code == self._reply[0][0], f"code changed inside a reply: {line!r}"
            self._reply.append((code, text))
            if sep == b" ":
                self._check(self._reply)
                self._reply = []
                self.replies += 1

    def _check(self, reply: list[tuple[bytes, bytes]]) -> None:
        code = reply[0][0]
        if self.replies == 0 and code == b"220":
            return  # the greeting
        if code == b"250" and reply[0][1] == HOSTNAME.encode():
            return  # the LHLO answer
        if code[:1] not in b"245":
            return  # 354 has no enhanced code
        for _, text in reply:
            match = _ENHANCED.match(text)
            assert match is not None, f"no enhanced status code in {code!r} {text!r}"
            assert match.group(1) == code[:1], f"class mismatch in {code!r} {text!r}"

    def assert_complete(self) -> None:
        assert self._pending == b"" and not self._reply, "a reply was cut in the middle"


@dataclass
class Outcome:
    wire: bytes = b""
    messages: list[bytes] = field(default_factory=list)  # completed and answered 2xx
    recipients: list[list[str]] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    closed: bool = False
    per_chunk: list[bytes] = field(default_factory=list)  # the replies after each input chunk
    failed: list[Reply] = field(default_factory=list)  # message-wide errors at MessageEnd
    message_kinds: list[str] = field(default_factory=list)  # "DATA" or "BDAT", per message

    @property
    def codes(self) -> list[int]:
        return reply_codes(self.wire)

    @property
    def lines(self) -> list[str]:
        return self.wire.decode("utf-8", "replace").split("\r\n")[:-1]


def reply_codes(wire: bytes) -> list[int]:
    """The code of each reply in ``wire`` (a multi-line reply counts once)."""
    lines = wire.split(b"\r\n")[:-1]
    return [int(line[:3]) for line in lines if line[3:4] != b"-"]


class Session:
    """One core connection plus the server's side of it, checked as it goes.

    It accepts every MAIL, asks ``rcpt_policy`` about each RCPT and answers each accepted
    recipient with ``end_reply`` at the end of a message (``fail_remaining`` for a
    message-wide error). Structural invariants are asserted on every event.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        rcpt_policy: Callable[[str], Reply | None] = default_rcpt_policy,
        end_reply: Callable[[str], Reply] = lambda rcpt: OK,
        starttls: bool = False,
    ) -> None:
        self.conn = LmtpServerConnection(HOSTNAME, limits, starttls=starttls)
        self.rcpt_policy = rcpt_policy
        self.end_reply = end_reply
        self.checker = ReplyChecker()
        self.out = Outcome()
        self._rcpts: list[str] = []
        self._body: list[bytes] | None = None  # set between MessageStart and its end
        self._kind = ""
        self.greeting = self._take()

    def send(self, data: bytes, *, eof: bool = False) -> bytes:
        """Feed ``data`` (and EOF if asked), run the events, return the replies produced."""
        if data:
            self.conn.receive_data(data)
        if eof:
            self.conn.receive_data(b"")
        wire = self.pump()
        self.out.per_chunk.append(wire)
        return wire

    def pump(self) -> bytes:
        wire = b""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            assert event is not PAUSED, "the driver always answers"
            self.out.events.append(event)
            wire += self._handle(event)
        wire += self._take()
        self.out.wire += wire
        return wire

    def _take(self) -> bytes:
        data = self.conn.data_to_send()
        self.checker.feed(data)
        return data

    def _handle(self, event: object) -> bytes:
        conn = self.conn
        if isinstance(event, MailFrom):
            self._rcpts = []
            conn.accept()
        elif isinstance(event, RcptTo):
            refusal = self.rcpt_policy(event.recipient)
            if refusal is None:
                self._rcpts.append(event.recipient)
                conn.accept()
            else:
                conn.reject(refusal)
        elif isinstance(event, MessageStart):
            assert self._body is None, "MessageStart inside a message"
            assert self._rcpts, "a message started with no accepted recipient"
            assert conn.state.name in ("DATA", "BDAT")
            self._kind = conn.state.name
            self._body = []
        elif isinstance(event, MessageData):
            assert self._body is not None, "message data outside a message"
            assert event.data, "empty MessageData"
            self._body.append(event.data)
        elif isinstance(event, MessageEnd):
            return self._end(event)
        elif isinstance(event, MessageAborted):
            self._body = None
            self._rcpts = []
        elif isinstance(event, StartTls):
            assert conn.state.name == "CONNECTED" and conn.tls_active
            assert self._body is None
            self._rcpts = []
        elif isinstance(event, (ConnectionClosed, Quit)):
            assert not self.out.closed, "closed twice"
            self.out.closed = True
        elif isinstance(event, ProtocolError):
            assert event.reply.code >= 400
        return self._take()

    def _end(self, event: MessageEnd) -> bytes:
        """Answer one reply per accepted recipient and check exactly that many went out."""
        conn = self.conn
        assert self._body is not None, "MessageEnd without MessageStart"
        assert conn.replies_owed == len(self._rcpts) > 0, "replies owed != recipients accepted"
        before = self._take()
        if event.error is not None:
            self.out.failed.append(event.error)
            conn.fail_remaining(event.error)
        else:
            self.out.messages.append(b"".join(self._body))
            self.out.message_kinds.append(self._kind)
            self.out.recipients.append(list(self._rcpts))
            for rcpt in self._rcpts:
                conn.send_recipient_reply(self.end_reply(rcpt))
        assert conn.replies_owed == 0
        answers = self._take()
        assert len(reply_codes(answers)) == len(self._rcpts), "wrong number of end replies"
        expected = (
            [event.error] * len(self._rcpts) if event.error else map(self.end_reply, self._rcpts)
        )
        assert answers == b"".join(r.to_bytes() for r in expected), "end replies out of order"
        assert not conn.in_transaction
        self._body = None
        self._rcpts = []
        return before + answers


def drive(
    chunks: Iterable[bytes],
    *,
    limits: Limits | None = None,
    rcpt_policy: Callable[[str], Reply | None] = default_rcpt_policy,
    end_reply: Callable[[str], Reply] = lambda rcpt: OK,
    eof: bool = True,
    skip_greeting: bool = True,
) -> Outcome:
    """Feed ``chunks`` one at a time (then EOF), running the events after each one."""
    session = Session(limits, rcpt_policy=rcpt_policy, end_reply=end_reply)
    if not skip_greeting:
        session.out.wire += session.greeting
    for chunk in chunks:
        if chunk:
            session.send(chunk)
    if eof:
        session.send(b"", eof=True)
    return session.out
