"""MAIL FROM / RCPT TO address syntax at the protocol level (plain bytes, no sockets): strict
where an address is clearly broken (501 5.1.3), lenient where real mail is (an MTA in front
forwards it, and a refusal here would bounce real mail). See bridge/lmtp/address.py."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lmtp_driver import drive

from bridge.lmtp.address import AddressError, parse_path
from bridge.lmtp.events import MailFrom, RcptTo

LHLO = b"LHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"

# (path between the angle brackets, the mailbox the server is handed)
ACCEPTED = [
    ("user@example.org", "user@example.org"),
    ('"a b"@example.org', '"a b"@example.org'),  # quoted local part with a space
    ('"a@b"@example.org', '"a@b"@example.org'),  # an @ inside quotes
    ('"a\\"b"@example.org', '"a\\"b"@example.org'),  # a quoted-pair
    ('"a>b"@example.org', '"a>b"@example.org'),  # > inside quotes does not end the path
    ('"john..doe"@example.org', '"john..doe"@example.org'),
    ('""@example.org', '""@example.org'),  # RFC 5321 allows it (and says not to use it)
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
    ("user@[IPv6:2001:db8::1]", "user@[IPv6:2001:db8::1]"),
    ("jörg@example.org", "jörg@example.org"),  # UTF-8 without SMTPUTF8 (Postfix sends so)
    ("用户@例子.广告", "用户@例子.广告"),
    ("@a.example,@b.example:u@c.example", "u@c.example"),  # source route, dropped
    ("@[192.0.2.1]:u@c.example", "u@c.example"),
    ("o'brien@example.org", "o'brien@example.org"),
    ("bob+tag@example.org", "bob+tag@example.org"),
    ("!#$%&'*+-/=?^_`{|}~@example.org", "!#$%&'*+-/=?^_`{|}~@example.org"),
    ("a..b@example.org", "a..b@example.org"),  # legacy dot forms Postfix accepts
    ("trailing.@example.org", "trailing.@example.org"),
    (".leading@example.org", ".leading@example.org"),
    ("user@sub_domain.example.org", "user@sub_domain.example.org"),
    ("user@example.org.", "user@example.org."),
    ("postmaster", "postmaster"),  # RFC 5321 4.5.1: <Postmaster> without a domain
    ("Postmaster", "Postmaster"),
    ("r" * (256 - len("<@example.net>")) + "@example.net", None),  # exactly 256 octets
]

# (path, what the reply says)
REFUSED = [
    ("s@@example.org", "Second @"),
    ("bad@@example.net", "Second @"),
    ("a@b@example.org", "Second @"),
    ("@example.org", "Empty local part"),
    ("user@", "Empty domain"),
    ("@", "Empty local part"),
    ("us er@example.org", "Space"),
    ("user@exa mple.org", "Space"),
    ("user @example.org", "Space"),
    ("us\ter@example.org", "Control"),
    ("user@exa\x01mple.org", "Control"),
    ('"a\x00b"@example.org', "Control"),  # controls are refused inside quotes too
    ("us\x7fer@example.org", "Control"),
    ("user@[192.0.2.1", "Unclosed address literal"),
    ("user@[IPv6:2001:db8::1", "Unclosed address literal"),
    ("user@[]", "Bad address literal"),
    ('user@["]', None),
    ("user@[192.0.2.1]x", "Garbage after the address literal"),
    ("user@exa[mple.org", "Bad character in domain"),
    ("user@example,org", "Bad character in domain"),
    ('"unclosed@example.org', None),
    ('"a"b@example.org', "Garbage after the quoted local part"),
    ("a<b@example.org", "Bad character in local part"),
    ("@a.example:", "Empty local part"),
    ("@a.example,b.example:u@c.example", "Bad source route"),
    ("@,@b:u@c.example", "Bad source route"),
    ("r" * (257 - len("<@example.net>")) + "@example.net", "longer than 256 octets"),
]


def rcpt(path: bytes) -> tuple[int, str, list[object]]:
    """The reply code and text to ``RCPT TO:<path>``, and the events (the session stays usable:
    a NOOP after it is answered 250)."""
    out = drive([LHLO, MAIL + b"RCPT TO:<" + path + b">\r\nNOOP\r\n"])
    lines = out.lines
    end = next(i for i, line in enumerate(lines) if line.startswith("250 "))
    mail, answer, noop = lines[end + 1 : end + 4]
    assert mail.startswith("250 ") and noop.startswith("250 ")
    return int(answer[:3]), answer, out.events


def mail(path: bytes) -> tuple[int, str, list[object]]:
    out = drive([LHLO, b"MAIL FROM:<" + path + b">\r\nNOOP\r\n"])
    lines = out.lines
    end = next(i for i, line in enumerate(lines) if line.startswith("250 "))
    answer, noop = lines[end + 1 : end + 3]
    assert noop.startswith("250 ")
    return int(answer[:3]), answer, out.events


@pytest.mark.parametrize(("path", "mailbox"), ACCEPTED, ids=[p[:40] for p, _ in ACCEPTED])
def test_accepted_forms(path: str, mailbox: str | None) -> None:
    raw = path.encode()
    code, answer, events = rcpt(raw)
    assert code == 250, answer
    assert [e for e in events if isinstance(e, RcptTo)] == [RcptTo(mailbox or path)]
    code, answer, events = mail(raw)
    assert code == 250, answer
    assert [e for e in events if isinstance(e, MailFrom)] == [MailFrom(mailbox or path)]


@pytest.mark.parametrize(("path", "why"), REFUSED, ids=[repr(p[:40]) for p, _ in REFUSED])
def test_refused_forms(path: str, why: str | None) -> None:
    raw = path.encode()
    for code, answer, events in (rcpt(raw), mail(raw)):
        assert code == 501 and answer.startswith("501 5.1.3 "), answer
        if why:
            assert why.lower() in answer.lower()
        assert not [e for e in events if isinstance(e, RcptTo)]
        assert MailFrom(path) not in events


def test_null_sender_yes_null_recipient_no() -> None:
    code, _, events = mail(b"")
    assert code == 250 and MailFrom("") in events
    code, answer, _ = rcpt(b"")
    assert answer.startswith("501 5.1.3")


def test_invalid_utf8_is_refused() -> None:
    for raw in (b"j\xf6rg@example.org", b"user@ex\xffample.org", b'"\xc3"@example.org'):
        assert rcpt(raw)[1].startswith("501 5.1.3")


# --- the property: never crashes, accepted iff the rules -------------------------------------

_CTRL = "\x00-\x1f\x7f-\x9f"
_DOMAIN = rf'(?:\[[^\[\]\\" {_CTRL}]+\]|[^ ()<>\[\]\\,;:@"{_CTRL}]+)'
_ROUTE = rf"(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)"
_LOCAL = rf'(?:"(?:[^"\\{_CTRL}]|\\[^{_CTRL}])*"|[^ <>"@{_CTRL}]+)'
_MAILBOX = re.compile(rf"({_ROUTE}?)({_LOCAL}(?:@{_DOMAIN})?)")


def expected_mailbox(path: str) -> str | None:
    """The rules, written independently of the parser: the mailbox, or None if refused."""
    if len(path.encode()) + 2 > 256:
        return None
    match = _MAILBOX.fullmatch(path)
    return match.group(2) if match else None


ALPHABET = st.sampled_from(
    [*"aZ09.@@\"\\[]:,; +'-_", "IPv6:", "ö", "\x00", "\t", "\x7f", "\x85", "<", "例"]
)
paths = st.one_of(
    st.lists(ALPHABET, max_size=24).map("".join),
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        st.lists(ALPHABET, min_size=0, max_size=10).map("".join),
        st.lists(ALPHABET, min_size=0, max_size=10).map("".join),
    ),
    st.integers(240, 270).map(lambda n: "x" * (n - len("<@example.org>")) + "@example.org"),
)


@settings(max_examples=400, deadline=None)
@given(paths)
@example('"a b"@x')
@example("@a,@[IPv6:::1]:u@x")
@example("a\\@x")  # a backslash outside quotes is an ordinary character there
def test_accepted_iff_the_rules(path: str) -> None:
    want = expected_mailbox(path)
    code, answer, events = rcpt(path.encode())
    if want is None:
        assert answer.startswith("501 5.1.3 "), (path, answer)
        assert not [e for e in events if isinstance(e, RcptTo)]
    else:
        assert code == 250, (path, answer)
        assert [e for e in events if isinstance(e, RcptTo)] == [RcptTo(want)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_in_the_path_never_crash(raw: bytes) -> None:
    raw = raw.replace(b"\r", b"").replace(b"\n", b"")
    out = drive([LHLO, MAIL + b"RCPT TO:<" + raw + b">\r\nNOOP\r\n"])
    assert out.codes[-1] == 250  # the session is still usable
    assert out.codes[-2] in (250, 500, 501, 555)


def _plain_with_one_odd(plain: str, odd: str) -> st.SearchStrategy[str]:
    """Text of ``plain`` characters, sometimes with one ``odd`` character put in."""
    text = st.text(st.sampled_from(plain), max_size=70)
    return st.one_of(
        text,
        st.builds(lambda a, c, b: a + c + b, text, st.sampled_from(odd), text),
    )


@settings(max_examples=400, deadline=None)
@given(
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        _plain_with_one_odd("aZ09.-+'!#`{}~", '"@ ö\x00\x7f<>[]:,'),
        _plain_with_one_odd("aZ09.-", "_@[]: ö\x00,;\"\\"),
    )
)
@example("x" * 64 + "@" + "d" * 189)  # the longest the one-step check takes: 256 octets
@example("x" * 65 + "@d")
@example("x@" + "d" * 190)
def test_the_common_address_check_agrees_with_the_rules(path: str) -> None:
    """parse_path decides a plain address in one regex match: same answers as the rules."""
    want = expected_mailbox(path)
    try:
        got: str | None = parse_path(path)
    except AddressError:
        got = None
    assert got == want, path
