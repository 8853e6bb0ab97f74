"""Hypothesis properties of the sans-IO LMTP core: dot-stuffing, chunking, pipelining, states.

CI run (default profile, well under a minute):
    .venv/bin/python -m pytest tests/test_lmtp_properties.py
Longer developer run (about 25 times the examples):
    HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest tests/test_lmtp_properties.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from lmtp_driver import Outcome, Session, drive

from bridge.lmtp.connection import Limits
from bridge.lmtp.events import MessageAborted, MessageData, Reply, StartTls

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = {"ci": 1, "dev": 25}[PROFILE]


def budget(examples: int, **kwargs: object) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kwargs,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- strategies

# pieces that stress the line logic: lone CR and LF, dots, NULs, CRLF-dot combinations
TRICKY = [b".", b"..", b"\r", b"\n", b"\r\n", b"\x00", b"a", b"\xff", b" ", b"\r\n.", b".\r\n"]
TRICKY += [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\r\r\n", b"Subject: x"]

message_bytes = st.one_of(
    st.just(b""),
    st.lists(st.one_of(st.sampled_from(TRICKY), st.binary(max_size=6)), max_size=30).map(
        lambda parts: b"".join(parts) + b"\r\n"
    ),
)


def dot_stuff(message: bytes) -> bytes:
    """The client side of RFC 5321 4.5.2: double a leading dot on every CRLF line, add '.'."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def no_crlf(data: bytes) -> bytes:
    while b"\r\n" in data:
        data = data.replace(b"\r\n", b"\r")
    return data


# A body line never looks like a command: if a refused DATA makes the core read it as one,
# it gets 500 and can never start a message of its own.
SAFE_START = [b"#", b".", b" ", b"\x00", b"\n", b"\r", b".."]
body_line = st.one_of(
    st.just(b""),
    st.builds(
        lambda head, tail: no_crlf(head + tail),
        st.sampled_from(SAFE_START),
        st.one_of(st.sampled_from(TRICKY), st.binary(max_size=10)),
    ),
)
body = st.lists(body_line, max_size=6).map(lambda lines: b"".join(x + b"\r\n" for x in lines))
chunk_payload = st.lists(body_line, max_size=4).map(lambda lines: b"\r\n".join(lines))

MAILS = [
    "MAIL FROM:<s@example.org>",
    "MAIL FROM:<>",
    "mail from:<s@example.org> size=20",
    "MAIL FROM:<s@example.org> SIZE=999999999",
    "MAIL FROM:<s@example.org> BODY=8BITMIME SMTPUTF8",
    "MAIL FROM:<s@example.org> BODY=BINARYMIME",
    "MAIL FROM:<s@example.org> FOO=1",
    "MAIL FROM:<s@example.org> SIZE=abc",
    "MAIL FROM:s@example.org",
]
RCPTS = [
    "RCPT TO:<a@x>",
    "RCPT TO:<b@x>",
    "RCPT TO:<c@x>",
    "RCPT TO:<bad@x>",
    "rcpt to: <a@x> ORCPT=rfc822;a@x",
    "RCPT TO:<a@x> NOTIFY=NEVER",
    "RCPT TO:",
]
OTHERS = [
    "LHLO client.example",
    "LHLO",
    "RSET",
    "NOOP",
    "NOOP hello",
    "VRFY a@x",
    "HELP",
    "EHLO x",
    "FOO",
    "",
    "DATA now",
    "XFORWARD ADDR=192.0.2.1 NAME=[UNAVAILABLE]",
    "XFORWARD FOO=1",
    "BDAT x",
    "NOOP " + "x" * 600,
    "NOOP " + "y" * 5000,
]


def line(text: str) -> bytes:
    return text.encode() + b"\r\n"


def bdat(payload: bytes, last: bool) -> bytes:
    return line(f"BDAT {len(payload)}{' LAST' if last else ''}") + payload


def bdat_message(chunks: list[bytes]) -> list[bytes]:
    return [bdat(c, i == len(chunks) - 1) for i, c in enumerate(chunks)]


