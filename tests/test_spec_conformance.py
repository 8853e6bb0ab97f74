"""SPEC sections 2, 3, 5 and 6 checked from outside, the way an operator or an MTA sees them:
one `lmtp-bridge` process started from the command line (file < environment < flags), raw LMTP
over a socket, a real HTTP receiver, /metrics read as Prometheus text.

Each test names the SPEC section or CONFORMANCE.md id it holds the bridge to. The bridge of the
module is shared (one process, to keep CPU use low); every test uses its own recipients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
from bridge_process import (
    HOSTNAME,
    BridgeProcess,
    ServerReply,
    SyncLmtp,
    data_section,
    free_port,
    http_get,
    lmtp_bridge_command,
    message,
    metric_value,
    wait_for,
)
from standardwebhooks import Webhook
from webhook_server import RecordedRequest, WebhookServer

from bridge import __version__
from bridge.config import load_settings
from bridge.config.settings import default_hostname

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MAX_SIZE = 4000  # from the file
MAX_RCPTS = 3  # from the environment (the file says 50)
MAX_CONNECTIONS = 6
IDLE_TIMEOUT = 3
ROUTES = ("json", "raw", "form")
LHLO_KEYWORDS = (
    "PIPELINING",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    f"SIZE {MAX_SIZE}",
    "CHUNKING",
    "SMTPUTF8",
    "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT",
)
# RFC 2034 on every reply but the greeting and LHLO: "NNN x.y.z", the class agreeing
ENHANCED = re.compile(r"^([245])\d\d [245]\.\d{1,3}\.\d{1,3}( |$)")


class Bridge:
    """`lmtp-bridge --config FILE --listen ... --metrics-listen ...` (no `serve`: the bare form),
    with settings from a file, the environment and flags at once."""

    def __init__(self, hook: WebhookServer, workdir: Path) -> None:
        self.hook = hook
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        config = workdir / "bridge.toml"
        routes = "".join(
            f'[[routes]]\nname = "{name}"\nmatch = "@{name}.example"\nurl = "{hook.url}"\n'
            f'payload = "{"multipart" if name == "form" else name}"\n'
            for name in ROUTES
        )
        config.write_text(
            f'hostname = "{HOSTNAME}"\nmax_message_size = {MAX_SIZE}\nmax_recipients = 50\n'
            f"max_connections = {MAX_CONNECTIONS}\nidle_timeout = {IDLE_TIMEOUT}\n"
            f'http_retries = 0\nhttp_timeout = 5\nshutdown_grace = 2\nlisten = ["127.0.0.1:1"]\n'
            + routes
        )
        secret_file = workdir / "secret"
        secret_file.write_text(SECRET + "\n")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LMTP_BRIDGE_")}
        env.update(
            LMTP_BRIDGE_MAX_RECIPIENTS=str(MAX_RCPTS),  # beats the file
            LMTP_BRIDGE_LISTEN=f"127.0.0.1:{free_port()}",  # the flag beats it
            LMTP_BRIDGE_WEBHOOK_SECRET_FILE=str(secret_file),
        )
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [
                *lmtp_bridge_command(),
                "--config",
                str(config),
                "--listen",
                self.address,
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--log-format",
                "json",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the bridge exited {self.process.returncode}:\n{self.log}")
            try:
                return http_get(f"{self.metrics_url}/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 30, "the bridge to become ready")

    def session(self, lhlo: str = "mx.client.test") -> SyncLmtp:
        client = SyncLmtp.connect(self.address)
        client.greet(lhlo)
        return client

    def metrics(self) -> str:
        status, text = http_get(f"{self.metrics_url}/metrics")
        assert status == 200
        return text

    @property
    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def hook() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server
    assert not server.errors, server.errors


@pytest.fixture(scope="module")
def bridge(hook: WebhookServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    running = Bridge(hook, tmp_path_factory.mktemp("spec"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


def replies_to(bridge: Bridge, script: bytes, count: int) -> list[ServerReply]:
    """Greeting, then ``script`` in one write (pipelined); the next ``count`` replies."""
    client = bridge.session()
    try:
        client.send(script)
        return [client.reply() for _ in range(count)]
    finally:
        client.close()


def pairs(replies: list[ServerReply]) -> list[str]:
    return [f"{r.code} {r.status}" for r in replies]


def send_message(
    client: SyncLmtp, sender: str, rcpts: list[str], msg: bytes, accepted: int | None = None
) -> list[ServerReply]:
    """MAIL, RCPTs, DATA, the message; the RCPT replies and then one reply per accepted RCPT."""
    assert client.command(f"MAIL FROM:<{sender}>").code == 250
    rcpt_replies = [client.command(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    accepted = sum(r.code == 250 for r in rcpt_replies) if accepted is None else accepted
    assert client.command("DATA").code == 354
    client.send(data_section(msg))
    return rcpt_replies + [client.reply() for _ in range(accepted)]


def only_request(hook: WebhookServer, rcpt: str) -> RecordedRequest:
    """The one request for ``rcpt`` (a multipart one found by its envelope field)."""

    def found_now() -> list[RecordedRequest]:
        return hook.requests_for(rcpt) or [
            r
            for r in hook.requests
            if r.headers.get("content-type", "").startswith("multipart/")
            and f'"rcpt_to":"{rcpt}"'.encode() in r.body
        ]

    wait_for(found_now, 10, f"the POST for {rcpt}")
    found = found_now()
    assert len(found) == 1, found
    return found[0]


# ---- SPEC 3: greeting, LHLO, HELO/EHLO ------------------------------------------------------


def test_greeting_names_the_host_and_lhlo_lists_the_spec_keywords(bridge: Bridge) -> None:
    """SPEC 3 (L01, L02, L14-L16, X08, X16, X17); SIZE from the file, listen from the flag."""
    client = SyncLmtp.connect(bridge.address)
    greeting = client.reply()
    assert str(greeting) == f"220 {HOSTNAME} LMTP lmtp-bridge ready"
    lhlo = client.command("LHLO mx.client.test")
    assert lhlo.code == 250
    assert lhlo.lines[0] == HOSTNAME
    keywords = lhlo.lines[1:]
    for keyword in LHLO_KEYWORDS:
        assert keyword in keywords, (keyword, keywords)
    assert not any(k.split()[0] == "DSN" for k in keywords), "DSN must not be advertised"
    client.close()


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_helo_and_ehlo_get_500_and_the_session_stays_usable(bridge: Bridge, verb: str) -> None:
    """SPEC 3 / L03: HELO and EHLO get 500; LHLO then works."""
    client = SyncLmtp.connect(bridge.address)
    assert client.reply().code == 220
    refused = client.command(f"{verb} mx.client.test")
    assert refused.code == 500 and refused.status.startswith("5."), str(refused)
    assert client.command("LHLO mx.client.test").code == 250
    client.close()


# ---- SPEC 3: parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mail",
    [
        "MAIL FROM:<a@json.example> SIZE=100",
        "MAIL FROM:<a@json.example> BODY=7BIT",
        "MAIL FROM:<a@json.example> BODY=8BITMIME",
        "MAIL FROM:<a@json.example> BODY=BINARYMIME",
        "MAIL FROM:<a@json.example> SMTPUTF8",
        "MAIL FROM:<> SIZE=100 BODY=8BITMIME SMTPUTF8",
    ],
)
def test_the_mail_parameters_spec_lists_are_accepted(bridge: Bridge, mail: str) -> None:
    """SPEC 3: MAIL FROM:<addr> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8]; RCPT ORCPT."""
    replies = replies_to(
        bridge, f"{mail}\r\nRCPT TO:<p@json.example> ORCPT=rfc822;p@json.example\r\n".encode(), 2
    )
    assert pairs(replies) == ["250 2.1.0", "250 2.1.5"], replies


@pytest.mark.parametrize(
    "script",
    [
        "MAIL FROM:<a@json.example> FOO=1",
        "MAIL FROM:<a@json.example> NOTIFY=NEVER",  # DSN is not advertised
        "MAIL FROM:<a@json.example>\r\nRCPT TO:<p@json.example> FOO=bar",
        "MAIL FROM:<a@json.example>\r\nRCPT TO:<p@json.example> NOTIFY=SUCCESS",
    ],
)
def test_unknown_parameters_get_555_5_5_4(bridge: Bridge, script: str) -> None:
    """SPEC 3 / S14: unknown MAIL or RCPT parameters -> 555 5.5.4, the session goes on."""
    lines = script.split("\r\n")
    replies = replies_to(bridge, (script + "\r\nNOOP\r\n").encode(), len(lines) + 1)
    assert pairs(replies)[-2:] == ["555 5.5.4", "250 2.0.0"], replies


# ---- SPEC 3: every limit answers with its code, and the session stays usable ----------------

LONG_LINE = "NOOP " + "x" * 10_000
LIMITS = {
    "size-at-mail": (f"MAIL FROM:<a@json.example> SIZE={MAX_SIZE + 1}", "552 5.3.4"),
    "too-many-recipients": (
        "MAIL FROM:<a@json.example>\r\n"
        + "".join(f"RCPT TO:<r{i}@json.example>\r\n" for i in range(MAX_RCPTS + 1)).rstrip(),
        "452 4.5.3",
    ),
    "bad-address": ("MAIL FROM:<a@json.example>\r\nRCPT TO:<a b@json.example>", "501 5.1.3"),
    "rcpt-before-mail": ("RCPT TO:<a@json.example>", "503 5.5.1"),
    "data-before-mail": ("DATA", "503 5.5.1"),
    "nested-mail": ("MAIL FROM:<a@json.example>\r\nMAIL FROM:<a@json.example>", "503 5.5.1"),
    "unknown-command": ("FROBNICATE", "500 5.5.1"),
    "over-long-line": (LONG_LINE, "500 5.5.6"),
}


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_limit_answers_with_the_spec_reply_and_the_session_stays_usable(
    bridge: Bridge, name: str
) -> None:
    """SPEC 3 'Limits answer cleanly': the reply of the last command is the SPEC's, and a NOOP
    after it is answered 250 (nothing lost, nothing out of step). The recipient limit comes
    from the environment, which beats the file's 50."""
    script, expected = LIMITS[name]
    count = script.count("\r\n") + 1
    replies = replies_to(bridge, f"{script}\r\nNOOP\r\n".encode(), count + 1)
    assert pairs(replies)[-2:] == [expected, "250 2.0.0"], replies


