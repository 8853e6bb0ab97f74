"""The sans-IO LMTP core against CONFORMANCE.md, with plain bytes and no sockets.

Each test names the checklist row it covers (L.., S.., X.., I..); the driver checks every reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from lmtp_driver import HOSTNAME, OK, Outcome, ReplyChecker, Session, drive, reply_codes

from bridge.lmtp.connection import Limits, LmtpServerConnection
from bridge.lmtp.errors import MESSAGE_TOO_BIG
from bridge.lmtp.events import (
    NEED_DATA,
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
    Xforward,
)
from bridge.lmtp.state import State


def script(*parts: str | bytes) -> bytes:
    """Command lines (str, CRLF added) and raw bytes (as they are) in one write."""
    return b"".join(p.encode() + b"\r\n" if isinstance(p, str) else p for p in parts)


LHLO = "LHLO client.example"
MAIL = "MAIL FROM:<sender@example.org>"


def run(
    *parts: str | bytes,
    limits: Limits | None = None,
    end_reply: Callable[[str], Reply] = lambda rcpt: OK,
) -> Outcome:
    """LHLO, then everything in one pipelined write, then EOF."""
    return drive([script(LHLO), script(*parts)], limits=limits, end_reply=end_reply)


def codes_after_lhlo(out: Outcome) -> list[int]:
    assert out.codes[0] == 250
    return out.codes[1:]


def lines_after_lhlo(out: Outcome) -> list[str]:
    """Reply lines after the (multi-line) LHLO answer."""
    lines = out.lines
    end = next(i for i, line in enumerate(lines) if line.startswith("250 "))
    return lines[end + 1 :]


def reply_lines(wire: bytes) -> list[str]:
    return wire.decode("utf-8", "replace").split("\r\n")[:-1]


E = TypeVar("E")


def events_of(out: Outcome, kind: type[E]) -> list[E]:
    return [e for e in out.events if isinstance(e, kind)]


def one_message(*rcpts: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> bytes:
    return script(MAIL, *(f"RCPT TO:<{r}>" for r in rcpts), "DATA", body, ".")


# ---------------------------------------------------------------------------- the reply checker


def test_L15_X09_reply_checker_rejects_bad_replies() -> None:
    """The checker every driven test relies on is not vacuous."""
    good = ReplyChecker()
    good.feed(b"220 test.example LMTP lmtp-bridge ready\r\n250-test.example\r\n250 PIPELINING\r\n")
    good.feed(b"250 2.1.0 Sender OK\r\n354 Go ahead\r\n452 4.5.3 Too many\r\n")
    good.assert_complete()
    for bad in (b"250 Sender OK\r\n", b"550 4.1.1 no\r\n", b"250-2.0.0 a\r\n250 b\r\n", b"hi\r\n"):
        checker = ReplyChecker()
        checker.feed(b"220 test.example ready\r\n")
        with pytest.raises(AssertionError):
            checker.feed(bad)
    with pytest.raises(AssertionError):
        ReplyChecker().feed(b"250 2.0.0 " + b"x" * 600 + b"\r\n")


# ---------------------------------------------------------------------------- 1a. RFC 2033


def test_L01_greeting() -> None:
    session = Session()
    assert session.greeting == f"220 {HOSTNAME} LMTP lmtp-bridge ready\r\n".encode()


def test_L02_L14_L16_lhlo_lists_the_extensions() -> None:
    out = drive([script(LHLO)], limits=Limits(max_message_size=12345))
    lines = out.lines
    assert lines[0] == f"250-{HOSTNAME}"
    assert all(line.startswith("250-") for line in lines[:-1])  # S06
    assert lines[-1].startswith("250 ")
    keywords = {line[4:] for line in lines[1:]}
    assert {
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SIZE 12345",
        "CHUNKING",
        "SMTPUTF8",
        "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT",
    } <= keywords
    assert not any(k.startswith("DSN") for k in keywords)  # the MTA keeps DSN duty
    assert out.codes == [250]


def test_L03_helo_and_ehlo_get_500_and_the_session_stays_usable() -> None:
    out = drive([script("EHLO x", "HELO x", LHLO, MAIL)])
    assert out.codes == [500, 500, 250, 250]
    assert out.lines[0].startswith("500 5.5.1")


def test_L04_lhlo_without_argument() -> None:
    out = drive([script("LHLO", "LHLO ")])
    assert out.codes == [501, 501]
    assert all(line.startswith("501 5.5.") for line in out.lines)


def test_L05_repeated_lhlo_resets_the_transaction() -> None:
    out = run(MAIL, "RCPT TO:<a@example.net>", LHLO, "DATA")
    assert codes_after_lhlo(out) == [250, 250, 250, 503]
    assert events_of(out, MessageAborted)
    assert out.messages == []


def test_L06_one_reply_per_accepted_rcpt_in_rcpt_order() -> None:
    out = run(
        one_message("a@example.net", "bad@example.net", "c@example.net", "d@example.net"),
        end_reply=lambda rcpt: Reply(250, "2.0.0", f"<{rcpt}> delivered"),
    )
    assert codes_after_lhlo(out) == [250, 250, 550, 250, 250, 354, 250, 250, 250]
    assert out.lines[-3:] == [
        "250 2.0.0 <a@example.net> delivered",
        "250 2.0.0 <c@example.net> delivered",
        "250 2.0.0 <d@example.net> delivered",
    ]
    assert out.recipients == [["a@example.net", "c@example.net", "d@example.net"]]


def test_L07_duplicate_recipient_gets_one_reply_each() -> None:
    out = run(one_message("a@example.net", "a@example.net"))
    assert codes_after_lhlo(out) == [250, 250, 250, 354, 250, 250]
    assert out.recipients == [["a@example.net", "a@example.net"]]


def test_L08_data_without_a_successful_rcpt_is_503() -> None:
    out = run(MAIL, "RCPT TO:<bad@example.net>", "DATA")
    assert codes_after_lhlo(out) == [250, 550, 503]
    assert out.lines[-1].startswith("503 5.5.")


def test_L09_X12_bad_pipelined_data() -> None:
    out = run(MAIL, "RCPT TO:<bad@example.net>", "DATA", "FROP!", "DATA", "FROP!", ".", "QUIT")
    assert codes_after_lhlo(out) == [250, 550, 503, 500, 503, 500, 500, 221]
    assert out.messages == []
    assert not events_of(out, MessageStart)
    assert not events_of(out, MessageData)


def test_L10_X01_message_over_the_size_limit_gets_n_replies_and_the_session_goes_on() -> None:
    limits = Limits(max_message_size=100)
    out = run(
        one_message("a@example.net", "b@example.net", "c@example.net", body=b"x" * 150 + b"\r\n"),
        one_message("a@example.net", body=b"small\r\n"),
        limits=limits,
    )
    assert codes_after_lhlo(out) == [250, 250, 250, 250, 354, 552, 552, 552, 250, 250, 354, 250]
    assert [line for line in out.lines if line.startswith("552")] == [
        "552 5.3.4 Message size exceeds the fixed maximum message size"
    ] * 3
    assert out.messages == [b"small\r\n"]


def test_L11_bdat_replies_one_per_chunk_then_one_per_rcpt() -> None:
    out = run(
        MAIL,
        "RCPT TO:<a@example.net>",
        "RCPT TO:<b@example.net>",
        "BDAT 10",
        b"0123456789",
        "BDAT 5 LAST",
        b"abcde",
    )
    assert codes_after_lhlo(out) == [250, 250, 250, 250, 250, 250]
    assert out.messages == [b"0123456789abcde"]


def test_L12_bdat_last_without_recipients_returns_zero_replies() -> None:
    out = run(MAIL, "RCPT TO:<bad@example.net>", "BDAT 5 LAST", b"NOOP\n", "NOOP")
    assert codes_after_lhlo(out) == [250, 550, 250]
    assert out.messages == []
    # the transaction is over: a new one can start
    out = run(MAIL, "RCPT TO:<bad@example.net>", "BDAT 5 LAST", b"abcde", one_message("a@x"))
    assert codes_after_lhlo(out) == [250, 550, 250, 250, 354, 250]


def test_L14_X11_big_pipeline_answered_in_order() -> None:
    rcpts = [f"r{i}@example.net" for i in range(200)]
    session = Session(Limits(max_recipients=1000))
    wire = session.send(script(LHLO) + one_message(*rcpts))
    assert reply_codes(wire) == [250, 250] + [250] * 200 + [354] + [250] * 200
    assert session.out.recipients == [rcpts]


# ---------------------------------------------------------------------------- 1b. RFC 5321


def test_S01_verbs_and_keywords_are_case_insensitive() -> None:
    out = run(
        "mail from:<a@example.org> size=10",
        "rcpt to:<b@example.net>",
        "data",
        b"x\r\n",
        ".",
        "mail From:<a@example.org> Body=8bitmime",
        "rset",
        "noop",
    )
    assert codes_after_lhlo(out) == [250, 250, 354, 250, 250, 250, 250]
    mails = events_of(out, MailFrom)
    assert mails == [MailFrom("a@example.org", size=10), MailFrom("a@example.org", body="8BITMIME")]


def test_S02_512_octet_command_lines_are_accepted() -> None:
    noop = "NOOP " + "x" * (512 - 7)
    path = "<" + "r" * (256 - len("<@example.net>")) + "@example.net>"  # the most a path may have
    rcpt = f"RCPT TO:{path} ORCPT=rfc822;" + "o" * (510 - len(f"RCPT TO:{path} ORCPT=rfc822;"))
    assert len(noop) + 2 == 512 and len(rcpt) + 2 == 512 and len(path) == 256
    out = run(noop, MAIL, rcpt)
    assert codes_after_lhlo(out) == [250, 250, 250]


def test_S02_513_octet_command_line_is_500() -> None:
    out = run("NOOP " + "x" * (513 - 7), "NOOP")
    assert codes_after_lhlo(out) == [500, 250]
    assert lines_after_lhlo(out)[0].startswith("500 5.5.6")


@pytest.mark.parametrize("piece", [None, 1000, 7], ids=["one-write", "1000-byte-pieces", "7"])
def test_S02_10000_octet_command_line_then_noop(piece: int | None) -> None:
    data = script("NOOP " + "x" * 9993, "NOOP")
    chunks = [data] if piece is None else [data[i : i + piece] for i in range(0, len(data), piece)]
    out = drive([script(LHLO), *chunks])
    assert codes_after_lhlo(out) == [500, 250]
    assert lines_after_lhlo(out)[0].startswith("500 5.5.6")


def test_S03_long_orcpt_parameter_is_accepted() -> None:
    orcpt = "rfc822;" + "o" * 480 + "@example.net"
    out = run(MAIL, f"RCPT TO:<a@example.net> ORCPT={orcpt}")
    assert codes_after_lhlo(out) == [250, 250]
    assert events_of(out, RcptTo) == [RcptTo("a@example.net", orcpt=orcpt)]


@pytest.mark.parametrize(
    ("body", "delivered"),
    [
        (b"..x\r\n", b".x\r\n"),
        (b"...\r\n", b"..\r\n"),
        (b"..hdr: 1\r\n\r\nbody\r\n", b".hdr: 1\r\n\r\nbody\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\nb.\r\n.c\r\n", b"a\r\nb.\r\nc\r\n"),
        (b"a\n..b\r\n", b"a\n..b\r\n"),  # no unstuffing after a bare LF: not a line start
        (b"", b""),
    ],
)
def test_S07_transparency(body: bytes, delivered: bytes) -> None:
    out = run(one_message("a@example.net", body=body))
    assert out.messages == [delivered]


SMUGGLED = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled"


@pytest.mark.parametrize(
    ("vector", "kept"),
    [
        (b"\n.\n", b"\n.\n"),
        (b"\r.\r", b"\r.\r"),
        (b"\r.\n", b"\r.\n"),
        (b"\n.\r", b"\n.\r"),
        (b"\n.\r\n", b"\n.\r\n"),
        (b"\r\n.\n", b"\r\n\n"),  # the CRLF line ".\nMAIL..." starts with a dot: unstuffed
        (b"\r.\r\n", b"\r.\r\n"),
        (b"\r\n.\r", b"\r\n\r"),  # likewise the line ".\rMAIL..."
        (b"\r\n\x00.\r\n", b"\r\n\x00.\r\n"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "byte-by-byte"])
def test_S08_X12_smuggling_vectors_never_end_data(vector: bytes, kept: bytes, split: bool) -> None:
    body = b"Subject: t\r\n\r\nbefore" + vector + SMUGGLED + b"\r\n"
    data = one_message("a@example.net", body=body) + script("NOOP")
    chunks = [bytes([b]) for b in data] if split else [data]
    out = drive([script(LHLO), *chunks])
    assert out.messages == [b"Subject: t\r\n\r\nbefore" + kept + SMUGGLED + b"\r\n"]
    assert codes_after_lhlo(out) == [250, 250, 354, 250, 250]
    assert [e.sender for e in events_of(out, MailFrom)] == ["sender@example.org"]
    assert len(events_of(out, MessageStart)) == 1


def test_S09_S10_bare_cr_lf_and_nul_are_kept_as_bytes() -> None:
    body = b"a\nb\r\nc\rd\r\n\re\r\r\nf\n\r\n\x00g\r\n"
    out = run(one_message("a@example.net", body=body))
    assert out.messages == [body]


def test_S11_null_sender() -> None:
    out = run("MAIL FROM:<> SIZE=10", "RCPT TO:<a@example.net>", "DATA", b"x\r\n", ".")
    assert codes_after_lhlo(out) == [250, 250, 354, 250]
    assert events_of(out, MailFrom) == [MailFrom("", size=10)]


def test_S12_bad_mail_and_rcpt_syntax_is_501_and_keeps_the_state() -> None:
    out = run(
        "MAIL FROM:foo@example.org",
        "MAIL TO:<a@example.org>",
        "MAIL FROM:<a@example.org",
        MAIL,  # still READY: a good MAIL works
        "RCPT TO:",
        "RCPT TO:<>",
        "RCPT TO:<b c@example.net>",
        "DATA",  # still MAIL: no valid recipient
        "RCPT TO:<a@example.net>",
        "DATA",
        b"x\r\n",
        ".",
    )
    assert codes_after_lhlo(out) == [501, 501, 501, 250, 501, 501, 501, 503, 250, 354, 250]
    assert out.messages == [b"x\r\n"]


def test_S13_spaces_after_the_colon_are_tolerated() -> None:
    out = run("MAIL FROM: <a@example.org>", "RCPT TO:   <b@example.net>")
    assert codes_after_lhlo(out) == [250, 250]
    assert events_of(out, MailFrom) == [MailFrom("a@example.org")]
    assert events_of(out, RcptTo) == [RcptTo("b@example.net")]


def test_S14_X16_unknown_parameters_are_555() -> None:
    out = run(
        "MAIL FROM:<a@example.org> FOO=1",
        MAIL,
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE",
        "RCPT TO:<b@example.net> ORCPT=rfc822;b@example.net",
    )
    assert codes_after_lhlo(out) == [555, 250, 555, 250]
    assert lines_after_lhlo(out)[0].startswith("555 5.5.4")
    assert events_of(out, RcptTo) == [RcptTo("b@example.net", orcpt="rfc822;b@example.net")]


@pytest.mark.parametrize(
    ("before", "command"),
    [
        ([LHLO], "RCPT TO:<a@example.net>"),  # RCPT before MAIL
        ([LHLO], "DATA"),  # DATA before MAIL
        ([LHLO, MAIL], "DATA"),  # DATA before RCPT
        ([LHLO, MAIL], MAIL),  # MAIL inside a transaction
        ([LHLO, MAIL, "RCPT TO:<a@example.net>"], MAIL),
        ([], MAIL),  # MAIL before LHLO
        ([], "XFORWARD ADDR=192.0.2.1"),
        ([LHLO, MAIL], "XFORWARD ADDR=192.0.2.1"),  # X17: inside a transaction
        ([LHLO], "BDAT 3"),  # BDAT before MAIL (its octets are still read)
    ],
)
def test_S15_out_of_sequence_is_503(before: list[str], command: str) -> None:
    session = Session()
    session.send(script(*before))
    state = session.conn.state
    extra = b"abc" if command.startswith("BDAT") else b""
    wire = session.send(script(command, extra, "NOOP"))
    assert reply_codes(wire) == [503, 250]
    assert reply_lines(wire)[0].startswith("503 5.5.1")
    assert session.conn.state is state


def test_S16_unknown_and_unimplemented_verbs() -> None:
    out = run("FOO bar", "EXPN staff", "TURN", "NOOP")
    assert codes_after_lhlo(out) == [500, 502, 502, 250]
    assert lines_after_lhlo(out)[0].startswith("500 5.5.1")
    assert lines_after_lhlo(out)[1].startswith("502 5.5.1")


def test_S17_empty_command_line_is_500() -> None:
    out = run("", "NOOP")
    assert codes_after_lhlo(out) == [500, 250]


def test_S18_rset_discards_the_transaction() -> None:
    out = run(MAIL, "RCPT TO:<a@example.net>", "RSET", "DATA", "RSET now", "RSET")
    assert codes_after_lhlo(out) == [250, 250, 250, 503, 501, 250]
    assert events_of(out, MessageAborted) == [MessageAborted()]


def test_S18_I07_rset_probe_on_a_reused_connection() -> None:
    """Postfix reuses a cached connection with RSET and then MAIL, with no new LHLO."""
    session = Session()
    session.send(script(LHLO) + one_message("a@example.net"))
    assert reply_codes(session.send(script("RSET"))) == [250]
    wire = session.send(one_message("b@example.net"))
    assert reply_codes(wire) == [250, 250, 354, 250]
    assert session.out.recipients == [["a@example.net"], ["b@example.net"]]


def test_S19_noop_ignores_its_argument() -> None:
    out = run("NOOP hello there")
    assert codes_after_lhlo(out) == [250]


def test_S20_quit_answers_221_and_closes() -> None:
    out = run("QUIT", "NOOP")
    assert codes_after_lhlo(out) == [221]
    assert out.lines[-1] == f"221 2.0.0 {HOSTNAME} closing connection"
    assert out.closed
    assert events_of(out, Quit) == [Quit()]


def test_S20_quit_inside_a_transaction_aborts_it_and_still_reports_quit() -> None:
    out = drive([script(LHLO, MAIL, "RCPT TO:<a@example.net>", "QUIT")], eof=False)
    assert codes_after_lhlo(out) == [250, 250, 221]
    assert [type(e) for e in out.events[-2:]] == [MessageAborted, Quit]
    assert out.closed


def test_S21_I01_quit_pipelined_after_the_dot_is_answered_after_all_replies() -> None:
    """Postfix's grouping: MAIL+RCPTs+DATA in one segment, then content+dot+QUIT in one."""
    session = Session(end_reply=lambda rcpt: Reply(250, "2.0.0", f"<{rcpt}> delivered"))
    session.send(script(LHLO))
    first = session.send(
        script("MAIL FROM:<s@example.org> SIZE=272", "RCPT TO:<a@x>", "RCPT TO:<b@x>", "DATA")
    )
    assert reply_codes(first) == [250, 250, 250, 354]
    second = session.send(script(b"Subject: t\r\n\r\nhi\r\n", ".", "QUIT"))
    assert reply_lines(second) == [
        "250 2.0.0 <a@x> delivered",
        "250 2.0.0 <b@x> delivered",
        f"221 2.0.0 {HOSTNAME} closing connection",
    ]
    assert session.out.closed