data_step = body.map(lambda b: line("DATA") + dot_stuff(b))
noise = st.one_of(
    st.sampled_from(MAILS).map(line),
    st.sampled_from(RCPTS).map(line),
    st.sampled_from(OTHERS).map(line),
    data_step,
    st.builds(bdat, chunk_payload, st.booleans()),
)
# mostly well-formed transactions, so that messages do get delivered, with noise between them
transaction = st.builds(
    lambda mail, rcpts, content: [line(mail), *map(line, rcpts), *content],
    st.sampled_from(MAILS[:5]),
    st.lists(st.sampled_from(RCPTS[:5]), min_size=1, max_size=3),
    st.one_of(
        data_step.map(lambda d: [d]),
        st.lists(chunk_payload, min_size=1, max_size=3).map(bdat_message),
    ),
)
session_steps = st.lists(st.one_of(transaction, noise.map(lambda n: [n])), max_size=8).map(
    lambda groups: [line("LHLO c.example"), *(s for g in groups for s in g)]
)

LIMITS = st.builds(
    Limits,
    max_message_size=st.sampled_from([0, 10, 60, 200]),
    max_recipients=st.sampled_from([1, 2, 5]),
    max_command_errors=st.sampled_from([3, 10, 1000]),
)


def end_reply(rcpt: str) -> Reply:
    """Vary the per-recipient outcome so reply order is visible."""
    return {
        "b@x": Reply(451, "4.3.0", "webhook said 503"),
        "c@x": Reply(550, "5.1.1", "webhook said 404"),
    }.get(rcpt, Reply(250, "2.0.0", f"delivered to {rcpt}"))


def merged(events: list[object]) -> list[object]:
    """Events with consecutive MessageData joined: chunking may split data differently."""
    out: list[object] = []
    for item in events:
        if isinstance(item, MessageData) and out and isinstance(out[-1], MessageData):
            out[-1] = MessageData(out[-1].data + item.data)
        else:
            out.append(item)
    return out


def run(chunks: list[bytes], limits: Limits) -> Outcome:
    return drive(chunks, limits=limits, end_reply=end_reply)


# ---------------------------------------------------------------------------- properties


@budget(500)
@given(message=message_bytes, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_dot_stuffing_round_trip(message: bytes, cuts: list[int]) -> None:
    """Whatever the client stuffed, the core hands back exactly the original bytes."""
    head = line("LHLO c.example") + line("MAIL FROM:<s@x>") + line("RCPT TO:<a@x>") + line("DATA")
    out = drive([head, *split_at(dot_stuff(message) + line("NOOP"), cuts)])
    assert out.messages == [message]
    assert out.codes == [250, 250, 250, 354, 250, 250]


@budget(400)
@given(steps=session_steps, limits=LIMITS, data=st.data())
def test_chunking_invariance(steps: list[bytes], limits: Limits, data: st.DataObject) -> None:
    """Any split of the input gives the same events and the same reply bytes."""
    whole = b"".join(steps)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(whole)), max_size=30))
    once = run([whole], limits)
    split = run(split_at(whole, cuts), limits)
    assert split.wire == once.wire
    assert merged(split.events) == merged(once.events)
    assert split.messages == once.messages
    event(f"messages delivered: {min(len(once.messages), 2)}")


@budget(400)
@given(steps=session_steps, limits=LIMITS)
def test_lockstep_and_pipelined_give_the_same_replies(steps: list[bytes], limits: Limits) -> None:
    """One command at a time, reading replies in between, or all in one write: same replies."""
    lockstep = run(steps, limits)
    pipelined = run([b"".join(steps)], limits)
    assert b"".join(lockstep.per_chunk) == pipelined.wire
    assert lockstep.messages == pipelined.messages
    event(f"messages delivered: {min(len(pipelined.messages), 2)}")


# ---------------------------------------------------------------------------- state machine


