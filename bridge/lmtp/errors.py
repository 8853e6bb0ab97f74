"""Protocol errors that carry the reply to send back, and the replies the core uses."""

from __future__ import annotations

from bridge.lmtp.events import Reply


class LmtpError(Exception):
    """A command the core refuses; ``reply`` is what the client gets, ``kind`` a metric label."""

    def __init__(self, reply: Reply, kind: str, recipient: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.kind = kind
        self.recipient = recipient  # the address of a refused RCPT, once it was read


def syntax(text: str, status: str = "5.5.4") -> LmtpError:
    return LmtpError(Reply(501, status, text), "syntax")


def sequence(text: str) -> LmtpError:
    return LmtpError(Reply(503, "5.5.1", text), "sequence")


def parameter(text: str) -> LmtpError:
    return LmtpError(Reply(555, "5.5.4", text), "parameter")


UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
USE_LHLO = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
EMPTY_LINE = Reply(500, "5.5.2", "Syntax error: empty command line")
LINE_TOO_LONG = Reply(500, "5.5.6", "Command line too long")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds the fixed maximum message size")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS is already active")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
