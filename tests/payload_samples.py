"""Messages and envelopes the payload tests share: the benchmark's smtp-source shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from bridge.base.route import Route
from bridge.base.transaction import Envelope

ROUTE = Route(name="default", url="http://127.0.0.1:9/hook")
ENVELOPE = Envelope(
    mail_from="alice@example.org",
    lhlo="mx1.example.org",
    client_address="127.0.0.1",
    body="8BITMIME",
    smtputf8=False,
    size=None,
    received_at=datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC),
)
# The header block Postfix's ``smtp-source -L`` sends, without the blank line that ends it.
SMTP_SOURCE_HEAD = (
    b"From: <a@example.com>\r\nTo: <b@example.com>\r\n"
    b"Date: Sat, 28 Nov 2026 14:42:08 +0000 (UTC)\r\nMessage-Id: <4193.0003.0000@vm>\r\n"
)


def smtp_source_lines(size: int) -> bytes:
    """The body ``smtp-source -L -l size`` sends: "1XXX...", "2XXX...", 80 bytes a line."""
    out = []
    left, i = size, 1
    while left > 80:
        out.append(b"%d" % (i % 10) + b"X" * 77 + b"\r\n")
        left, i = left - 80, i + 1
    out.append(b"X" * left + b"\r\n")
    return b"".join(out)


def smtp_source(size: int) -> bytes:
    """What Postfix's ``smtp-source -L -l size`` sends (the benchmark's messages)."""
    return SMTP_SOURCE_HEAD + b"\r\n" + smtp_source_lines(size)
