"""A small blocking LMTP client for `lmtp-bridge send`: one reply per accepted recipient.

Unlike smtplib.LMTP.sendmail, it reads every per-recipient reply after the final dot.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from bridge.base.listen import ListenAddress, parse_listen


class LmtpClientError(Exception):
    pass


@dataclass
class SendResult:
    # (recipient, final reply) in RCPT order: the RCPT refusal or the reply after the dot
    replies: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 all delivered, 75 (EX_TEMPFAIL) some deferred and none refused, 1 otherwise."""
        codes = [reply[:1] for _, reply in self.replies]
        if all(c == "2" for c in codes):
            return 0
        return 75 if "5" not in codes else 1


def connect(server: str | ListenAddress, timeout: float) -> socket.socket:
    address = parse_listen(server) if isinstance(server, str) else server
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address.path or "")
        return sock
    return socket.create_connection((address.host or "127.0.0.1", address.port or 0), timeout)


class _Replies:
    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def read(self) -> str:
        """One (possibly multi-line) reply, as its lines joined by newlines."""
        lines = []
        while True:
            raw = self._file.readline(4096)
            if not raw:
                raise LmtpClientError("connection closed by the server")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return "\n".join(lines)


def dot_stuff(message: bytes) -> bytes:
    """Normalise line ends to CRLF, double leading dots and add the end-of-data line."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return stuffed + b".\r\n"


def _bare(address: str) -> str:
    """``<a@b>`` -> ``a@b``, so ``--from '<>'`` is the null sender (as in swaks), not ``<<>>``."""
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def send(
    server: str | ListenAddress,
    sender: str,
    recipients: list[str],
    message: bytes,
    *,
    lhlo: str = "localhost",
    timeout: float = 600.0,
) -> SendResult:
    """Deliver ``message`` to ``recipients`` over LMTP; the reply of every recipient."""
    result = SendResult()
    try:
        sock = connect(server, timeout)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise LmtpClientError(f"cannot connect: {reason}") from exc
    with sock:
        replies = _Replies(sock)

        def command(line: str, expect: str = "2") -> str:
            sock.sendall(line.encode("utf-8") + b"\r\n")
            reply = replies.read()
            if not reply.startswith(expect):
                raise LmtpClientError(f"{line.split()[0]} refused: {reply}")
            return reply

        greeting = replies.read()
        if not greeting.startswith("220"):
            raise LmtpClientError(f"unexpected greeting: {greeting}")
        command(f"LHLO {lhlo}")
        command(f"MAIL FROM:<{_bare(sender)}>")
        outcomes: list[str | None] = []
        for rcpt in recipients:
            sock.sendall(f"RCPT TO:<{_bare(rcpt)}>\r\n".encode())
            reply = replies.read()
            outcomes.append(None if reply.startswith("2") else reply)
        if None in outcomes:
            command("DATA", expect="354")
            sock.sendall(dot_stuff(message))
            outcomes = [reply or replies.read() for reply in outcomes]
        else:
            command("RSET")
        command("QUIT")
    result.replies = [(rcpt, reply or "") for rcpt, reply in zip(recipients, outcomes, strict=True)]
    return result