def test_X01_oversize_message_events_do_not_depend_on_chunking() -> None:
    """The core hands out exactly the first max_message_size bytes, wherever the cuts fall."""
    body = b"0123456789" * 3 + b"\r\n"
    data = one_message("a@x", body=body)
    for cut in range(1, len(data)):
        out = drive([script(LHLO), data[:cut], data[cut:]], limits=Limits(max_message_size=25))
        handed_out = b"".join(e.data for e in events_of(out, MessageData))
        assert handed_out == body[:25], cut
        assert events_of(out, MessageEnd) == [MessageEnd(error=MESSAGE_TOO_BIG)]


def test_S22_vrfy_is_252() -> None:
    out = run("VRFY postmaster", "VRFY")
    assert codes_after_lhlo(out) == [252, 501]
    assert lines_after_lhlo(out)[0].startswith("252 2.")


def test_S27_too_many_recipients_is_452() -> None:
    rcpts = [f"r{i}@example.net" for i in range(4)]
    out = run(one_message(*rcpts), limits=Limits(max_recipients=3))
    assert codes_after_lhlo(out) == [250, 250, 250, 250, 452, 354, 250, 250, 250]
    assert any(line.startswith("452 4.5.3") for line in out.lines)
    assert out.recipients == [rcpts[:3]]