# CONFORMANCE.md rows, each a pipelined script and the replies it must get, in order
SEQUENCES = {
    "S01-case-insensitive": (
        "mail FROM:<a@json.example> size=10\r\nrcpt to:<s01@json.example>\r\nrset",
        ["250 2.1.0", "250 2.1.5", "250 2.0.0"],
    ),
    "S02-512-octets-fit": ("NOOP " + "a" * 505, ["250 2.0.0"]),
    "S02-513-octets-do-not": ("NOOP " + "a" * 506, ["500 5.5.6"]),
    "S03-long-orcpt": (
        f"MAIL FROM:<a@json.example>\r\nRCPT TO:<s03@json.example> ORCPT=rfc822;{'o' * 500}",
        ["250 2.1.0", "250 2.1.5"],
    ),
    "S12-bad-paths": (
        "MAIL FROM:foo\r\nMAIL TO:<a@json.example>\r\nMAIL FROM:<a@json.example>\r\nRCPT TO:",
        ["501 5.1.3", "501 5.5.2", "250 2.1.0", "501 5.1.3"],
    ),
    "S16-S17-S18-S19-S22": (
        "EXPN x\r\n\r\nRSET x\r\nNOOP hello\r\nVRFY x",
        ["502 5.5.1", "500 5.5.2", "501 5.5.4", "250 2.0.0", "252 2.5.0"],
    ),
    "L05-lhlo-resets": (
        "MAIL FROM:<a@json.example>\r\nRCPT TO:<l05@json.example>\r\nLHLO again\r\nDATA",
        ["250 2.1.0", "250 2.1.5", "250 ", "503 5.5.1"],  # LHLO's 250 has no status code
    ),
    "L08-data-without-rcpt": (
        "MAIL FROM:<a@json.example>\r\nRCPT TO:<l08@unrouted.test>\r\nDATA",
        ["250 2.1.0", "550 5.1.1", "503 5.5.1"],
    ),
    "X01-X02-bad-values": (
        "MAIL FROM:<a@json.example> SIZE=abc\r\nMAIL FROM:<a@json.example> BODY=FOO",
        ["501 5.5.4", "501 5.5.4"],
    ),
    "X07-binarymime-needs-bdat": (
        "MAIL FROM:<a@json.example> BODY=BINARYMIME\r\nRCPT TO:<x07@json.example>\r\nDATA",
        ["250 2.1.0", "250 2.1.5", "503 5.5.1"],
    ),
    "X06-data-after-bdat": (
        "MAIL FROM:<a@json.example>\r\nRCPT TO:<x06@json.example>\r\nBDAT 3\r\nabcDATA\r\nRSET",
        ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.0.0"],
    ),
    "X17-xforward": (
        "XFORWARD ADDR=192.0.2.1 NAME=[UNAVAILABLE]\r\nMAIL FROM:<a@json.example>\r\n"
        "XFORWARD ADDR=192.0.2.2\r\nRSET\r\nXFORWARD FOO=1",
        ["250 2.0.0", "250 2.1.0", "503 5.5.1", "250 2.0.0", "501 5.5.4"],
    ),
}


