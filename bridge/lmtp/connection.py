"""LmtpServerConnection: the LMTP server side as a sans-IO state machine.

Bytes go in with ``receive_data``, events come out of ``next_event``, replies come out of
``data_to_send``; the caller owns the socket, the clock and every decision about delivery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.lmtp import errors
from bridge.lmtp.address import AddressError, parse_path
from bridge.lmtp.errors import LmtpError
from bridge.lmtp.events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Event,
    Lhlo,
    MailFrom,
    MessageAborted,
    MessageData,
    MessageEnd,
    MessageStart,
    ProtocolError,
    Quit,
    RcptTo,
    Reply,
    Sentinel,
    StartTls,
    Xforward,
)
from bridge.lmtp.state import IN_TRANSACTION, LEGAL, State

CRLF = b"\r\n"
DOT = 0x2E
CR = 0x0D
LF = 0x0A

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included
PARAMETER_ALLOWANCE = 4096  # extra room for MAIL/RCPT/XFORWARD parameters
_LONG_VERBS = (b"MAIL", b"RCPT", b"XFOR")

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "SOURCE", "PORT", "IDENT")
BODY_TYPES = ("7BIT", "8BITMIME", "BINARYMIME")
# refusals that are flow control, not client mistakes: they do not spend the error budget
_NOT_ERRORS = frozenset({"too_many_recipients"})
# re.ASCII: without it \d takes any script's digits and IGNORECASE folds U+017F into "s"
_BDAT_ARGS = re.compile(r"(\d{1,15})(?: +(LAST))?", re.IGNORECASE | re.ASCII)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=(\S*))?")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}", re.ASCII)  # RFC 1870: 1*20DIGIT
_ECHO_LIMIT = 64  # client text quoted back in a reply, so a reply line stays far below 512
_XFORWARD_UNKNOWN = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")


@dataclass(frozen=True, slots=True)
class Limits:
    """The protocol limits the core enforces itself (each one a setting of the bridge)."""

    max_message_size: int = 26_214_400  # 0: no limit
    max_recipients: int = 1000
    max_command_errors: int = 10


class LmtpServerConnection:
    """One LMTP session, server side. Not thread-safe; one per connection.

    The core answers everything it can decide alone (LHLO, RSET, NOOP, syntax and sequence
    errors, ...). It stops (``PAUSED``) after a ``MailFrom`` or ``RcptTo`` event until the
    caller ``accept()``s or ``reject()``s it, and after ``MessageEnd`` until the caller has
    sent one reply per accepted recipient with ``send_recipient_reply``. Replies therefore
    always leave in the order the commands came, however much input was pipelined.
    """

    def __init__(
        self, hostname: str, limits: Limits | None = None, *, starttls: bool = False
    ) -> None:
        self.hostname = hostname
        self.limits = limits or Limits()
        self.starttls = starttls  # offer STARTTLS (the caller has a certificate)
        self.tls_active = False
        self.state = State.CONNECTED
        self.lhlo: str | None = None
        self.xforward: dict[str, str] = {}
        self.recipients_accepted = 0
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._eof = False
        self._closed_reported = False
        self._quit = False  # QUIT was read: report Quit, not ConnectionClosed
        self._pending: MailFrom | RcptTo | None = None
        self._replies_owed = 0
        self._errors = 0
        self._sender: MailFrom | None = None
        self._rcpt_attempts = 0
        # message reading
        self._size = 0
        self._too_big = False
        self._at_line_start = True
        self._end_pending = False
        self._chunk_open = False  # inside the octets of a BDAT chunk
        self._bdat_left = 0
        self._bdat_last = False
        self._chunk_refusal: Reply | None = None  # set while discarding a refused chunk
        self._chunk_refused = False
        self._discarding_line = False
        self._send(Reply(220, "", f"{hostname} LMTP lmtp-bridge ready"))

    # ------------------------------------------------------------------ I/O side

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its sending side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """The replies queued so far, as bytes (empty if none); the queue is cleared."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def replies_owed(self) -> int:
        """Per-recipient replies still owed for the message that just ended."""
        return self._replies_owed

    @property
    def in_transaction(self) -> bool:
        return self.state in IN_TRANSACTION or self.state is State.REPLYING

    @property
    def reading_message(self) -> bool:
        """True while the next bytes are message content (DATA lines or BDAT octets), not a
        command line."""
        return self.state is State.DATA or self._chunk_open

    # ------------------------------------------------------------------ decisions

    def accept(self, reply: Reply | None = None) -> None:
        """Accept the pending ``MailFrom`` or ``RcptTo``."""
        pending = self._take_pending()
        if isinstance(pending, MailFrom):
            self._sender = pending
            self.state = State.MAIL
            self._send(reply or Reply(250, "2.1.0", "Sender OK"))
        else:
            self.recipients_accepted += 1
            self.state = State.RCPT
            self._send(reply or Reply(250, "2.1.5", "Recipient OK"))

    def reject(self, reply: Reply) -> None:
        """Refuse the pending ``MailFrom`` or ``RcptTo`` with a 4xx/5xx reply."""
        if reply.is_success:
            raise ValueError("reject() needs a 4xx or 5xx reply")
        self._take_pending()
        self._send(reply)

    def send_recipient_reply(self, reply: Reply) -> None:
        """One reply for the next accepted recipient, in RCPT order, after ``MessageEnd``."""
        if self._replies_owed <= 0:
            raise RuntimeError("no per-recipient reply is owed")
        self._send(reply)
        self._replies_owed -= 1
        if self._replies_owed == 0:
            self._reset_transaction()
            if self.state is State.REPLYING:
                self.state = State.READY

    def fail_remaining(self, reply: Reply) -> None:
        """Answer every recipient reply still owed with ``reply`` (message-wide failure)."""
        while self._replies_owed:
            self.send_recipient_reply(reply)

    def close(self, reply: Reply | None = None) -> None:
        """Close the session from our side, optionally with a last reply such as 421."""
        if reply is not None and self.state is not State.CLOSED:
            self._send(reply)
        self.state = State.CLOSED

    def _take_pending(self) -> MailFrom | RcptTo:
        if self._pending is None:
            raise RuntimeError("no MAIL or RCPT is waiting for a decision")
        pending, self._pending = self._pending, None
        return pending

    # ------------------------------------------------------------------ events

    def next_event(self) -> Event | Sentinel:
        """The next event, ``NEED_DATA`` (feed more bytes) or ``PAUSED`` (answer first)."""
        while True:
            result = self._step()
            # a loop, not recursion: a pipeline of many "BDAT 0" would exhaust the stack
            if not isinstance(result, _Again):
                return result

    def _step(self) -> Event | Sentinel | _Again:
        if self._pending is not None or self._replies_owed:
            return PAUSED
        if self.state is State.CLOSED:
            return self._closed()
        if self._end_pending:
            return self._finish_message()
        if self.state is State.DATA:
            return self._read_data()
        if self._chunk_open:
            return self._read_chunk()
        return self._read_command()

    def _closed(self) -> Event | Sentinel:
        if self._closed_reported:
            return NEED_DATA
        self._closed_reported = True
        return Quit() if self._quit else ConnectionClosed()

    def _on_eof(self) -> Event:
        """The peer closed its side and no complete command or data is left."""
        if self.state in IN_TRANSACTION:
            self._reset_transaction()
            self.state = State.CLOSED
            return MessageAborted()
        self.state = State.CLOSED
        self._closed_reported = True
        return ConnectionClosed()

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())

    # ------------------------------------------------------------------ commands

    def _read_command(self) -> Event | Sentinel | _Again:
        while True:
            buf = self._buf
            end = buf.find(CRLF)
            if self._discarding_line:
                if end < 0:
                    # keep a trailing CR: it may be the first half of the CRLF
                    keep = 1 if buf.endswith(b"\r") else 0
                    del buf[: len(buf) - keep]
                    return self._on_eof() if self._eof else NEED_DATA
                del buf[: end + 2]
                self._discarding_line = False
                return self._error(errors.LINE_TOO_LONG, "line_too_long")
            if end < 0:
                if len(buf) > COMMAND_LINE_LIMIT + PARAMETER_ALLOWANCE:
                    self._discarding_line = True
                    continue
                return self._on_eof() if self._eof else NEED_DATA
            line = bytes(buf[:end])
            del buf[: end + 2]
            limit = COMMAND_LINE_LIMIT - 2
            if line[:4].upper() in _LONG_VERBS:
                limit += PARAMETER_ALLOWANCE
            if len(line) > limit:
                return self._error(errors.LINE_TOO_LONG, "line_too_long")
            return self._command(line)

    def _command(self, raw: bytes) -> Event | Sentinel | _Again:
        text = raw.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        # only ASCII verbs: str.upper() maps some non-ASCII letters (U+0131) to ASCII ones
        verb = verb.upper() if verb.isascii() else verb
        if not verb:
            return self._error(errors.EMPTY_LINE, "syntax")
        handler = _HANDLERS.get(verb)
        if verb == "STARTTLS" and not self.starttls:
            handler = None
        if handler is None:
            if verb in ("HELO", "EHLO"):
                return self._error(errors.USE_LHLO, "unknown_command")
            if verb in _NOT_IMPLEMENTED:
                return self._error(errors.NOT_IMPLEMENTED, "unknown_command")
            return self._error(errors.UNKNOWN_COMMAND, "unknown_command")
        if self.state not in LEGAL[verb]:
            if verb == "BDAT":
                return self._bdat_refused(arg)
            return self._error(_sequence_reply(verb, self.state), "sequence")
        try:
            return handler(self, arg.strip(" "))
        except LmtpError as exc:
            return self._error(exc.reply, exc.kind, exc.recipient)

    def _error(self, reply: Reply, kind: str, recipient: str | None = None) -> Event:
        if kind in _NOT_ERRORS:
            self._send(reply)
            return ProtocolError(kind, reply, recipient)
        self._errors += 1
        if self._errors > self.limits.max_command_errors:
            self._send(reply)
            self.close(errors.TOO_MANY_ERRORS)
            return ProtocolError("too_many_errors", errors.TOO_MANY_ERRORS)
        self._send(reply)
        return ProtocolError(kind, reply)

    def _cmd_lhlo(self, arg: str) -> Event:
        if not arg or " " in arg:
            raise errors.syntax("Syntax: LHLO <hostname>")
        if not _is_clean(arg):
            # the name ends up in trace headers: no control bytes, no invalid UTF-8
            raise errors.syntax("Bad LHLO hostname")
        aborted = self.state in IN_TRANSACTION
        self._reset_transaction()
        self.lhlo = arg
        self.state = State.READY
        keywords = [
            self.hostname,
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            f"SIZE {self.limits.max_message_size}",
            "CHUNKING",
            "BINARYMIME",
            "SMTPUTF8",
            "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES),
        ]
        if self.starttls and not self.tls_active:
            keywords.append("STARTTLS")  # RFC 3207 4.2: not offered again once TLS is up
        self._send(Reply(250, "", tuple(keywords)))
        return MessageAborted() if aborted else Lhlo(arg)

    def _cmd_mail(self, arg: str) -> Event:
        path, params = _split_path(arg, "FROM:")
        sender = _parse_path(path, allow_empty=True)
        size: int | None = None
        body: str | None = None
        smtputf8 = False
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _SIZE_VALUE.fullmatch(value):
                    raise errors.syntax("SIZE needs a number")
                size = int(value)
                limit = self.limits.max_message_size
                if limit and size > limit:
                    raise LmtpError(errors.MESSAGE_TOO_BIG, "message_too_big")
            elif key == "BODY":
                if value is None or value.upper() not in BODY_TYPES:
                    raise errors.syntax("BODY must be 7BIT, 8BITMIME or BINARYMIME")
                body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    raise errors.syntax("SMTPUTF8 takes no value")
                smtputf8 = True
            else:
                raise errors.parameter(f"Unsupported MAIL parameter {_echo(key)}")
        self._pending = MailFrom(sender, size=size, body=body, smtputf8=smtputf8)
        return self._pending

    def _cmd_rcpt(self, arg: str) -> Event:
        path, params = _split_path(arg, "TO:")
        recipient = _parse_path(path, allow_empty=False)
        orcpt: str | None = None
        for key, value in params.items():
            if key == "ORCPT":
                if not value or ";" not in value:
                    raise errors.syntax("ORCPT needs addr-type;address")
                orcpt = value
            else:
                raise errors.parameter(f"Unsupported RCPT parameter {_echo(key)}")
        if self.recipients_accepted >= self.limits.max_recipients:
            raise LmtpError(errors.TOO_MANY_RECIPIENTS, "too_many_recipients", recipient)
        self._pending = RcptTo(recipient, orcpt=orcpt)
        return self._pending

    def _cmd_data(self, arg: str) -> Event:
        if arg:
            raise errors.syntax("DATA takes no argument")
        if self._sender is not None and self._sender.body == "BINARYMIME":
            raise errors.sequence("BINARYMIME needs BDAT, not DATA")
        self.state = State.DATA
        self._at_line_start = True
        self._send(Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>"))
        return MessageStart()

    def _cmd_bdat(self, arg: str) -> Event | Sentinel | _Again:
        size, last = _parse_bdat(arg)
        first = self.state is State.RCPT
        self.state = State.BDAT
        self._open_chunk(size, last)
        return MessageStart() if first else self._read_chunk()

    def _open_chunk(self, size: int, last: bool, refused: bool = False) -> None:
        self._chunk_open = True
        self._chunk_refused = refused
        self._bdat_left = size
        self._bdat_last = last

    def _bdat_refused(self, arg: str) -> Event | Sentinel | _Again:
        """BDAT where it is not legal: consume its octets first, then answer (RFC 3030)."""
        try:
            size, last = _parse_bdat(arg)
        except LmtpError as exc:
            return self._error(exc.reply, exc.kind, exc.recipient)
        if self.state is State.MAIL and last:
            # RFC 2033 4.3: BDAT LAST with no successful RCPT returns zero replies
            reply = None
        elif self.state is State.BDAT_FAILED:
            reply = Reply(503, "5.5.1", "Previous chunk failed, issue RSET first")
        elif self.state is State.MAIL:
            reply = Reply(503, "5.5.1", "No valid recipients")
        else:
            reply = _sequence_reply("BDAT", self.state)
        self._chunk_refusal = reply
        if self.state is State.MAIL and not last:
            self.state = State.BDAT_FAILED
        self._open_chunk(size, last, refused=True)
        return self._read_chunk()

    def _cmd_rset(self, arg: str) -> Event:
        if arg:
            raise errors.syntax("RSET takes no argument")
        aborted = self.state in IN_TRANSACTION
        self._reset_transaction()
        if self.state is not State.CONNECTED:
            self.state = State.READY
        self._send(Reply(250, "2.0.0", "Reset OK"))
        return MessageAborted() if aborted else _NOOP_EVENT

    def _cmd_noop(self, arg: str) -> Event:
        self._send(Reply(250, "2.0.0", "OK"))
        return _NOOP_EVENT

    def _cmd_quit(self, arg: str) -> Event:
        aborted = self.state in IN_TRANSACTION
        self._reset_transaction()
        self.close(Reply(221, "2.0.0", f"{self.hostname} closing connection"))
        self._quit = True
        if aborted:
            return MessageAborted()  # the next event is Quit
        self._closed_reported = True
        return Quit()

    def _cmd_vrfy(self, arg: str) -> Event:
        if not arg:
            raise errors.syntax("Syntax: VRFY <address>")
        self._send(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message for delivery"))
        return _NOOP_EVENT

    def _cmd_help(self, arg: str) -> Event:
        self._send(
            Reply(
                214,
                "2.0.0",
                (
                    "Commands: LHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP XFORWARD",
                    "See RFC 2033",
                ),
            )
        )
        return _NOOP_EVENT

    def _cmd_xforward(self, arg: str) -> Event:
        if not arg:
            raise errors.syntax("Syntax: XFORWARD attribute=value ...")
        attributes: dict[str, str | None] = {}
        for item in arg.split(" "):
            if not item:
                continue
            name, eq, value = item.partition("=")
            name = name.upper() if name.isascii() else name
            if not eq or name not in XFORWARD_ATTRIBUTES:
                raise errors.syntax(f"Bad XFORWARD attribute {_echo(name or item)}")
            decoded = _xtext_decode(value)
            if not _is_clean(decoded, allow_space=True):
                # values go into trace headers and the payload: no CR/LF smuggled in as +0D+0A
                raise errors.syntax(f"Bad XFORWARD value for {name}")
            attributes[name.lower()] = None if decoded.upper() in _XFORWARD_UNKNOWN else decoded
        for key, decoded_value in attributes.items():
            if decoded_value is None:
                self.xforward.pop(key, None)
            else:
                self.xforward[key] = decoded_value
        self._send(Reply(250, "2.0.0", "OK"))
        return Xforward(dict(self.xforward))

    def _cmd_starttls(self, arg: str) -> Event:
        if self.tls_active:
            raise LmtpError(errors.TLS_ALREADY_ACTIVE, "sequence")
        if arg:
            raise errors.syntax("STARTTLS takes no argument")
        # RFC 3207 4 and 4.2: anything pipelined after STARTTLS is plaintext an attacker may
        # have injected; drop it, and forget everything learnt before TLS (LHLO again)
        discarded = len(self._buf)
        self._buf.clear()
        self._reset_transaction()
        self.lhlo = None
        self.tls_active = True
        self.state = State.CONNECTED
        self._send(errors.READY_FOR_TLS)
        return StartTls(discarded)

    # ------------------------------------------------------------------ message content

    def _grow(self, data: bytes) -> bytes:
        """Count message bytes; past the size limit, drop them and remember the failure."""
        if self._too_big:
            return b""
        self._size += len(data)
        limit = self.limits.max_message_size
        if limit and self._size > limit:
            self._too_big = True
            # hand out exactly the first `limit` bytes, however the input was split
            return data[: len(data) - (self._size - limit)]
        return data

    def _read_data(self) -> Event | Sentinel:
        """Scan DATA content in bulk: only lines that start with a dot cost a Python step."""
        buf = self._buf
        n = len(buf)
        parts: list[bytes] = []
        start = 0  # start of the not-yet-emitted run
        i = 0
        at_line_start = self._at_line_start
        ended = False
        while True:
            if at_line_start:
                if i >= n:
                    break
                if buf[i] == DOT:
                    if i + 1 >= n or (buf[i + 1] == CR and i + 2 >= n):
                        break  # cannot tell ".\r\n" from a stuffed dot yet
                    if buf[i + 1] == CR and buf[i + 2] == LF:
                        parts.append(bytes(buf[start:i]))
                        i += 3
                        start = i
                        ended = True
                        break
                    parts.append(bytes(buf[start:i]))  # stuffed dot: drop it
                    start = i + 1
                at_line_start = False
            j = buf.find(b"\r\n.", i)
            if j < 0:
                # hold back a trailing CR or CRLF: it may begin the next "\r\n."
                hold = 2 if buf.endswith(b"\r\n") else 1 if buf.endswith(b"\r") else 0
                i = max(start, n - hold)
                break
            i = j + 2
            at_line_start = True
        if not ended:
            parts.append(bytes(buf[start:i]))
        del buf[:i]
        self._at_line_start = at_line_start if not ended else True
        data = self._grow(b"".join(parts))
        if ended:
            self._end_pending = True
            if data:
                return MessageData(data)
            return self._finish_message()
        if data:
            return MessageData(data)
        if self._eof:
            return self._on_eof()
        return NEED_DATA

    def _read_chunk(self) -> Event | Sentinel | _Again:
        """The octets of a BDAT chunk, exactly as sent (or discarded, for a refused one)."""
        buf = self._buf
        while self._bdat_left:
            if not buf:
                return self._on_eof() if self._eof else NEED_DATA
            take = min(self._bdat_left, len(buf))
            data = bytes(buf[:take])
            del buf[:take]
            self._bdat_left -= take
            if self._chunk_refused:
                continue
            data = self._grow(data)
            if data:
                return MessageData(data)
        self._chunk_open = False
        if self._chunk_refused:
            return self._answer_refused_chunk()
        return self._chunk_done()

    def _chunk_done(self) -> Event | _Again:
        if self._bdat_last:
            self._bdat_last = False
            return self._finish_message()
        if self._too_big:
            # a failed chunk: the state is indeterminate until RSET (RFC 3030)
            self._reset_transaction()
            self.state = State.BDAT_FAILED
            self._send(errors.MESSAGE_TOO_BIG)
            return MessageAborted()
        self._send(Reply(250, "2.0.0", f"{self._size} octets received"))
        return _AGAIN

    def _answer_refused_chunk(self) -> Event:
        reply, self._chunk_refusal = self._chunk_refusal, None
        self._chunk_refused = False
        self._bdat_last = False
        if reply is None:  # BDAT LAST without recipients: zero replies, transaction over
            self._reset_transaction()
            self.state = State.READY
            return MessageAborted()
        return self._error(reply, "sequence")

    def _finish_message(self) -> Event:
        self._end_pending = False
        error = errors.MESSAGE_TOO_BIG if self._too_big else None
        self.state = State.REPLYING
        self._replies_owed = self.recipients_accepted
        self._errors = 0
        return MessageEnd(error)

    def _reset_transaction(self) -> None:
        # XFORWARD attributes describe one transaction (Postfix resets them at DOT and RSET)
        self.xforward = {}
        self._sender = None
        self.recipients_accepted = 0
        self._size = 0
        self._too_big = False
        self._end_pending = False
        self._chunk_open = False
        self._chunk_refused = False
        self._chunk_refusal = None
        self._bdat_left = 0
        self._bdat_last = False


class _Nothing(Event):
    """A command the core answered that the caller need not act on."""


_NOOP_EVENT = _Nothing()


class _Again:
    """Internal: this step produced no event; ``next_event`` takes another step."""


_AGAIN = _Again()

_HANDLERS = {
    "LHLO": LmtpServerConnection._cmd_lhlo,
    "MAIL": LmtpServerConnection._cmd_mail,
    "RCPT": LmtpServerConnection._cmd_rcpt,
    "DATA": LmtpServerConnection._cmd_data,
    "BDAT": LmtpServerConnection._cmd_bdat,
    "RSET": LmtpServerConnection._cmd_rset,
    "NOOP": LmtpServerConnection._cmd_noop,
    "QUIT": LmtpServerConnection._cmd_quit,
    "VRFY": LmtpServerConnection._cmd_vrfy,
    "HELP": LmtpServerConnection._cmd_help,
    "XFORWARD": LmtpServerConnection._cmd_xforward,
    "STARTTLS": LmtpServerConnection._cmd_starttls,
}
_NOT_IMPLEMENTED = frozenset(
    {"EXPN", "TURN", "ETRN", "ATRN", "STARTTLS", "AUTH", "XCLIENT", "SEND", "SOML", "SAML"}
)


def _sequence_reply(verb: str, state: State) -> Reply:
    if state is State.CONNECTED:
        return Reply(503, "5.5.1", "Send LHLO first")
    if verb == "MAIL":
        return Reply(503, "5.5.1", "Nested MAIL command")
    if verb == "RCPT":
        return Reply(503, "5.5.1", "Need MAIL before RCPT")
    if verb in ("DATA", "BDAT") and state is State.MAIL:
        return Reply(503, "5.5.1", "No valid recipients")
    if verb in ("DATA", "BDAT"):
        return Reply(
            503,
            "5.5.1",
            "Need MAIL and RCPT first" if state is State.READY else "Bad sequence of commands",
        )
    return Reply(503, "5.5.1", "Bad sequence of commands")


def _split_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """``FROM:<path> PARAMS`` -> (path, {KEY: value}); one space after the colon is tolerated."""
    if arg[: len(keyword)].upper() != keyword:
        raise errors.syntax(f"Syntax: {keyword}<address> [parameters]", "5.5.2")
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise errors.syntax("Address must be in angle brackets", "5.1.3")
    close = _closing_bracket(rest)
    if close < 0:
        raise errors.syntax("Unterminated address", "5.1.3")
    path = rest[1:close]
    tail = rest[close + 1 :]
    if tail and not tail.startswith(" "):
        raise errors.syntax("Garbage after the address", "5.5.2")
    params: dict[str, str | None] = {}
    for item in tail.split():
        match = _PARAM.fullmatch(item)
        if match is None or not _is_clean(item):
            raise errors.syntax(f"Bad parameter {_echo(item)}")
        key = match.group(1).upper()
        if key in params:
            raise errors.syntax(f"Duplicate parameter {_echo(key)}")
        params[key] = match.group(2)
    return path, params


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` that closes the path, skipping quoted local parts (a backslash
    escapes only inside quotes, RFC 5321 quoted-pairSMTP)."""
    quoted = False
    escaped = False
    for i, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def _parse_path(path: str, *, allow_empty: bool) -> str:
    if not path and not allow_empty:
        raise errors.syntax("Empty recipient address", "5.1.3")
    try:
        return parse_path(path)
    except AddressError as exc:
        raise errors.syntax(str(exc), "5.1.3") from None


def _parse_bdat(arg: str) -> tuple[int, bool]:
    match = _BDAT_ARGS.fullmatch(arg.strip(" "))
    if match is None:
        raise errors.syntax("Syntax: BDAT <size> [LAST]")
    return int(match.group(1)), match.group(2) is not None


def _xtext_decode(value: str) -> str:
    """Undo xtext's +HH escapes (RFC 3461)."""
    if "+" not in value:
        return value
    out = []
    i = 0
    while i < len(value):
        if value[i] == "+" and _is_hex(value[i + 1 : i + 3]):
            out.append(chr(int(value[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _is_clean(text: str, *, allow_space: bool = False) -> bool:
    """No control characters, no undecodable bytes (surrogates); spaces only if allowed."""
    low = " " if allow_space else "!"
    return all(low <= c != "\x7f" and not "\udc80" <= c <= "\udcff" for c in text)


def _echo(text: str) -> str:
    """Client text made safe to quote in a reply: printable ASCII, cut short."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text[: _ECHO_LIMIT + 1])
    return clean if len(clean) <= _ECHO_LIMIT else clean[: _ECHO_LIMIT - 3] + "..."


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789ABCDEFabcdef" for c in text)