def test_S27_452_is_flow_control_and_does_not_spend_the_error_budget() -> None:
    """Postfix sends up to lmtp_destination_recipient_limit RCPTs; the excess gets 452 and is
    retried later. Those 452s must not close the session as "too many errors" (421)."""
    rcpts = [f"r{i}@example.net" for i in range(30)]
    out = run(one_message(*rcpts), "NOOP", limits=Limits(max_recipients=2, max_command_errors=3))
    assert codes_after_lhlo(out) == [250, 250, 250] + [452] * 28 + [354, 250, 250, 250]
    assert not any(line.startswith("421") for line in out.lines)


# ---------------------------------------------------------------------------- 1c. extensions


def test_X01_declared_size_over_the_limit_is_552() -> None:
    out = run(
        "MAIL FROM:<a@example.org> SIZE=101",
        "MAIL FROM:<a@example.org> SIZE=100",
        limits=Limits(max_message_size=100),
    )
    assert codes_after_lhlo(out) == [552, 250]
    assert lines_after_lhlo(out)[0].startswith("552 5.3.4")


@pytest.mark.parametrize("value", ["abc", "", "-1", "1e3", "\u00b2", "\u0661\u0662", "9" * 4400])
def test_X01_non_numeric_size_is_501(value: str) -> None:
    out = run(f"MAIL FROM:<a@example.org> SIZE={value}", "NOOP")
    assert codes_after_lhlo(out) == [501, 250]