@pytest.mark.parametrize("row", list(SEQUENCES))
def test_conformance_sequences(bridge: Bridge, row: str) -> None:
    """CONFORMANCE.md 1a-1c rows on the running bridge: replies in order, each as listed."""
    script, expected = SEQUENCES[row]
    replies = replies_to(bridge, f"{script}\r\n".encode(), len(expected))
    assert pairs(replies) == expected, replies


def test_mail_before_lhlo_is_503(bridge: Bridge) -> None:
    """S15: MAIL before LHLO -> 503; LHLO then works."""
    client = SyncLmtp.connect(bridge.address)
    assert client.reply().code == 220
    refused = client.command("MAIL FROM:<a@json.example>")
    assert (refused.code, refused.status) == (503, "5.5.1"), str(refused)
    assert client.command("LHLO mx.client.test").code == 250
    client.close()


def test_every_reply_carries_an_enhanced_status_code_of_its_class(bridge: Bridge) -> None:
    """SPEC 3 'Every reply carries an enhanced status code' (L15, X09), refusals included."""
    script = (
        "MAIL FROM:<a@json.example> FOO=1\r\nRCPT TO:<a@json.example>\r\nMAIL FROM:<>\r\n"
        "RCPT TO:<bad address@json.example>\r\nRCPT TO:<nobody@unrouted.test>\r\nVRFY x\r\n"
        "HELP\r\nRSET\r\nNOOP\r\nXFORWARD ADDR=192.0.2.1\r\nQUIT\r\n"
    )
    client = bridge.session()
    client.send(script)
    replies = [client.reply() for _ in range(script.count("\r\n"))]
    client.close()
    for reply in replies:
        for line in reply.lines:
            assert ENHANCED.match(f"{reply.code} {line}"), str(reply)
            assert line[0] == str(reply.code)[0], str(reply)
    assert pairs(replies)[4:6] == ["550 5.1.1", "252 2.5.0"]  # no route; VRFY


