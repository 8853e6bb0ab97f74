"""Real LMTP clients against the running bridge: swaks, Postfix's smtp-source, smtplib.LMTP and
our own `lmtp-bridge send`, each checked reply by reply against a real webhook server.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
import trio
from bridge_process import (
    BridgeProcess,
    StartBridge,
    data_section,
    free_port,
    lmtp_bridge_command,
    message,
    short_tempdir,
    split_hostport,
    tool,
)
from webhook_server import WebhookServer

# swaks marks server lines "<-" (2xx/3xx) or "<**" (4xx/5xx); "<~"/"<~*" under TLS.
SWAKS_REPLY = re.compile(r"^<(?:-|\*\*|~|~\*) +(\d{3})([ -])(.*)$")

MIXED = {"a@x.test": 200, "b@x.test": 503, "c@x.test": 404, "d@x.test": 200}
MIXED_REPLIES = ["250 2.0.0", "451 4.3.0", "550 5.1.1", "250 2.0.0"]


def swaks_data_replies(transcript: str) -> list[str]:
    """The replies swaks read after the final dot, as "<code> <enhanced code>"."""
    lines = transcript.splitlines()
    start = lines.index(" -> .") + 1
    replies = []
    for line in lines[start:]:
        if line.startswith(" -> "):  # the next command (QUIT): the data replies are over
            break
        match = SWAKS_REPLY.match(line)
        if match and match.group(2) == " ":
            replies.append(f"{match.group(1)} {match.group(3).split(' ', 1)[0]}")
    return replies


async def run_client(args: list[str], stdin: bytes = b"", limit: float = 60) -> tuple[int, str]:
    """Run a client program (the event loop keeps serving the bridge meanwhile)."""
    with trio.fail_after(limit):
        done = await trio.run_process(
            args, stdin=stdin, capture_stdout=True, stderr=subprocess.STDOUT, check=False
        )
    return done.returncode, done.stdout.decode("utf-8", "replace")


def program(webhook_server: WebhookServer, statuses: dict[str, int]) -> None:
    for rcpt, status in statuses.items():
        webhook_server.behave(rcpt, status=status, body=f"webhook says {status}")


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- swaks ------------------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("mode", ["tcp", "pipeline", "unix"])
async def test_swaks_reads_one_reply_per_recipient(
    mode: str, start_bridge: StartBridge, webhook_server: WebhookServer, socket_dir: str
) -> None:
    swaks = tool("swaks")
    program(webhook_server, MIXED)
    if mode == "unix":
        path = os.path.join(socket_dir, "lmtp.sock")
        running = await start_bridge(listen=[f"unix:{path}"])
        assert running.lmtp_addresses == [f"unix:{path}"]
        where = ["--socket", path]
    else:
        running = await start_bridge()
        where = ["--server", running.lmtp_addresses[0]]
    extra = ["--pipeline"] if mode == "pipeline" else []

    _, transcript = await run_client(
        [swaks, "--protocol", "LMTP", *where, *extra, "--to", ",".join(MIXED)]
    )

    assert swaks_data_replies(transcript) == MIXED_REPLIES, transcript
    assert "<-  221 " in transcript, transcript  # QUIT got its own answer, in step
    assert sorted(r.rcpt or "" for r in webhook_server.requests) == sorted(MIXED)


@pytest.mark.peer
async def test_swaks_null_sender_arrives_as_empty_mail_from(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    swaks = tool("swaks")
    running = await start_bridge()
    returncode, transcript = await run_client(
        [
            swaks,
            "--protocol",
            "LMTP",
            "--server",
            running.lmtp_addresses[0],
            "--from",
            "<>",
            "--to",
            "bounce-target@x.test",
            "--header",
            "Subject: Delivery Status Notification",
        ]
    )

    assert returncode == 0, transcript
    assert " -> MAIL FROM:<>" in transcript
    assert swaks_data_replies(transcript) == ["250 2.0.0"]
    (request,) = webhook_server.requests
    payload = request.json()
    assert payload["envelope"]["mail_from"] == ""
    assert payload["envelope"]["rcpt_to"] == "bounce-target@x.test"
    assert payload["message"]["subject"] == "Delivery Status Notification"


# ---- smtplib.LMTP -----------------------------------------------------------------------------


def smtplib_send(address: str, rcpt: str, msg: EmailMessage) -> dict[str, tuple[int, bytes]]:
    host, port = split_hostport(address)
    with smtplib.LMTP(host, port, timeout=15) as client:
        return client.send_message(msg, from_addr="alice@example.org", to_addrs=[rcpt])


def email(subject: str, text: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg.set_content(text)
    return msg


async def test_smtplib_single_recipient(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    msg = email("Größe matters", "Hello Bob,\n.a line that starts with a dot\n")

    refused = await trio.to_thread.run_sync(
        smtplib_send, running.lmtp_addresses[0], "bob@example.org", msg
    )

    assert refused == {}
    (request,) = webhook_server.requests
    payload = request.json()
    assert payload["envelope"]["rcpt_to"] == "bob@example.org"
    assert payload["envelope"]["mail_from"] == "alice@example.org"
    assert payload["message"]["subject"] == "Größe matters"
    # line ends as sent on the wire (CRLF) or as \n: both read the same to a receiver
    text = payload["message"]["text"].replace("\r\n", "\n")
    assert text == "Hello Bob,\n.a line that starts with a dot\n"


async def test_smtplib_sees_a_webhook_503_as_451(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    webhook_server.behave("bob@example.org", status=503, body="maintenance")

    with pytest.raises(smtplib.SMTPDataError) as failure:
        await trio.to_thread.run_sync(
            smtplib_send, running.lmtp_addresses[0], "bob@example.org", email("s", "t")
        )

    error: str | bytes = failure.value.smtp_error  # bytes at run time, whatever the stubs say
    text = error.decode() if isinstance(error, bytes) else error
    assert failure.value.smtp_code == 451
    assert text.startswith("4.3.0 ")
    (request,) = webhook_server.requests
    assert text == f"4.3.0 deferred {request.headers['webhook-id']} (HTTP 503): maintenance"


def smtplib_multi(address: str, rcpts: list[str], raw: bytes) -> tuple[list[int], list[int], int]:
    """The LMTP exchange smtplib can do, done right: one getreply() per accepted RCPT."""
    host, port = split_hostport(address)
    with smtplib.LMTP(host, port, timeout=15) as client:
        assert client.ehlo("client.test")[0] == 250  # smtplib.LMTP sends LHLO here
        assert client.mail("alice@example.org")[0] == 250
        rcpt_codes = [client.rcpt(r)[0] for r in rcpts]
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(data_section(raw))
        data_codes = [client.getreply()[0] for code in rcpt_codes if code == 250]
        noop = client.noop()[0]  # answered in step: no reply was left unread
    return rcpt_codes, data_codes, noop


async def test_smtplib_multi_recipient_reads_every_reply(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    program(webhook_server, MIXED)

    rcpt_codes, data_codes, noop = await trio.to_thread.run_sync(
        smtplib_multi, running.lmtp_addresses[0], list(MIXED), message()
    )

    assert rcpt_codes == [250] * 4
    assert data_codes == [250, 451, 550, 250]
    assert noop == 250


# ---- smtp-source (Postfix) against a subprocess bridge --------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize(
    ("flags", "recipients"), [([], 1), (["-d"], 1), (["-r", "3"], 3)], ids=["r1", "reuse", "r3"]
)
def test_smtp_source_load(flags: list[str], recipients: int, webhook_server: WebhookServer) -> None:
    smtp_source = tool("smtp-source")
    messages = 300
    with BridgeProcess(webhook_server.url) as bridge:
        bridge.wait_ready()
        done = subprocess.run(
            [
                *(smtp_source, "-L", "-s", "5", "-m", str(messages), *flags),
                *("-f", "sender@example.org", "-t", "rcpt@example.org", bridge.address),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (done.stderr, bridge.log[-3000:])

    requests = webhook_server.requests
    assert len(requests) == messages * recipients
    rcpts = set()
    for request in requests:
        payload = request.json()
        assert payload["version"] == 1
        assert payload["envelope"]["mail_from"] == "sender@example.org"
        assert payload["delivery_id"] == request.headers["webhook-id"]
        rcpts.add(payload["envelope"]["rcpt_to"])
    assert len(rcpts) >= recipients
    # each message is posted once per recipient: the ids never repeat
    assert len({r.headers["webhook-id"] for r in requests}) == len(requests)


# ---- lmtp-bridge send -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "exit_code"),
    [
        ({"a@x.test": 200, "b@x.test": 200}, 0),
        ({"a@x.test": 200, "b@x.test": 503}, 75),
        ({"a@x.test": 503, "b@x.test": 404}, 1),
    ],
    ids=["delivered", "deferred", "refused"],
)
async def test_lmtp_bridge_send_cli(
    statuses: dict[str, int],
    exit_code: int,
    start_bridge: StartBridge,
    webhook_server: WebhookServer,
) -> None:
    running = await start_bridge()
    program(webhook_server, statuses)
    args = [*lmtp_bridge_command(), "send", "--server", running.lmtp_addresses[0]]
    for rcpt in statuses:
        args += ["--to", rcpt]

    returncode, output = await run_client([*args, "-"], stdin=message(subject="from send"))

    assert returncode == exit_code, output
    lines = output.splitlines()
    assert len(lines) == len(statuses), output
    expected = {200: "250 2.0.0", 503: "451 4.3.0", 404: "550 5.1.1"}
    for line, (rcpt, status) in zip(lines, statuses.items(), strict=True):
        assert line.startswith(f"{rcpt}: {expected[status]} "), output
    assert {r.json()["message"]["subject"] for r in webhook_server.requests} == {"from send"}


async def test_lmtp_bridge_send_cli_without_server_exits_1() -> None:
    args = [*lmtp_bridge_command(), "send", "--server", f"127.0.0.1:{free_port()}"]
    returncode, output = await run_client([*args, "--to", "a@x.test", "-"], stdin=message())
    assert returncode == 1
    assert output.startswith("lmtp-bridge send: "), output