def test_X01_bdat_over_the_limit() -> None:
    limits = Limits(max_message_size=10)
    # LAST chunk over the limit: one 552 per recipient
    out = run(MAIL, "RCPT TO:<a@x>", "RCPT TO:<b@x>", "BDAT 11 LAST", b"x" * 11, limits=limits)
    assert codes_after_lhlo(out) == [250, 250, 250, 552, 552]
    assert out.messages == []


def test_X02_body_parameter() -> None:
    out = run(
        "MAIL FROM:<a@example.org> BODY=FOO",
        "MAIL FROM:<a@example.org> BODY=7BIT",
        "RSET",
        "MAIL FROM:<a@example.org> BODY=8BITMIME",
    )
    assert codes_after_lhlo(out) == [501, 250, 250, 250]
    assert [e.body for e in events_of(out, MailFrom)] == ["7BIT", "8BITMIME"]


def test_L16_X02_8bit_bytes_pass_unchanged() -> None:
    body = "Subject: café\r\n\r\nÄpfel \u2603\r\n".encode() + b"\xff\xfe\x80\r\n"
    out = run("MAIL FROM:<a@example.org> BODY=8BITMIME", "RCPT TO:<b@x>", "DATA", body, ".")
    assert out.messages == [body]


@pytest.mark.parametrize("piece", [None, 3])
def test_X04_bdat_chunk_is_stored_verbatim(piece: int | None) -> None:
    chunk = b"a\r\n.\r\nMAIL FROM:<x@y>\r\n\n.\n..\r\n.\r\n"
    data = script(MAIL, "RCPT TO:<a@x>", f"BDAT {len(chunk)}", chunk, "BDAT 0 LAST", "NOOP")
    chunks = [data] if piece is None else [data[i : i + piece] for i in range(0, len(data), piece)]
    out = drive([script(LHLO), *chunks])
    assert codes_after_lhlo(out) == [250, 250, 250, 250, 250]
    assert out.messages == [chunk]