def test_message_over_the_size_limit_gets_552_per_recipient_and_is_not_posted(
    bridge: Bridge, hook: WebhookServer
) -> None:
    """SPEC 3 / L10 / X05: data past SIZE -> 552 5.3.4 once per accepted RCPT (DATA and BDAT),
    the rest is read and discarded, the session is usable, nothing reaches the webhook."""
    rcpts = ["big1@json.example", "big2@json.example"]
    client = bridge.session()
    big = message(body="x" * (MAX_SIZE * 2))
    replies = send_message(client, "a@json.example", rcpts, big)
    assert pairs(replies[2:]) == ["552 5.3.4", "552 5.3.4"], replies
    assert client.command("NOOP").code == 250
    # BDAT: the oversize chunk is consumed, the pipelined LAST chunk is refused until RSET
    assert client.command("MAIL FROM:<a@json.example>").code == 250
    for rcpt in rcpts:
        assert client.command(f"RCPT TO:<{rcpt}>").code == 250
    client.send(f"BDAT {len(big)}\r\n".encode() + big + b"BDAT 5 LAST\r\nhelloNOOP\r\n")
    assert pairs([client.reply() for _ in range(3)]) == ["552 5.3.4", "503 5.5.1", "250 2.0.0"]
    assert client.command("RSET").code == 250
    client.close()
    time.sleep(0.3)
    assert not hook.requests_for(rcpts[0]) and not hook.requests_for(rcpts[1])


def test_idle_session_gets_421_4_4_2_and_is_closed(bridge: Bridge) -> None:
    """SPEC 3: idle timeout -> 421 4.4.2, then close (S25)."""
    client = bridge.session()
    started = time.monotonic()
    reply = client.reply()
    assert (reply.code, reply.status) == (421, "4.4.2"), str(reply)
    assert time.monotonic() - started >= IDLE_TIMEOUT - 0.5
    assert client.at_eof()
    client.close()


def test_too_many_connections_get_421_4_3_2(bridge: Bridge) -> None:
    """SPEC 3: a connection over max_connections -> 421 4.3.2, then close; the slots free up."""
    wait_for(
        lambda: metric_value(bridge.metrics(), "lmtp_bridge_connections_active") == 0,
        10,
        "earlier sessions to end",
    )
    busy = [bridge.session() for _ in range(MAX_CONNECTIONS)]
    for client in busy:  # inside a transaction: none of them may be closed to make room
        assert client.command("MAIL FROM:<a@json.example>").code == 250
    extra = SyncLmtp.connect(bridge.address)
    refused = extra.reply()
    assert (refused.code, refused.status) == (421, "4.3.2"), str(refused)
    assert extra.at_eof()
    extra.close()
    for client in busy:
        client.close()
    wait_for(
        lambda: metric_value(bridge.metrics(), "lmtp_bridge_connections_active") == 0,
        10,
        "the sessions to end",
    )
    bridge.session().close()  # a slot is free again


# ---- SPEC 3: replies after the data ---------------------------------------------------------


def test_one_reply_per_accepted_rcpt_in_order_and_quit_after_them(
    bridge: Bridge, hook: WebhookServer
) -> None:
    """SPEC 3 / L06 / L07 / S21: 3 accepted RCPTs (one given twice) of 4 -> 3 replies in RCPT
    order, each with its delivery id; the duplicate posted once, answered twice; a QUIT pipelined
    after the dot is answered after all of them; SPEC 1: 2xx only after the webhook's 2xx."""
    hook.behave("order-slow@json.example", delay=1.0)
    hook.behave("order-gone@json.example", status=404, body="no such user")
    rcpts = [
        "order-slow@json.example",
        "nobody@unrouted.test",
        "order-gone@json.example",
        "order-slow@json.example",
    ]
    client = bridge.session()
    assert client.command("MAIL FROM:<a@json.example>").code == 250
    assert pairs([client.command(f"RCPT TO:<{r}>") for r in rcpts]) == [
        "250 2.1.5",
        "550 5.1.1",
        "250 2.1.5",
        "250 2.1.5",
    ]
    assert client.command("DATA").code == 354
    client.send(data_section(message()) + b"QUIT\r\n")
    replies = [client.reply() for _ in range(4)]
    assert pairs(replies) == ["250 2.0.0", "550 5.1.1", "250 2.0.0", "221 2.0.0"], replies
    ids = [re.search(r"msg_[a-z0-9]+", r.text) for r in replies[:3]]
    assert all(ids), replies
    assert ids[0] and ids[2] and ids[0].group() == ids[2].group()  # the same copy
    assert "HTTP 404" in replies[1].text and "no such user" in replies[1].text
    assert client.at_eof()
    client.close()
    assert len(hook.requests_for("order-slow@json.example")) == 1
    assert len(hook.requests_for("order-gone@json.example")) == 1
    assert not hook.requests_for("nobody@unrouted.test")


