"""Recipient verification at RCPT through the running bridge (SPEC 7): a pipelined session,
smtplib.LMTP and swaks as the clients, one real HTTP receiver for the verify questions and
another for the deliveries."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
import trio
from bridge_process import (
    StartBridge,
    codes,
    data_section,
    free_port,
    message,
    metric_value,
    metrics_text,
    open_session,
    split_hostport,
    tool,
)
from standardwebhooks import Webhook
from webhook_server import WebhookServer

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def verify_server() -> Iterator[WebhookServer]:
    """The verify webhook: 404 "no such mailbox" for everyone not programmed with 200."""
    with WebhookServer() as server:
        server.behave("*", status=404, body="no such mailbox")
        for known in ("bob@example.org", "carol@example.org"):
            server.behave(known, status=200)
        yield server
    assert not server.errors


def verify_url(server: WebhookServer) -> str:
    return server.base_url + "/verify"


def questions(server: WebhookServer) -> list[str]:
    return [r.json()["rcpt"] for r in server.requests]


async def test_pipelined_rcpts_are_verified_and_answered_in_order(
    start_bridge: StartBridge, webhook_server: WebhookServer, verify_server: WebhookServer
) -> None:
    running = await start_bridge(verify_url=verify_url(verify_server), webhook_secret=[SECRET])
    before = await metrics_text(running)  # the registry is shared by this process's bridges
    client = await open_session(running)
    rcpts = ["bob@example.org", "nobody@example.org", "carol@example.org", "nobody@example.org"]
    # one write: MAIL, four RCPTs, DATA and the message, as a pipelining client sends them
    await client.send(
        "MAIL FROM:<alice@example.org>\r\n"
        + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts)
        + "DATA\r\n"
    )
    await client.send(data_section(message()))
    replies = [await client.reply() for _ in range(1 + len(rcpts) + 1 + 2)]
    assert codes(replies) == [
        "250 2.1.0",
        "250 2.1.5",
        "550 5.1.1",
        "250 2.1.5",
        "550 5.1.1",
        "354 ",
        "250 2.0.0",
        "250 2.0.0",
    ]
    assert "webhook answered HTTP 404: no such mailbox" in replies[2].text
    # deliveries for the verified recipients only; the refused one asked once (then cached)
    assert sorted(r.rcpt or "" for r in webhook_server.requests) == [
        "bob@example.org",
        "carol@example.org",
    ]
    assert questions(verify_server) == [
        "bob@example.org",
        "nobody@example.org",
        "carol@example.org",
    ]
    for question in verify_server.requests:  # signed like deliveries
        assert Webhook(SECRET).verify(question.body, dict(question.headers))["mail_from"] == (
            "alice@example.org"
        )

    text = await metrics_text(running)

    def counted(name: str, labels: dict[str, str]) -> float:
        return metric_value(text, name, labels) - metric_value(before, name, labels)

    series = {"route": "default"}
    assert counted("lmtp_bridge_verify_requests_total", series | {"result": "accepted"}) == 2
    assert counted("lmtp_bridge_verify_requests_total", series | {"result": "refused"}) == 1
    assert counted("lmtp_bridge_verify_cache_total", series | {"hit": "true"}) == 1
    assert counted("lmtp_bridge_verify_cache_total", series | {"hit": "false"}) == 3
    # refused at RCPT counts in the main SLI too, at stage rcpt; the deliveries at stage data
    rejected = series | {"result": "rejected", "stage": "rcpt"}
    assert counted("lmtp_bridge_recipients_total", rejected) == 2
    delivered = series | {"result": "delivered", "stage": "data"}
    assert counted("lmtp_bridge_recipients_total", delivered) == 2


def smtplib_send(address: str, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = "verify"
    msg.set_content("Hello.\n")
    host, port = split_hostport(address)
    with smtplib.LMTP(host, port, timeout=15) as client:
        return client.send_message(msg, from_addr="alice@example.org", to_addrs=rcpts)


async def test_smtplib_learns_at_rcpt_that_a_recipient_does_not_exist(
    start_bridge: StartBridge, webhook_server: WebhookServer, verify_server: WebhookServer
) -> None:
    running = await start_bridge(verify_url=verify_url(verify_server))
    address = running.lmtp_addresses[0]
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await trio.to_thread.run_sync(smtplib_send, address, ["ghost@example.org"])
    code, text = refused.value.recipients["ghost@example.org"]
    assert code == 550 and text.startswith(b"5.1.1")
    assert webhook_server.requests == []  # no DATA, no delivery

    assert await trio.to_thread.run_sync(smtplib_send, address, ["bob@example.org"]) == {}
    assert [r.rcpt for r in webhook_server.requests] == ["bob@example.org"]


@pytest.mark.parametrize("on_error", ["accept", "defer"])
async def test_verify_on_error_with_a_verify_webhook_that_is_down(
    start_bridge: StartBridge, webhook_server: WebhookServer, on_error: str
) -> None:
    port = free_port()  # nothing listens there: connections are refused
    running = await start_bridge(
        verify_url=f"http://127.0.0.1:{port}/verify", verify_on_error=on_error
    )
    client = await open_session(running)
    assert (await client.command("MAIL FROM:<alice@example.org>")).code == 250
    reply = await client.command("RCPT TO:<bob@example.org>")
    if on_error == "defer":
        assert (reply.code, reply.status) == (451, "4.4.1")
        assert reply.text == "4.4.1 recipient verification failed: webhook connection refused"
        return
    assert (reply.code, reply.status) == (250, "2.1.5")
    assert "not verified" in reply.text
    assert (await client.command("DATA")).code == 354
    await client.send(data_section(message()))
    assert (await client.reply()).code == 250  # the delivery decided
    text = await metrics_text(running)
    labels = {"route": "default", "result": "error"}
    assert metric_value(text, "lmtp_bridge_verify_requests_total", labels) == 1


async def test_routes_use_their_own_verify_url_or_the_global_one(
    start_bridge: StartBridge, webhook_server: WebhookServer, verify_server: WebhookServer
) -> None:
    with WebhookServer() as own:
        own.behave("*", status=410, body="gone")
        running = await start_bridge(
            verify_url=verify_url(verify_server),
            routes=[
                {"name": "own", "match": "@own.test", "url": webhook_server.url,
                 "verify_url": own.base_url + "/v"},
                {"name": "inherits", "match": "@example.org", "url": webhook_server.url},
            ],
        )  # fmt: skip
        client = await open_session(running)
        assert (await client.command("MAIL FROM:<alice@example.org>")).code == 250
        first = await client.command("RCPT TO:<bob@own.test>")
        second = await client.command("RCPT TO:<bob@example.org>")
        assert (first.code, second.code) == (550, 250)
        assert [r.json()["route"] for r in own.requests] == ["own"]
        assert [r.json()["route"] for r in verify_server.requests] == ["inherits"]


async def test_swaks_pipelining_through_verification(
    start_bridge: StartBridge, webhook_server: WebhookServer, verify_server: WebhookServer
) -> None:
    running = await start_bridge(verify_url=verify_url(verify_server))
    host, port = split_hostport(running.lmtp_addresses[0])
    argv = [
        tool("swaks"), "--protocol", "LMTP", "--pipeline", "--server", host, "--port", str(port),
        "--from", "alice@example.org", "--to", "bob@example.org,ghost@example.org",
        "--helo", "client.test", "--timeout", "20",
    ]  # fmt: skip
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60)
    )
    transcript = result.stdout
    assert "<** 550 5.1.1" in transcript, transcript  # ghost refused at RCPT
    assert [r.rcpt for r in webhook_server.requests] == ["bob@example.org"]
