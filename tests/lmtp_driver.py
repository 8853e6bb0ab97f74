"""Drive the sans-IO LMTP core with plain bytes, the way the server does, for tests."""

from __future__ import annotations

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
)

OK = Reply(250, "2.0.0", "delivered")


def default_rcpt_policy(rcpt: str) -> Reply | None:
    """Accept every recipient except those whose local part starts with 'bad'."""
    return Reply(550, "5.1.1", "no such user") if rcpt.startswith("bad") else None


@dataclass
class Outcome:
    wire: bytes = b""
    messages: list[bytes] = field(default_factory=list)  # completed and answered 2xx
    recipients: list[list[str]] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    closed: bool = False

    @property
    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.lines if line[3:4] != "-"]

    @property
    def lines(self) -> list[str]:
        return self.wire.decode("utf-8", "replace").split("\r\n")[:-1]


def drive(
    chunks: Iterable[bytes],
    *,
    limits: Limits | None = None,
    rcpt_policy: Callable[[str], Reply | None] = default_rcpt_policy,
    end_reply: Callable[[str], Reply] = lambda rcpt: OK,
    eof: bool = True,
    skip_greeting: bool = True,
) -> Outcome:
    conn = LmtpServerConnection("test.example", limits)
    out = Outcome()
    greeting = conn.data_to_send()
    if not skip_greeting:
        out.wire += greeting
    body: list[bytes] = []
    rcpts: list[str] = []
    pending = list(chunks)
    if eof:
        pending.append(b"")
    for chunk in pending:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert event is not PAUSED, "the driver always answers"
            out.events.append(event)
            if isinstance(event, MailFrom):
                rcpts = []
                conn.accept()
            elif isinstance(event, RcptTo):
                refusal = rcpt_policy(event.recipient)
                if refusal is None:
                    rcpts.append(event.recipient)
                    conn.accept()
                else:
                    conn.reject(refusal)
            elif isinstance(event, MessageStart):
                body = []
            elif isinstance(event, MessageData):
                body.append(event.data)
            elif isinstance(event, MessageEnd):
                if event.error is not None:
                    conn.fail_remaining(event.error)
                else:
                    out.messages.append(b"".join(body))
                    out.recipients.append(list(rcpts))
                    for rcpt in rcpts:
                        conn.send_recipient_reply(end_reply(rcpt))
                body = []
            elif isinstance(event, MessageAborted):
                body = []
            elif isinstance(event, (ConnectionClosed, Quit)):
                out.closed = True
            elif isinstance(event, ProtocolError):
                pass
            out.wire += conn.data_to_send()
        out.wire += conn.data_to_send()
    return out