def test_bdat_last_without_an_accepted_rcpt_returns_zero_replies(
    bridge: Bridge, hook: WebhookServer
) -> None:
    """L12: BDAT ... LAST with no successful RCPT returns zero replies; the next reply is the
    NOOP's, and nothing is posted."""
    script = (
        b"MAIL FROM:<a@json.example>\r\nRCPT TO:<zero@unrouted.test>\r\n"
        b"BDAT 5 LAST\r\nhelloNOOP\r\n"
    )
    assert pairs(replies_to(bridge, script, 3)) == ["250 2.1.0", "550 5.1.1", "250 2.0.0"]
    assert not hook.requests_for("zero@unrouted.test")


def test_after_a_refused_data_the_lines_are_commands_and_nothing_is_posted(
    bridge: Bridge, hook: WebhookServer
) -> None:
    """SPEC 3 / L09: DATA refused (no valid RCPT) -> 503; what follows is commands."""
    script = (
        b"MAIL FROM:<a@json.example>\r\nRCPT TO:<l09@unrouted.test>\r\nDATA\r\nFROP!\r\n"
        b"DATA\r\nFROP!\r\n.\r\nQUIT\r\n"
    )
    assert [r.code for r in replies_to(bridge, script, 8)] == [
        250,
        550,
        503,
        500,
        503,
        500,
        500,
        221,
    ]
    assert not hook.requests_for("l09@unrouted.test")


# ---- SPEC 5: the webhook request ------------------------------------------------------------

ENVELOPE_KEYS = {
    "mail_from",
    "rcpt_to",
    "lhlo",
    "client_address",
    "body",
    "smtputf8",
    "size",
    "orcpt",
    "xforward",
    "received_at",
}
MESSAGE_KEYS = {
    "message_id",
    "subject",
    "date",
    "from",
    "to",
    "cc",
    "reply_to",
    "in_reply_to",
    "references",
    "headers",
    "text",
    "html",
    "attachments",
}
ATTACHMENT_KEYS = {"filename", "content_type", "size", "disposition", "content_id"}
XFORWARD = "NAME=mx.sender.test ADDR=192.0.2.7 PORT=4321 PROTO=ESMTP HELO=h.sender.test"
XFORWARD += " SOURCE=REMOTE IDENT=Q1234"

MIME = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
    b"Cc: Carol <carol@example.net>\r\nReply-To: <r@example.org>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\nDate: Sat, 28 Nov 2026 09:59:58 +0100\r\n"
    b"Message-ID: <spec5@example.org>\r\nIn-Reply-To: <prev@example.org>\r\n"
    b"References: <a@example.org> <prev@example.org>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n"
    b"--BB\r\nContent-Type: multipart/alternative; boundary=AA\r\n\r\n"
    b"--AA\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain \xc3\xa9\r\n"
    b"--AA\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n--AA--\r\n"
    b"--BB\r\nContent-Type: application/pdf\r\n"
    b"Content-Disposition: attachment; filename=a.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--BB--\r\n"
)


def deliver_to_pair(bridge: Bridge, sender: str, rcpts: list[str], msg: bytes) -> None:
    """Both recipients in one transaction, after an XFORWARD; both answered 250."""
    client = bridge.session("mx1.example.org")
    assert client.command(f"XFORWARD {XFORWARD}").code == 250
    replies = send_message(client, sender, rcpts, msg)
    assert [r.code for r in replies] == [250] * (2 * len(rcpts)), replies
    client.close()


