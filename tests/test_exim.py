"""Exim 4.96 (Debian) as the real BDAT client (CONFORMANCE L11, L12, X04, X05, X08, I12).

Exim's smtp transport with ``protocol = lmtp`` uses BDAT whenever CHUNKING is offered: it writes
MAIL, the RCPTs, ``BDAT n LAST`` with the data and QUIT in one go, half-closes, then reads one
reply per accepted recipient (messages of about 8 KiB and more go as two chunks). Its main log
says what happened to each recipient: ``=>``/``->`` delivered, ``**`` failed, ``==`` deferred.

scripts/exim/setup.sh unpacks the Debian package privately (it is never installed as the MTA:
that would remove Postfix); the fixture runs it, so CI needs nothing else. Needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from bridge_process import StartBridge, message, split_hostport
from webhook_server import WebhookServer

pytestmark = pytest.mark.peer

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "exim" / "setup.sh"
EXIM_DIR = os.environ.get("LMTP_BRIDGE_EXIM_DIR", "/tmp/lmtp-bridge-exim")
FLAGS = {"=>": "delivered", "->": "delivered", "**": "failed", "==": "deferred"}
LOGLINE = re.compile(
    r"^\S+ \S+ \[\d+\] (?P<id>\S+) (?P<flag>=>|->|\*\*|==) (?P<rcpt>\S+) (?P<rest>.*)$"
)
REPLY = re.compile(r'(?: C="|: )(\d{3}[ -].*?)(?:" QT=| DT=|$)')


@pytest.fixture(scope="module")
def exim() -> str:
    """The unpacked exim4 binary (set up on first use; a failure fails the tests)."""
    if os.geteuid() != 0:
        pytest.fail("the Exim tests run Exim as root (as CI does)")
    run = subprocess.run(["bash", str(SETUP), EXIM_DIR], capture_output=True, text=True)
    assert run.returncode == 0, f"scripts/exim/setup.sh failed:\n{run.stdout}\n{run.stderr}"
    return os.path.join(EXIM_DIR, "root/usr/sbin/exim4")


@dataclass
class Delivery:
    outcome: dict[str, tuple[str, str]]  # rcpt -> (delivered|failed|deferred, reply text)
    log: str
    transcript: str


async def exim_deliver(
    exim: str, address: str, rcpts: list[str], msg: bytes, *options: str
) -> Delivery:
    host, port = split_hostport(address)
    work = tempfile.mkdtemp(prefix="exim-lmtp-")
    try:
        shutil.chown(work, "Debian-exim", "Debian-exim")
        command = [
            *(exim, "-C", os.path.join(EXIM_DIR, "exim.conf"), f"-DWORK={work}"),
            *(f"-DLMTP_PORT={port}", f"-DLMTP_HOST={host}", *options),
            *("-v", "-odi", "-f", "sender@exim-client.test", *rcpts),
        ]
        with trio.fail_after(60):
            run = await trio.run_process(
                command, stdin=msg, capture_stdout=True, capture_stderr=True, check=False
            )
        transcript = (run.stdout + run.stderr).decode("utf-8", "replace")
        log_path = trio.Path(work, "log", "mainlog")
        log = await log_path.read_text(errors="replace") if await log_path.exists() else ""
        outcome = {}
        for line in log.splitlines():
            match = LOGLINE.match(line)
            if match is None or " R=lmtp_out " not in f" {match['rest']}":
                continue
            reply = REPLY.search(match["rest"])
            outcome[match["rcpt"]] = (FLAGS[match["flag"]], reply[1] if reply else match["rest"])
        return Delivery(outcome, log, transcript)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def assert_clean(delivery: Delivery) -> None:
    """No timeouts, no lost connections: the reply count matched what Exim expected."""
    text = delivery.log + delivery.transcript
    for trouble in ("timed out", "closed connection", "Connection reset", "unexpected"):
        assert trouble not in text, delivery.transcript


async def test_L11_I12_exim_bdat_multi_recipient_mixed_outcomes(
    exim: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(payload="raw")
    webhook_server.behave("later@example.org", status=503)
    webhook_server.behave("gone@example.org", status=404)
    msg = message(subject="from exim").replace(b"\r\n", b"\n")
    rcpts = ["ok@example.org", "later@example.org", "gone@example.org", "ok2@example.org"]
    result = await exim_deliver(exim, running.lmtp_addresses[0], rcpts, msg)

    assert "will write message using CHUNKING" in result.transcript, result.transcript
    assert re.search(r"SMTP\+> BDAT \d+ LAST", result.transcript), result.transcript
    assert {r: o[0] for r, o in result.outcome.items()} == {
        "ok@example.org": "delivered",
        "later@example.org": "deferred",
        "gone@example.org": "failed",
        "ok2@example.org": "delivered",
    }, result.log
    assert result.outcome["later@example.org"][1].startswith("451 4.3.0")
    assert result.outcome["gone@example.org"][1].startswith("550 5.1.1")
    assert " K " in result.log or " K C=" in result.log  # Exim's flag: CHUNKING was used
    assert_clean(result)
    # every copy is the message Exim sent, byte for byte after its own trace header
    for request in webhook_server.requests:
        assert request.body.endswith(msg.replace(b"\n", b"\r\n")), request.body[-200:]


async def test_L11_X04_exim_big_message_goes_as_two_chunks(
    exim: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(payload="raw")
    body = "".join(f".line {i} with a leading dot and \u00e9\n" for i in range(8000))
    msg = message(subject="big").replace(b"\r\n", b"\n") + body.encode()
    rcpts = ["a@example.org", "b@example.org"]
    result = await exim_deliver(exim, running.lmtp_addresses[0], rcpts, msg)

    chunks = re.findall(r"SMTP\+?>+ BDAT (\d+)( LAST)?", result.transcript)
    assert len(chunks) == 2 and chunks[-1][1] == " LAST", result.transcript
    assert {r: o[0] for r, o in result.outcome.items()} == dict.fromkeys(rcpts, "delivered")
    assert_clean(result)
    assert len(webhook_server.requests) == 2
    for request in webhook_server.requests:
        assert request.body.endswith(msg.replace(b"\n", b"\r\n"))


async def test_L12_X05_exim_pipelined_bdat_with_no_accepted_recipient(
    exim: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """Every RCPT refused (no route): the pipelined BDAT gets no per-recipient reply, its octets
    are consumed, and Exim's QUIT still parses; Exim logs the two RCPT failures."""
    running = await start_bridge(
        webhook_url=None,
        routes=[{"name": "ours", "match": "@example.org", "url": webhook_server.url}],
    )
    rcpts = ["nobody@other.test", "nobody2@other.test"]
    result = await exim_deliver(exim, running.lmtp_addresses[0], rcpts, message())
    assert {r: o[0] for r, o in result.outcome.items()} == dict.fromkeys(rcpts, "failed")
    assert all(o[1].startswith("550 5.1.1") for o in result.outcome.values()), result.log
    assert_clean(result)
    assert webhook_server.requests == []