def test_X04_bdat_0_last_alone_is_an_empty_message() -> None:
    out = run(MAIL, "RCPT TO:<a@x>", "BDAT 0 LAST")
    assert codes_after_lhlo(out) == [250, 250, 250]
    assert out.messages == [b""]


def test_X05_failed_chunk_keeps_the_stream_in_sync() -> None:
    limits = Limits(max_message_size=30)
    out = run(
        MAIL,
        "RCPT TO:<a@x>",
        "BDAT 42",
        b"NOOP\r\n" * 7,  # oversize: consumed, not parsed
        "BDAT 6 LAST",
        b"QUIT\r\n",  # consumed too, then 503
        "NOOP",
        "BDAT 3",
        b"abc",
        "RSET",
        one_message("b@x"),
        limits=limits,
    )
    assert codes_after_lhlo(out) == [250, 250, 552, 503, 250, 503, 250, 250, 250, 354, 250]
    lines = lines_after_lhlo(out)
    assert lines[2].startswith("552 5.3.4")
    assert lines[3].startswith("503 5.5.1")
    assert out.messages == [b"Subject: t\r\n\r\nhello\r\n"]


def test_X06_data_after_bdat_and_bdat_after_last_are_503() -> None:
    out = run(
        MAIL,
        "RCPT TO:<a@x>",
        "BDAT 2",
        b"ab",
        "DATA",
        "BDAT 1 LAST",
        b"c",
        "BDAT 4 LAST",
        b"QUIT",  # read as the refused chunk's octets
        "NOOP",
    )
    assert codes_after_lhlo(out) == [250, 250, 250, 503, 250, 503, 250]
    assert out.messages == [b"abc"]