def assert_signed_and_identified(request: RecordedRequest) -> str:
    """SPEC 5 headers on every request; the delivery id."""
    headers = request.headers
    assert headers["user-agent"] == f"lmtp-bridge/{__version__}"
    did = headers["webhook-id"]
    assert did and headers["idempotency-key"] == did
    assert headers["x-lmtp-bridge-delivery-id"] == did
    assert re.fullmatch(r"v1,\S+( v1,\S+)*", headers["webhook-signature"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
    # HMAC-SHA256 over "<id>.<timestamp>.<body>", keyed with the secret's base64-decoded part
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{did}.{headers['webhook-timestamp']}.".encode() + request.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert expected in headers["webhook-signature"].split(" ")
    if "json" in headers["content-type"]:  # the library parses the body as JSON
        Webhook(SECRET).verify(request.body, dict(headers))  # raises if not verified
    return did


def test_json_request_headers_and_shape_key_by_key(bridge: Bridge, hook: WebhookServer) -> None:
    """SPEC 5: the json payload, version 1, its keys; the null sender is ""; Bcc never leaks:
    the other envelope recipient appears nowhere in this recipient's request."""
    rcpts = ["bob@json.example", "hidden-bcc@json.example"]
    deliver_to_pair(bridge, "", rcpts, MIME)
    request = only_request(hook, rcpts[0])
    other = only_request(hook, rcpts[1])
    assert request.method == "POST" and request.path == "/hook"
    assert request.headers["content-type"].startswith("application/json")
    did = assert_signed_and_identified(request)
    assert assert_signed_and_identified(other) != did  # different recipients, different ids
    assert b"hidden-bcc" not in request.body and "hidden-bcc" not in str(request.headers)
    assert b"bob@json" not in other.body

    body = request.json()
    assert body["version"] == 1 and body["delivery_id"] == did
    envelope, msg = body["envelope"], body["message"]
    assert set(envelope) >= ENVELOPE_KEYS, ENVELOPE_KEYS - set(envelope)
    assert envelope["mail_from"] == ""
    assert envelope["rcpt_to"] == rcpts[0]
    assert envelope["lhlo"] == "mx1.example.org"
    assert envelope["client_address"] == "127.0.0.1"
    assert envelope["smtputf8"] is False and envelope["orcpt"] is None
    assert envelope["xforward"] == {
        "name": "mx.sender.test",
        "addr": "192.0.2.7",
        "port": "4321",
        "proto": "ESMTP",
        "helo": "h.sender.test",
        "source": "REMOTE",
        "ident": "Q1234",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", envelope["received_at"])

    assert set(msg) >= MESSAGE_KEYS, MESSAGE_KEYS - set(msg)
    assert msg["message_id"] == "<spec5@example.org>"
    assert msg["subject"] == "café"
    assert msg["date"] == "2026-11-28T09:59:58+01:00"
    assert msg["from"] == [{"name": "Alice", "address": "alice@example.org"}]
    assert msg["to"] == [{"name": "Bob", "address": "bob@example.net"}]
    assert msg["cc"] == [{"name": "Carol", "address": "carol@example.net"}]
    assert [a["address"] for a in msg["reply_to"]] == ["r@example.org"]
    assert msg["in_reply_to"] == "<prev@example.org>"
    assert msg["references"] == ["<a@example.org>", "<prev@example.org>"]
    assert all(isinstance(h, list) and len(h) == 2 for h in msg["headers"])
    assert ["Message-ID", "<spec5@example.org>"] in msg["headers"]
    assert msg["text"].strip() == "plain é" and msg["html"].strip() == "<p>html</p>"
    (attachment,) = msg["attachments"]
    assert set(attachment) >= ATTACHMENT_KEYS
    assert attachment["filename"] == "a.pdf" and attachment["content_type"] == "application/pdf"
    assert attachment["disposition"] == "attachment" and attachment["content_id"] is None
    assert attachment["size"] == 9 and attachment["content"] == "JVBERi0xLjQK"
    assert "raw" not in body  # only with include_raw


def test_raw_request_headers_and_trace_headers(bridge: Bridge, hook: WebhookServer) -> None:
    """SPEC 5 raw payload: message/rfc822, X-Lmtp-Mail-From, X-Lmtp-Rcpt-To (non-ASCII
    percent-encoded), Return-Path / Delivered-To / Received prepended to the message as it came."""
    rcpts = ["jörg@raw.example", "other-bcc@raw.example"]
    msg = message(subject="raw one", body="line one\r\n..dot stuffed\r\nline three")
    deliver_to_pair(bridge, "alice@example.org", rcpts, msg)
    request = only_request(hook, rcpts[0])
    assert_signed_and_identified(request)
    headers = request.headers
    assert headers["content-type"] == "message/rfc822"
    assert headers["x-lmtp-mail-from"] == "alice@example.org"
    assert headers["x-lmtp-rcpt-to"].isascii()
    assert urllib.parse.unquote(headers["x-lmtp-rcpt-to"]) == rcpts[0]
    assert b"other-bcc" not in request.body
    head, _, rest = request.body.partition(b"From: Alice")
    trace = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b"", b"\t")]
    assert trace == [b"Return-Path", b"Delivered-To", b"Received"], head
    assert head.startswith(b"Return-Path: <alice@example.org>\r\n")
    assert b"From: Alice" + rest == msg  # the message as sent, unstuffed once


def test_multipart_request_fields(bridge: Bridge, hook: WebhookServer) -> None:
    """SPEC 5 multipart: form fields envelope and message (the JSON objects, without attachment
    contents), one file part per attachment."""
    rcpts = ["forms@form.example", "second-bcc@form.example"]
    deliver_to_pair(bridge, "alice@example.org", rcpts, MIME)
    request = only_request(hook, rcpts[0])
    assert_signed_and_identified(request)
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data")
    form: Message = message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + request.body
    )
    fields = {part.get_param("name", header="content-disposition"): part for part in form.walk()}
    envelope = json.loads(fields["envelope"].get_payload(decode=True))
    msg = json.loads(fields["message"].get_payload(decode=True))
    assert set(envelope) >= ENVELOPE_KEYS and envelope["rcpt_to"] == rcpts[0]
    assert set(msg) >= MESSAGE_KEYS and msg["subject"] == "café"
    (attachment,) = msg["attachments"]
    assert "content" not in attachment and attachment["filename"] == "a.pdf"
    files = [p for p in form.walk() if p.get_filename()]
    assert [(p.get_filename(), p.get_content_type()) for p in files] == [
        ("a.pdf", "application/pdf")
    ]
    assert files[0].get_payload(decode=True) == b"%PDF-1.4\n"
    assert b"second-bcc" not in request.body


# ---- SPEC 6: metrics, health, readiness -----------------------------------------------------