class LmtpMachine(RuleBasedStateMachine):
    """Random valid and invalid commands, DATA and BDAT content, random chunk splits.

    The driver asserts the structural invariants on every event (one reply per accepted
    recipient, no data outside a message, well-formed replies of at most 512 octets); this
    machine also checks that every delivered message is exactly what one DATA command sent,
    or a run of BDAT chunks, so nothing that followed a refused DATA is ever delivered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.limits = Limits()
        self.tls = False
        self.session = Session()
        self.pending = b""
        self.data_bodies: list[bytes] = []
        self.chunks: list[bytes] = []
        self.checked = 0

    @initialize(limits=LIMITS, tls=st.booleans())
    def start(self, limits: Limits, tls: bool) -> None:
        self.limits = limits
        self.tls = tls
        self.new_session()

    def new_session(self) -> None:
        self.session = Session(self.limits, end_reply=end_reply, starttls=self.tls)
        self.pending = line("LHLO c.example")
        self.data_bodies = []
        self.chunks = []
        self.checked = 0

    # ---- what the client writes (queued until a flush)

    @rule(text=st.sampled_from(MAILS))
    def mail(self, text: str) -> None:
        self.pending += line(text)

    @rule(text=st.sampled_from(RCPTS))
    def rcpt(self, text: str) -> None:
        self.pending += line(text)

    @rule(text=st.sampled_from(OTHERS))
    def other(self, text: str) -> None:
        self.pending += line(text)

    @rule(message=body)
    def data(self, message: bytes) -> None:
        self.data_bodies.append(message)
        self.pending += line("DATA") + dot_stuff(message)

    @rule(payload=chunk_payload, last=st.booleans())
    def bdat(self, payload: bytes, last: bool) -> None:
        self.chunks.append(payload)
        self.pending += bdat(payload, last)

    @rule(
        mail=st.sampled_from(MAILS[:5]),
        rcpts=st.lists(st.sampled_from(RCPTS[:5]), min_size=1, max_size=3),
        message=body,
        chunks=st.none() | st.lists(chunk_payload, min_size=1, max_size=3),
    )
    def transaction(
        self, mail: str, rcpts: list[str], message: bytes, chunks: list[bytes] | None
    ) -> None:
        """A well-formed transaction, so that messages do get delivered."""
        self.pending += line(mail) + b"".join(map(line, rcpts))
        if chunks is None:
            self.data(message)
        else:
            self.chunks += chunks
            self.pending += b"".join(bdat_message(chunks))

    @rule(raw=st.binary(max_size=8))
    def raw(self, raw: bytes) -> None:
        # a few bytes with no CRLF and no letters: they can only spoil the line they join
        self.pending += no_crlf(bytes(b if b in b"\x00\xff .\r\n#" else 0x23 for b in raw))

    @rule()
    def quit(self) -> None:
        self.pending += line("QUIT")

    @rule()
    def starttls(self) -> None:
        """STARTTLS (offered or not); the rest of its write is injected plaintext."""
        self.pending += line("STARTTLS")

    # ---- what reaches the server

    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        cuts = data.draw(st.lists(st.integers(0, max(0, len(self.pending))), max_size=10))
        for chunk in split_at(self.pending, cuts):
            before = len(self.session.out.events)
            wire = self.session.send(chunk)
            if any(isinstance(e, StartTls) for e in self.session.out.events[before:]):
                # RFC 3207: nothing pipelined after STARTTLS in that write gets an answer
                assert wire.endswith(b"220 2.0.0 Ready to start TLS\r\n")
                event("STARTTLS accepted")
            if self.session.out.closed:
                break
        self.pending = b""
        self.check_messages()
        if self.session.out.closed:
            self.new_session()

    @precondition(lambda self: self.pending == b"")
    @rule()
    def hang_up(self) -> None:
        in_transaction = self.session.conn.in_transaction
        self.session.send(b"", eof=True)
        assert self.session.out.closed
        if in_transaction:
            assert isinstance(self.session.out.events[-2], MessageAborted)
        self.new_session()

    # ---- checks

    def check_messages(self) -> None:
        out = self.session.out
        new = zip(out.messages[self.checked :], out.message_kinds[self.checked :], strict=True)
        for message, kind in new:
            if kind == "DATA":
                assert message in self.data_bodies, f"delivered bytes no DATA sent: {message!r}"
            else:
                runs = {
                    b"".join(self.chunks[i:j])
                    for i in range(len(self.chunks))
                    for j in range(i + 1, len(self.chunks) + 1)
                }
                assert message in runs, f"delivered bytes no BDAT run sent: {message!r}"
        if len(out.messages) > self.checked:
            event(f"delivered by {kind}")
        self.checked = len(out.messages)

    @invariant()
    def nothing_owed(self) -> None:
        conn = self.session.conn
        assert conn.replies_owed == 0
        assert conn.data_to_send() == b""

    def teardown(self) -> None:
        if not self.session.out.closed:
            self.session.send(self.pending, eof=True)
            self.check_messages()
            assert self.session.out.closed
        self.session.checker.assert_complete()


LmtpMachine.TestCase.settings = budget(200, stateful_step_count=50)
test_state_machine = LmtpMachine.TestCase