def test_X07_binarymime_needs_bdat() -> None:
    out = run(
        "MAIL FROM:<a@example.org> BODY=BINARYMIME",
        "RCPT TO:<a@x>",
        "DATA",
        "BDAT 3 LAST",
        b"\x00\r\x01",
    )
    assert codes_after_lhlo(out) == [250, 250, 503, 250]
    assert out.messages == [b"\x00\r\x01"]


@pytest.mark.parametrize("param", ["", " SMTPUTF8"])
def test_X14_utf8_local_part_is_accepted_with_or_without_smtputf8(param: str) -> None:
    out = run(f"MAIL FROM:<jörg@example.org>{param}", "RCPT TO:<bjørn@example.net>")
    assert codes_after_lhlo(out) == [250, 250]
    assert events_of(out, MailFrom) == [MailFrom("jörg@example.org", smtputf8=bool(param))]
    assert events_of(out, RcptTo) == [RcptTo("bjørn@example.net")]


def test_X14_invalid_utf8_address_is_501_5_1_3() -> None:
    out = run(b"MAIL FROM:<j\xf6rg@example.org>\r\n", MAIL, b"RCPT TO:<\xff@example.net>\r\n")
    assert codes_after_lhlo(out) == [501, 250, 501]
    lines = lines_after_lhlo(out)
    assert lines[0].startswith("501 5.1.3")
    assert lines[2].startswith("501 5.1.3")