# name -> label names (beyond the histogram's le); SPEC 6's list
METRICS: dict[str, set[str]] = {
    "lmtp_bridge_connections_total": set(),
    "lmtp_bridge_connections_active": set(),
    "lmtp_bridge_messages_total": set(),
    "lmtp_bridge_message_size_bytes": set(),
    "lmtp_bridge_message_recipients": set(),
    "lmtp_bridge_recipients_total": {"result", "route", "stage"},
    "lmtp_bridge_replies_total": {"code"},
    "lmtp_bridge_webhook_requests_total": {"route", "status_class"},
    "lmtp_bridge_webhook_request_duration_seconds": {"route"},
    "lmtp_bridge_webhook_requests_in_flight": {"route"},
    "lmtp_bridge_webhook_retries_total": {"route"},
    "lmtp_bridge_protocol_errors_total": {"kind"},
    "lmtp_bridge_ready": set(),
    "lmtp_bridge_build_info": {"version"},
}
HISTOGRAMS = {
    "lmtp_bridge_message_size_bytes",
    "lmtp_bridge_message_recipients",
    "lmtp_bridge_webhook_request_duration_seconds",
}


def test_every_spec_metric_with_its_labels_and_bounded_values(
    bridge: Bridge, hook: WebhookServer
) -> None:
    """SPEC 6: each listed metric exists with the listed labels, pre-initialised per route;
    label values are bounded (route names, 3-digit codes, fixed classes), never an address."""
    from prometheus_client.parser import text_string_to_metric_families

    client = bridge.session()
    send_message(client, "", ["metrics@json.example", "nobody@unrouted.test"], message())
    client.close()
    text = bridge.metrics()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, labels in METRICS.items():
        family_name = name.removesuffix("_total") if name.endswith("_total") else name
        family = families.get(family_name)
        assert family is not None, f"{name} missing"
        samples = [s for s in family.samples if s.name in (name, f"{name}_bucket")]
        assert samples, f"{name} has no samples"
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
        if name in HISTOGRAMS:
            assert family.type == "histogram", name
    recipients = families["lmtp_bridge_recipients"].samples
    assert {s.labels["result"] for s in recipients} == {"delivered", "deferred", "rejected"}
    assert {s.labels["stage"] for s in recipients} == {"rcpt", "data"}
    assert {s.labels["route"] for s in recipients} <= {*ROUTES, "none"}
    for route in ROUTES:  # pre-initialised: a zero, not a gap
        for result in ("delivered", "deferred", "rejected"):
            labels = {"result": result, "route": route, "stage": "data"}
            assert any(s.labels == labels for s in recipients), labels
    rcpt_rejected = {"result": "rejected", "route": "none", "stage": "rcpt"}
    assert metric_value(text, "lmtp_bridge_recipients_total", rcpt_rejected) >= 1
    classes = {s.labels["status_class"] for s in families["lmtp_bridge_webhook_requests"].samples}
    assert classes == {"2xx", "3xx", "4xx", "5xx", "error"}
    codes = {s.labels["code"] for s in families["lmtp_bridge_replies"].samples}
    assert all(re.fullmatch(r"[2-5]\d\d", code) for code in codes), codes
    assert metric_value(text, "lmtp_bridge_build_info", {"version": __version__}) == 1
    assert metric_value(text, "lmtp_bridge_ready") == 1
    assert "@" not in text, "an address in a label"
    assert http_get(f"{bridge.metrics_url}/healthz")[0] == 200
    assert http_get(f"{bridge.metrics_url}/readyz")[0] == 200


