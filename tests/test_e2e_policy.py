"""End to end through the running bridge: the circuit breaker at RCPT, URL templates and
plus-addressing, message.auth, trace headers off, and a 20 MiB attachment.

Each test runs the bridge in-process (trio, port 0) against tests/webhook_server.py.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import os
import urllib.parse

import trio
from bridge_process import (
    AsyncLmtp,
    ServerReply,
    StartBridge,
    codes,
    data_section,
    message,
    metric_value,
    metrics_text,
    open_session,
)
from webhook_server import WebhookServer

RECIPIENTS = "lmtp_bridge_recipients_total"


async def transaction(
    client: AsyncLmtp, recipients: list[str], msg: bytes
) -> tuple[list[ServerReply], list[ServerReply]]:
    """MAIL, RCPTs, and (when any was accepted) the data: (RCPT replies, replies after the dot)."""
    assert (await client.command("MAIL FROM:<alice@example.org>")).code == 250
    rcpt_replies = [await client.command(f"RCPT TO:<{r}>") for r in recipients]
    accepted = sum(1 for r in rcpt_replies if r.code == 250)
    if not accepted:
        assert (await client.command("RSET")).code == 250
        return rcpt_replies, []
    assert (await client.command("DATA")).code == 354
    await client.send(data_section(msg))
    return rcpt_replies, [await client.reply() for _ in range(accepted)]


async def test_circuit_breaker_defers_at_rcpt_then_probes_and_closes(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    cooldown = 0.5
    running = await start_bridge(
        routes=[{"name": "hooks", "match": "@example.org", "url": webhook_server.url}],
        breaker_threshold=2,
        breaker_cooldown=cooldown,
    )
    webhook_server.behave("*", status=503, body="down for maintenance")
    client = await open_session(running)
    before = await metrics_text(running)  # metrics are the process's: compare, never absolute

    def moved(text: str, **labels: str) -> float:
        return metric_value(text, RECIPIENTS, labels) - metric_value(before, RECIPIENTS, labels)

    # Two retryable failures in a row open the breaker ...
    for rcpt in ("a@example.org", "b@example.org"):
        rcpt_replies, after = await transaction(client, [rcpt], message())
        assert codes(rcpt_replies) == ["250 2.1.5"]
        assert codes(after) == ["451 4.3.0"]
    # ... and then the next recipient of the route is deferred at RCPT, before any DATA.
    rcpt_replies, _ = await transaction(client, ["c@example.org"], message())
    assert codes(rcpt_replies) == ["451 4.3.0"]
    assert len(webhook_server.requests) == 2
    text = await metrics_text(running)
    assert metric_value(text, "lmtp_bridge_circuit_breaker_state", {"route": "hooks"}) == 1
    assert metric_value(text, "lmtp_bridge_circuit_breaker_refused_total", {"route": "hooks"}) == 1
    # every deferral counts, at RCPT or after the data, so rate(deferred) is the SLI
    assert moved(text, result="deferred", route="hooks", stage="rcpt") == 1
    assert moved(text, result="deferred", route="hooks", stage="data") == 2
    # a recipient no route matches: refused at RCPT, counted under the route label "none"
    rcpt_replies, _ = await transaction(client, ["x@elsewhere.example"], message())
    assert codes(rcpt_replies) == ["550 5.1.1"]
    text = await metrics_text(running)
    assert moved(text, result="rejected", route="none", stage="rcpt") == 1

    # After the cool-down one probe goes through; the webhook is back, so the breaker closes.
    webhook_server.behave("*", status=200)
    await trio.sleep(cooldown + 0.1)
    rcpt_replies, after = await transaction(client, ["d@example.org", "e@example.org"], message())
    assert codes(rcpt_replies) == ["250 2.1.5", "451 4.3.0"]  # one probe, the other waits
    assert codes(after) == ["250 2.0.0"]
    rcpt_replies, after = await transaction(client, ["e@example.org", "f@example.org"], message())
    assert codes(rcpt_replies) == ["250 2.1.5", "250 2.1.5"]
    assert codes(after) == ["250 2.0.0", "250 2.0.0"]
    text = await metrics_text(running)
    assert metric_value(text, "lmtp_bridge_circuit_breaker_state", {"route": "hooks"}) == 0
    assert metric_value(text, "lmtp_bridge_circuit_breaker_opened_total", {"route": "hooks"}) == 1
    await client.aclose()


async def test_failed_probe_opens_the_breaker_again(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(breaker_threshold=1, breaker_cooldown=0.3)
    webhook_server.behave("*", status=500)
    client = await open_session(running)
    _, after = await transaction(client, ["a@example.org"], message())
    assert codes(after) == ["451 4.3.0"]
    await trio.sleep(0.4)
    rcpt_replies, after = await transaction(client, ["probe@example.org"], message())
    assert codes(rcpt_replies) == ["250 2.1.5"] and codes(after) == ["451 4.3.0"]
    rcpt_replies, _ = await transaction(client, ["b@example.org"], message())
    assert codes(rcpt_replies) == ["451 4.3.0"]  # open again, for another cool-down
    await client.aclose()


async def test_permanent_answers_do_not_open_the_breaker(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(breaker_threshold=1)
    webhook_server.behave("*", status=404, body="no such user")
    client = await open_session(running)
    for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
        rcpt_replies, after = await transaction(client, [rcpt], message())
        assert codes(rcpt_replies) == ["250 2.1.5"] and codes(after) == ["550 5.1.1"]
    await client.aclose()


async def test_url_template_and_plus_addressing(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    url = webhook_server.base_url + "/in/{domain}/{user}/{tag}?rcpt={rcpt}"
    running = await start_bridge(routes=[{"name": "bob", "match": "bob@example.org", "url": url}])
    client = await open_session(running)
    rcpt_replies, after = await transaction(
        client, ["bob+news/../x@Example.ORG", "bob@example.org"], message()
    )
    assert codes(rcpt_replies) == ["250 2.1.5", "250 2.1.5"]  # the exact route fits bob+tag
    assert codes(after) == ["250 2.0.0", "250 2.0.0"]
    paths = sorted(r.path for r in webhook_server.requests)
    assert paths == [
        "/in/example.org/bob/?rcpt=bob%40example.org",
        "/in/example.org/bob/news%2F..%2Fx?rcpt=bob%2Bnews%2F..%2Fx%40example.org",
    ]
    tagged = next(r for r in webhook_server.requests if "news" in r.path).json()["envelope"]
    assert tagged["rcpt_to"] == "bob+news/../x@Example.ORG"
    assert (tagged["rcpt_local"], tagged["rcpt_domain"]) == ("bob+news/../x", "example.org")
    assert (tagged["rcpt_user"], tagged["rcpt_tag"]) == ("bob", "news/../x")
    # the template is filled from the recipient; the route's label stays its name
    assert urllib.parse.unquote(paths[1].rpartition("=")[2]) == "bob+news/../x@example.org"
    await client.aclose()


AUTH_MESSAGE = message(
    Authentication_Results=(
        "mx.example.net; spf=pass smtp.mailfrom=alice@example.org;"
        " dkim=pass (2048-bit key) header.d=example.org header.s=s1;"
        " dmarc=pass header.from=example.org; arc=none"
    ),
    X_Filler="between the two",
)
FORGED = b"Authentication-Results: evil.example; spf=pass smtp.mailfrom=alice@example.org\r\n"


async def test_message_auth_from_trusted_authentication_results(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(trusted_authserv_ids=["MX.example.net"])
    client = await open_session(running)
    _, after = await transaction(client, ["bob@example.org"], FORGED + AUTH_MESSAGE)
    assert codes(after) == ["250 2.0.0"]
    auth = webhook_server.requests[0].json()["message"]["auth"]
    assert auth["authserv_id"] == "mx.example.net"
    assert auth["spf"] == {
        "result": "pass",
        "reason": None,
        "properties": {"smtp.mailfrom": "alice@example.org"},
    }
    assert [d["properties"]["header.d"] for d in auth["dkim"]] == ["example.org"]
    assert auth["dmarc"]["result"] == "pass" and auth["arc"]["result"] == "none"
    await client.aclose()


async def test_raw_without_trace_headers(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(
        routes=[
            {"name": "bare", "match": "bare@example.org", "trace_headers": False},
            {"name": "traced", "match": "@example.org"},
        ],
        webhook_url=webhook_server.url,
        payload="raw",
    )
    client = await open_session(running)
    msg = message()
    _, after = await transaction(client, ["bare@example.org", "t@example.org"], msg)
    assert codes(after) == ["250 2.0.0", "250 2.0.0"]
    bare = webhook_server.requests_for("bare@example.org")[0].body
    traced = webhook_server.requests_for("t@example.org")[0].body
    assert bare == msg
    assert traced.endswith(msg) and traced.startswith(b"Return-Path: <alice@example.org>\r\n")
    await client.aclose()


async def test_a_20_mib_attachment_arrives_whole_in_multipart(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    blob = os.urandom(20 * 1024 * 1024)
    encoded = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    msg = (
        b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: big\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''gro%C3%9F.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--B--\r\n"
    )
    running = await start_bridge(payload="multipart", max_message_size=40 * 1024 * 1024)
    client = await open_session(running)
    with trio.fail_after(60):
        _, after = await transaction(client, ["bob@example.org"], msg)
    assert codes(after) == ["250 2.0.0"]
    request = webhook_server.requests[0]
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    files = [p for p in form.iter_parts() if p.get_filename()]
    assert [p.get_filename() for p in files] == ["groß.bin"]
    data = files[0].get_payload(decode=True)
    assert isinstance(data, bytes)
    assert hashlib.sha256(data).digest() == hashlib.sha256(blob).digest()
    await client.aclose()