def test_X17_xforward() -> None:
    session = Session()
    session.send(script(LHLO))
    wire = session.send(
        script(
            "XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=4711",
            "XFORWARD HELO=mx+2Bone.example PROTO=ESMTP SOURCE=REMOTE IDENT=abc+3Ddef",
        )
    )
    assert reply_codes(wire) == [250, 250]
    assert session.conn.xforward == {
        "addr": "192.0.2.1",
        "port": "4711",
        "helo": "mx+one.example",
        "proto": "ESMTP",
        "source": "REMOTE",
        "ident": "abc=def",
    }
    assert isinstance(session.out.events[-1], Xforward)
    assert session.out.events[-1].attributes == session.conn.xforward
    # [UNAVAILABLE] clears a value given before
    session.send(script("XFORWARD ADDR=[UNAVAILABLE]"))
    assert "addr" not in session.conn.xforward
    # bad syntax, unknown attributes and control characters smuggled in as xtext: 501
    wire = session.send(
        script("XFORWARD", "XFORWARD FOO=1", "XFORWARD ADDR", "XFORWARD HELO=a+0D+0Ab")
    )
    assert reply_codes(wire) == [501, 501, 501, 501]
    assert session.conn.xforward["helo"] == "mx+one.example"


def test_X17_xforward_lasts_one_transaction() -> None:
    session = Session()
    session.send(script(LHLO, "XFORWARD ADDR=192.0.2.1"))
    session.send(script(MAIL, "RCPT TO:<a@x>", "DATA", b"x\r\n"))
    assert session.conn.xforward == {"addr": "192.0.2.1"}  # still there while delivering
    session.send(script("."))
    assert session.conn.xforward == {}  # reset at the end of the transaction
    session.send(script("XFORWARD ADDR=192.0.2.2", "RSET"))
    assert session.conn.xforward == {}  # and by RSET


# ---------------------------------------------------------------------------- limits and robustness


def test_error_budget_closes_with_421() -> None:
    out = run("FOO", "BAR", "BAZ", "QUX", "NOOP", limits=Limits(max_command_errors=3))
    assert codes_after_lhlo(out) == [500, 500, 500, 500, 421]
    assert out.lines[-1].startswith("421 4.")
    assert out.closed
    assert events_of(out, ConnectionClosed) == [ConnectionClosed()]


def test_a_completed_message_resets_the_error_budget() -> None:
    out = run("FOO", "FOO", one_message("a@x"), "FOO", "FOO", limits=Limits(max_command_errors=2))
    assert codes_after_lhlo(out) == [500, 500, 250, 250, 354, 250, 500, 500]
    assert [e.kind for e in events_of(out, ProtocolError)] == ["unknown_command"] * 4


@pytest.mark.parametrize("piece", [None, 1000])
def test_S04_long_data_lines_are_delivered_whole(piece: int | None) -> None:
    body = b"a" * 5000 + b"\r\n" + b"." * 3000 + b"\r\n"
    data = one_message("a@x", body=b"a" * 5000 + b"\r\n." + b"." * 3000 + b"\r\n")
    chunks = [data] if piece is None else [data[i : i + piece] for i in range(0, len(data), piece)]
    out = drive([script(LHLO), *chunks])
    assert out.messages == [body]


@pytest.mark.parametrize(
    "tail",
    [b"", b"partial line", b"line\r\n", b"line\r\n.", b"line\r\n.\r", b"x\r"],
    ids=repr,
)
def test_S23_eof_mid_data_aborts_and_delivers_nothing(tail: bytes) -> None:
    out = drive([script(LHLO, MAIL, "RCPT TO:<a@x>", "DATA", tail)])
    assert out.messages == []
    assert [type(e) for e in out.events[-2:]] == [MessageAborted, ConnectionClosed]
    assert codes_after_lhlo(out) == [250, 250, 354]


def test_S23_eof_mid_bdat_chunk_aborts_and_delivers_nothing() -> None:
    out = drive([script(LHLO, MAIL, "RCPT TO:<a@x>", "BDAT 10 LAST", b"abc")])
    assert out.messages == []
    assert [type(e) for e in out.events[-2:]] == [MessageAborted, ConnectionClosed]


@pytest.mark.parametrize("quit", [True, False], ids=["quit", "no-quit"])
@pytest.mark.parametrize("use_bdat", [False, True], ids=["data", "bdat"])
def test_I12_eof_right_after_a_pipelined_transaction(quit: bool, use_bdat: bool) -> None:
    """Exim writes everything, half-closes, and only then reads: all replies still go out."""
    rcpts = ("a@x", "b@x", "c@x")
    if use_bdat:
        head = script(MAIL, *(f"RCPT TO:<{r}>" for r in rcpts))
        data = head + script("BDAT 6", b"Subj: ", "BDAT 3 LAST", b"t\r\n")
    else:
        data = one_message(*rcpts, body=b"Subj: t\r\n")
    session = Session()
    session.send(script(LHLO))
    wire = session.send(data + (script("QUIT") if quit else b""), eof=True)
    middle = [250] if use_bdat else [354]
    bye = [221] if quit else []
    assert reply_codes(wire) == [250, 250, 250, 250, *middle, 250, 250, 250, *bye]
    assert session.out.messages == [b"Subj: t\r\n"]
    assert isinstance(session.out.events[-1], Quit if quit else ConnectionClosed)


