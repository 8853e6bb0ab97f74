"""End to end through the running bridge: the circuit breaker at RCPT, URL templates and
plus-addressing, message.auth, trace headers off, and a 20 MiB attachment.

Each test runs the bridge in-process (trio, port 0) against tests/webhook_server.py.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import logging
import os
import socket
import urllib.parse

import pytest
import trio
from bridge_process import (
    AsyncLmtp,
    ServerReply,
    StartBridge,
    codes,
    data_section,
    free_port,
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


async def test_poison_recipients_never_close_the_route_for_healthy_ones(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """Three recipients the webhook always answers 503 (with the default retries: three requests
    each), sent again and again as an MTA's queue would, among healthy recipients of the same
    route: every healthy one is accepted at RCPT and delivered, the breaker never opens."""
    running = await start_bridge(
        routes=[{"name": "hooks", "match": "@example.org", "url": webhook_server.url}],
        breaker_cooldown=30,
    )
    poison = ["p1@example.org", "p2@example.org", "p3@example.org"]
    for rcpt in poison:
        webhook_server.behave(rcpt, status=503, body="poison")
    client = await open_session(running)
    healthy = []
    for i in range(12):
        rcpts = [*poison, f"h{i}@example.org"] if i % 3 else poison[: 1 + i % 3]
        healthy += rcpts[3:]
        rcpt_replies, after = await transaction(client, rcpts, message())
        assert codes(rcpt_replies) == ["250 2.1.5"] * len(rcpts), i
        assert codes(after) == ["451 4.3.0"] * min(3, len(rcpts)) + ["250 2.0.0"] * (len(rcpts) - 3)
    assert {r.rcpt for r in webhook_server.requests if r.rcpt not in poison} == set(healthy)
    text = await metrics_text(running)
    assert metric_value(text, "lmtp_bridge_circuit_breaker_state", {"route": "hooks"}) == 0
    assert metric_value(text, "lmtp_bridge_circuit_breaker_opened_total", {"route": "hooks"}) == 0
    await client.aclose()


async def test_a_refused_port_opens_the_breaker_and_a_probe_closes_it_when_it_is_back(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there: every connection is refused
    cooldown = 0.5
    running = await start_bridge(
        routes=[{"name": "down", "match": "@example.org", "url": f"http://127.0.0.1:{port}/h"}],
        breaker_min_calls=4,
        breaker_cooldown=cooldown,
    )
    client = await open_session(running)
    before = await metrics_text(running)  # metrics are the process's: compare, never absolute

    def moved(text: str, **labels: str) -> float:
        return metric_value(text, RECIPIENTS, labels) - metric_value(before, RECIPIENTS, labels)

    with caplog.at_level(logging.INFO, logger="bridge.delivery.breaker"):
        # four deliveries that cannot connect (each after its retries) open it ...
        for rcpts in (["a@example.org", "b@example.org"], ["c@example.org", "d@example.org"]):
            rcpt_replies, after = await transaction(client, rcpts, message())
            assert codes(rcpt_replies) == ["250 2.1.5"] * 2
            assert codes(after) == ["451 4.4.1"] * 2
        # ... and the route's next recipients are deferred at RCPT, before any DATA
        rcpt_replies, _ = await transaction(client, ["e@example.org", "f@example.org"], message())
        assert codes(rcpt_replies) == ["451 4.3.0"] * 2
        text = await metrics_text(running)
        assert metric_value(text, "lmtp_bridge_circuit_breaker_state", {"route": "down"}) == 1
        assert moved(text, result="deferred", route="down", stage="rcpt") == 2
        assert moved(text, result="deferred", route="down", stage="data") == 4

        with WebhookServer(port=port) as back:  # the endpoint comes back
            await trio.sleep(cooldown + 0.1)
            rcpt_replies, after = await transaction(
                client, ["g@example.org", "h@example.org"], message()
            )
            assert codes(rcpt_replies) == ["250 2.1.5", "451 4.3.0"]  # one probe, one waits
            assert codes(after) == ["250 2.0.0"]
            rcpt_replies, after = await transaction(
                client, ["h@example.org", "i@example.org"], message()
            )
            assert codes(rcpt_replies) == ["250 2.1.5"] * 2
            assert codes(after) == ["250 2.0.0"] * 2
            assert sorted(r.rcpt or "" for r in back.requests) == [
                "g@example.org",
                "h@example.org",
                "i@example.org",
            ]
    transitions = [
        (r.getMessage(), r.fields["route"], r.fields["reason"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "bridge.delivery.breaker"
    ]
    assert transitions == [
        (
            "circuit breaker opened",
            "down",
            "4 of 4 deliveries in 30 s failed at the endpoint (last: refused)",
        ),
        ("circuit breaker half-open", "down", f"cool-down of {cooldown:g} s over: one probe"),
        ("circuit breaker closed", "down", "probe answered: HTTP 200"),
    ]
    text = await metrics_text(running)
    assert metric_value(text, "lmtp_bridge_circuit_breaker_state", {"route": "down"}) == 0
    assert metric_value(text, "lmtp_bridge_circuit_breaker_opened_total", {"route": "down"}) == 1
    assert metric_value(text, "lmtp_bridge_circuit_breaker_refused_total", {"route": "down"}) == 3
    # a recipient no route matches: refused at RCPT, counted under the route label "none"
    rcpt_replies, _ = await transaction(client, ["x@elsewhere.example"], message())
    assert codes(rcpt_replies) == ["550 5.1.1"]
    text = await metrics_text(running)
    assert moved(text, result="rejected", route="none", stage="rcpt") == 1
    await client.aclose()


async def test_an_endpoint_that_times_out_opens_the_breaker(start_bridge: StartBridge) -> None:
    with socket.socket() as silent:  # connections are queued by the kernel, never answered
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        running = await start_bridge(
            routes=[{"name": "slow", "match": "@example.org", "url": url}],
            http_timeout=0.3,
            http_retries=0,
            breaker_min_calls=3,
        )
        client = await open_session(running)
        rcpts = ["a@example.org", "b@example.org", "c@example.org"]
        _, after = await transaction(client, rcpts, message())
        assert codes(after) == ["451 4.4.2"] * 3
        rcpt_replies, _ = await transaction(client, ["d@example.org"], message())
        assert codes(rcpt_replies) == ["451 4.3.0"]
        await client.aclose()


async def test_a_failed_probe_opens_the_breaker_again(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(breaker_min_calls=1, breaker_cooldown=0.3, http_retries=0)
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


async def test_refusals_of_recipients_never_open_the_breaker(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(breaker_min_calls=1)
    webhook_server.behave("*", status=404, body="no such user")
    webhook_server.behave("nope@example.org", status=403, body="not for you")
    client = await open_session(running)
    for rcpt in ("a@example.org", "nope@example.org", "b@example.org", "c@example.org"):
        rcpt_replies, after = await transaction(client, [rcpt], message())
        assert codes(rcpt_replies) == ["250 2.1.5"]
        assert codes(after) == ["451 4.7.0" if rcpt.startswith("nope") else "550 5.1.1"]
    await client.aclose()


async def test_url_template_and_plus_addressing(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    url = webhook_server.base_url + "/in/{domain}/{user}/{tag}?rcpt={rcpt}"
    running = await start_bridge(routes=[{"name": "bob", "match": "bob@example.org", "url": url}])
    client = await open_session(running)
    rcpt_replies, after = await transaction(
        client, ["bob+news?x#y@Example.ORG", "bob@example.org"], message()
    )
    assert codes(rcpt_replies) == ["250 2.1.5", "250 2.1.5"]  # the exact route fits bob+tag
    assert codes(after) == ["250 2.0.0", "250 2.0.0"]
    paths = sorted(r.path for r in webhook_server.requests)
    assert paths == [
        "/in/example.org/bob/?rcpt=bob%40example.org",
        "/in/example.org/bob/news%3Fx%23y?rcpt=bob%2Bnews%3Fx%23y%40example.org",
    ]
    tagged = next(r for r in webhook_server.requests if "news" in r.path).json()["envelope"]
    assert tagged["rcpt_to"] == "bob+news?x#y@Example.ORG"
    assert (tagged["rcpt_local"], tagged["rcpt_domain"]) == ("bob+news?x#y", "example.org")
    assert (tagged["rcpt_user"], tagged["rcpt_tag"]) == ("bob", "news?x#y")
    # the template is filled from the recipient; the route's label stays its name
    assert urllib.parse.unquote(paths[1].rpartition("=")[2]) == "bob+news?x#y@example.org"
    await client.aclose()


async def test_an_address_never_moves_the_request_to_another_path(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """Dot segments and empty segments from an address are refused at RCPT (553 5.1.3): with
    this template, <..@example.org> was POSTed to /tenant/example.org/inbox."""
    url = webhook_server.base_url + "/tenant/{domain}/user/{local}/inbox"
    running = await start_bridge(webhook_url=url)
    client = await open_session(running)
    before = await metrics_text(running)  # metrics are the process's: compare, never absolute
    steering = ["..@example.org", "bob@..", "..@..", ".@example.org", "postmaster",
                "bob@example.org/user/victim", "a/../../admin@example.org"]  # fmt: skip
    rcpt_replies, after = await transaction(client, [*steering, "bob@example.org"], message())
    assert codes(rcpt_replies) == ["553 5.1.3"] * len(steering) + ["250 2.1.5"]
    assert codes(after) == ["250 2.0.0"]
    assert [r.path for r in webhook_server.requests] == ["/tenant/example.org/user/bob/inbox"]
    text = await metrics_text(running)
    refused = {"result": "rejected", "route": "default", "stage": "rcpt"}
    moved = metric_value(text, RECIPIENTS, refused) - metric_value(before, RECIPIENTS, refused)
    assert moved == len(steering)
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


async def test_a_half_open_probe_refused_by_verification_is_not_spent(
    start_bridge: StartBridge,
) -> None:
    """The breaker's probe slot goes to the first recipient admitted after the cool-down; when
    verification then refuses that recipient, no delivery will ever report back, so the next
    recipient is the probe, not deferred for another cool-down."""
    port = free_port()  # nothing listens there: every connection is refused
    cooldown = 0.5
    with WebhookServer() as verify:
        verify.behave("*", status=404, body="no such mailbox")
        verify.behave("known@example.org", status=200)
        running = await start_bridge(
            routes=[{"name": "down", "match": "@example.org", "url": f"http://127.0.0.1:{port}/h"}],
            verify_url=verify.base_url + "/verify",
            breaker_min_calls=1,
            breaker_cooldown=cooldown,
        )
        client = await open_session(running)
        rcpt_replies, after = await transaction(client, ["known@example.org"], message())
        assert codes(after) == ["451 4.4.1"]  # refused: the breaker opens
        rcpt_replies, _ = await transaction(client, ["known@example.org"], message())
        assert codes(rcpt_replies) == ["451 4.3.0"]
        with WebhookServer(port=port) as back:  # the endpoint comes back
            await trio.sleep(cooldown + 0.1)
            rcpt_replies, after = await transaction(
                client, ["ghost@example.org", "known@example.org"], message()
            )
            assert codes(rcpt_replies) == ["550 5.1.1", "250 2.1.5"]
            assert codes(after) == ["250 2.0.0"]
            assert [r.rcpt for r in back.requests] == ["known@example.org"]
        await client.aclose()