async def test_L10_X01_exim_message_over_the_size_limit_fails_for_every_recipient(
    exim: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(max_message_size=4000)
    msg = message(body="y" * 70 + "\n" + ("z" * 70 + "\n") * 200).replace(b"\r\n", b"\n")
    rcpts = ["a@example.org", "b@example.org"]
    result = await exim_deliver(exim, running.lmtp_addresses[0], rcpts, msg)
    assert {r: o[0] for r, o in result.outcome.items()} == dict.fromkeys(rcpts, "failed")
    assert all("552" in o[1] for o in result.outcome.values()), result.log
    assert_clean(result)
    assert webhook_server.requests == []


async def test_exim_without_chunking_uses_data(
    exim: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    rcpts = ["a@example.org", "b@example.org"]
    result = await exim_deliver(exim, running.lmtp_addresses[0], rcpts, message(), "-DNOCHUNK")
    assert "BDAT" not in result.transcript
    assert {r: o[0] for r, o in result.outcome.items()} == dict.fromkeys(rcpts, "delivered")
    assert_clean(result)
    assert len(webhook_server.requests) == 2


# What real mailboxes use: whatever Exim forwards, the bridge must accept (a refusal would
# bounce real mail). Exim quotes local parts that are not dot-atoms itself.
ODD_ADDRESSES = [
    "o'brien@example.org",
    "bob+tag@example.org",
    "!#$%&*=?^_`{|}~-@example.org",
    '"a b"@example.org',
    '"a@b"@example.org',
    "a..b@example.org",
    "trailing.@example.org",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "jörg@example.org",
]


async def test_exim_forwards_odd_but_real_addresses_and_the_bridge_takes_them(
    exim: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    result = await exim_deliver(exim, running.lmtp_addresses[0], ODD_ADDRESSES, message())
    assert_clean(result)
    # (the log parser takes the first word of `a b@example.org <"a b"@example.org>`: count them)
    assert [o[0] for o in result.outcome.values()] == ["delivered"] * len(ODD_ADDRESSES)
    # Exim sends the legacy dot forms unquoted (a..b@, trailing.@) and the IPv6 tag as given
    assert sorted(r.rcpt or "" for r in webhook_server.requests) == sorted(ODD_ADDRESSES)