def test_many_empty_bdat_chunks_in_one_pipeline() -> None:
    out = run(MAIL, "RCPT TO:<a@x>", "BDAT 0" + "\r\nBDAT 0" * 4999, "BDAT 1 LAST", b"z")
    assert codes_after_lhlo(out) == [250, 250] + [250] * 5000 + [250]
    assert out.messages == [b"z"]


def test_client_text_quoted_in_replies_is_short_and_clean() -> None:
    out = run(
        "MAIL FROM:<a@example.org> " + "X" * 4000 + "=1",
        b"MAIL FROM:<a@example.org> P\x01=1\r\n",
        "XFORWARD " + "N" * 3000 + "=1",
    )
    assert codes_after_lhlo(out) == [555, 501, 501]
    assert all(len(line) < 200 for line in out.lines)


@pytest.mark.parametrize("arg", [b"a\x00b", b"host\rname", b"h\xffst"], ids=repr)
def test_lhlo_name_must_be_clean(arg: bytes) -> None:
    out = drive([b"LHLO " + arg + b"\r\n", script(LHLO)])
    assert out.codes[0] == 501
    assert out.codes[1] == 250


def test_non_ascii_verbs_are_unknown() -> None:
    out = run("MA\u0131L FROM:<a@example.org>", "NOOP")
    assert codes_after_lhlo(out) == [500, 250]


def test_api_misuse_raises() -> None:
    conn = LmtpServerConnection(HOSTNAME)
    with pytest.raises(RuntimeError):
        conn.accept()
    with pytest.raises(RuntimeError):
        conn.send_recipient_reply(Reply(250, "2.0.0", "ok"))
    conn.receive_data(script(LHLO, MAIL))
    assert conn.next_event() is not NEED_DATA
    event = conn.next_event()
    assert isinstance(event, MailFrom)
    with pytest.raises(ValueError):
        conn.reject(Reply(250, "2.0.0", "not a refusal"))
    ReplyChecker().feed(conn.data_to_send())


def test_replies_owed_and_in_transaction_follow_the_message() -> None:
    conn = LmtpServerConnection(HOSTNAME)
    conn.receive_data(script(LHLO, MAIL, "RCPT TO:<a@x>", "RCPT TO:<b@x>", "DATA", b"x\r\n", "."))
    seen = []
    while (event := conn.next_event()) is not NEED_DATA:
        seen.append(type(event))
        if isinstance(event, (MailFrom, RcptTo)):
            conn.accept()
        if isinstance(event, MessageEnd):
            break
    assert seen[-1] is MessageEnd
    assert conn.state is State.REPLYING and conn.in_transaction
    assert conn.replies_owed == 2
    conn.send_recipient_reply(Reply(250, "2.0.0", "ok"))
    assert conn.replies_owed == 1 and conn.in_transaction
    conn.fail_remaining(Reply(451, "4.3.0", "later"))
    assert conn.replies_owed == 0 and not conn.in_transaction
    assert conn.state is State.READY
    checker = ReplyChecker()
    checker.feed(conn.data_to_send())
    checker.assert_complete()


def test_X16_orcpt_must_be_valid_utf8_without_control_characters() -> None:
    out = run(
        MAIL,
        b"RCPT TO:<a@x> ORCPT=rfc822;\xff@x\r\n",
        b"RCPT TO:<a@x> ORCPT=rfc822;a\x00@x\r\n",
        "RCPT TO:<a@x> ORCPT=utf-8;jörg@x",
    )
    assert codes_after_lhlo(out) == [250, 501, 501, 250]
    assert events_of(out, RcptTo) == [RcptTo("a@x", orcpt="utf-8;jörg@x")]


def test_S05_reply_text_cannot_forge_lines_and_stays_within_512_octets() -> None:
    from bridge.lmtp.events import Reply

    forged = Reply(451, "4.3.0", "busy\r\n250 2.0.0 fake\nmore\x00" + "é" * 600)
    wire = forged.to_bytes()
    assert wire.count(b"\r\n") == 1 and wire.endswith(b"\r\n")
    assert b"\n" not in wire[:-2] and b"\r" not in wire[:-2] and b"\x00" not in wire
    assert len(wire) <= 512
    wire.decode("utf-8")  # never cut inside a character
    multi = Reply(250, "", ("host", "x" * 2000)).to_bytes().split(b"\r\n")
    assert len(multi) == 3 and all(len(line) <= 510 for line in multi)