# ---- SPEC 2: the command line ---------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("LMTP_BRIDGE_")}
    environ.update(env or {})
    return subprocess.run(
        [*lmtp_bridge_command(), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_version_prints_the_name_and_version() -> None:
    """SPEC 2: `lmtp-bridge --version`."""
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"lmtp-bridge {__version__}"


def test_check_config_is_not_failed_by_kubernetes_service_links() -> None:
    """SPEC 2 check-config exits 0 for a valid config. A Service named lmtp-bridge in the pod's
    namespace makes Kubernetes set LMTP_BRIDGE_SERVICE_HOST, LMTP_BRIDGE_PORT=tcp://... and the
    like in every container: those are no misspelt setting. A real typo still fails."""
    links = {
        "LMTP_BRIDGE_SERVICE_HOST": "10.96.0.12",
        "LMTP_BRIDGE_SERVICE_PORT": "2424",
        "LMTP_BRIDGE_SERVICE_PORT_LMTP": "2424",
        "LMTP_BRIDGE_PORT": "tcp://10.96.0.12:2424",
        "LMTP_BRIDGE_PORT_2424_TCP": "tcp://10.96.0.12:2424",
        "LMTP_BRIDGE_PORT_2424_TCP_PROTO": "tcp",
        "LMTP_BRIDGE_PORT_2424_TCP_PORT": "2424",
        "LMTP_BRIDGE_PORT_2424_TCP_ADDR": "10.96.0.12",
        "LMTP_BRIDGE_METRICS_SERVICE_HOST": "10.96.0.13",
        "LMTP_BRIDGE_METRICS_PORT": "tcp://10.96.0.13:9464",
    }
    done = run_cli("check-config", "--webhook-url", "http://127.0.0.1:9/hook", env=links)
    assert done.returncode == 0, done.stderr
    assert "unknown environment variable" not in done.stderr
    typo = run_cli(
        "check-config",
        "--webhook-url",
        "http://127.0.0.1:9/hook",
        env={**links, "LMTP_BRIDGE_PORT": "2424", "LMTP_BRIDGE_HTTP_TIMOUT": "5"},
    )
    assert typo.returncode == 2
    named = [line for line in typo.stderr.splitlines() if "unknown environment variable" in line]
    assert len(named) == 2 and "LMTP_BRIDGE_PORT:" in typo.stderr, typo.stderr
    assert "LMTP_BRIDGE_HTTP_TIMOUT" in typo.stderr


@pytest.mark.parametrize(
    ("fqdn", "name", "expected"),
    [
        ("mx1.example.org", "mx1", "mx1.example.org"),  # getfqdn found the FQDN
        ("localhost", "vm", "vm"),  # /etc/hosts: "127.0.0.1 localhost vm"
        ("localhost.localdomain", "mx2.example.org", "mx2.example.org"),
        ("localhost", "localhost", "localhost"),  # nothing better to say
    ],
)
def test_default_hostname_is_the_hosts_name_not_localhost(
    monkeypatch: pytest.MonkeyPatch, fqdn: str, name: str, expected: str
) -> None:
    """SPEC 2: LMTP_BRIDGE_HOSTNAME defaults to the host's FQDN (greeting, Received lines);
    socket.getfqdn() says "localhost" when /etc/hosts lists the host's name after it."""
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: name)
    assert default_hostname() == expected
    assert load_settings(overrides={"webhook_url": "http://127.0.0.1:9/"}, environ={}).hostname == (
        expected
    )


def test_send_takes_the_null_sender_written_in_brackets(
    bridge: Bridge, hook: WebhookServer
) -> None:
    """SPEC 2 `lmtp-bridge send --from ADDR`: `--from '<>'` (as swaks writes it) is the null
    sender, delivered with mail_from "" (SPEC 5), not refused as `<<>>`."""
    done = subprocess.run(
        [
            *lmtp_bridge_command(),
            "send",
            "--server",
            bridge.address,
            "--from",
            "<>",
            "--to",
            "<send-null@json.example>",
            "-",
        ],
        input="Subject: null sender\n\nbody\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "250 2.0.0" in done.stdout
    assert only_request(hook, "send-null@json.example").json()["envelope"]["mail_from"] == ""


# ---- SPEC 6: a delivery cut by the grace period ----------------------------------------------


def test_a_delivery_cut_by_the_grace_is_451_and_logged_like_any_outcome() -> None:
    """SPEC 6: a delivery cut off by the grace period is a 451 (never a 250), counted, and has
    its one structured log line (delivery id, route, reply) like every recipient outcome."""
    with WebhookServer() as hook:
        hook.behave("stuck@example.org", hang=True)
        env = {"LMTP_BRIDGE_SHUTDOWN_GRACE": "1", "LMTP_BRIDGE_HTTP_TIMEOUT": "30"}
        with BridgeProcess(hook.url, env) as bridge:
            bridge.wait_ready()
            client = SyncLmtp.connect(bridge.address)
            client.greet()
            replies = send_message(client, "a@example.org", ["stuck@example.org"], message(), 0)
            assert [r.code for r in replies] == [250]
            wait_for(lambda: hook.requests_for("stuck@example.org"), what="the POST")
            did = hook.requests_for("stuck@example.org")[0].headers["webhook-id"]
            bridge.sigterm()
            cut = client.reply()
            assert (cut.code, cut.status[:2]) == (451, "4."), str(cut)
            assert bridge.wait(15) == 0, bridge.log
            lines = [json.loads(line) for line in bridge.log.splitlines() if line.startswith("{")]
            outcome = [line for line in lines if line.get("delivery_id") == did]
            assert len(outcome) == 1, bridge.log
            assert outcome[0]["msg"] == "recipient deferred"
            assert outcome[0]["route"] == "default" and outcome[0]["reply"].startswith("451 ")


def test_a_recipient_refused_at_rcpt_has_its_outcome_log_line(bridge: Bridge) -> None:
    """SPEC 6: one structured line per recipient outcome, also for one the bridge decides at RCPT
    (here: no route, 550 5.1.1); the address only at DEBUG or with log_addresses."""
    script = b"MAIL FROM:<a@json.example>\r\nRCPT TO:<logged-refusal@unrouted.test>\r\n"
    assert pairs(replies_to(bridge, script, 2)) == ["250 2.1.0", "550 5.1.1"]

    def refusals() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in bridge.log.splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("stage") == "rcpt" and "reply" in line]

    found = wait_for(refusals, 10, "the refusal's log line")
    assert found[-1]["msg"] == "recipient rejected"
    assert found[-1]["route"] == "none"
    assert str(found[-1]["reply"]).startswith("550 5.1.1")
    assert "logged-refusal" not in bridge.log  # INFO level, log_addresses off


def test_bridge_log_has_no_traceback(bridge: Bridge) -> None:
    """Nothing the tests above sent made the shared bridge log a traceback."""
    assert "Traceback" not in bridge.log, bridge.log[-4000:]
