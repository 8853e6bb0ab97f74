"""End to end through the running bridge: LMTP on a real socket in, a real HTTP webhook out.

Each test runs the bridge in-process (trio, port 0) against tests/webhook_server.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time

import pytest
import trio
from bridge_process import (
    HOSTNAME,
    AsyncLmtp,
    ServerReply,
    StartBridge,
    codes,
    data_section,
    free_port,
    http_get,
    message,
    metric_value,
    metrics_text,
    open_session,
    settings_for,
    short_tempdir,
    start_in_process,
    until,
)
from standardwebhooks import Webhook
from webhook_server import RecordedRequest, WebhookServer


async def send_envelope(
    client: AsyncLmtp, recipients: list[str], sender: str = "alice@example.org"
) -> list[ServerReply]:
    """MAIL and RCPT (pipelined, as an MTA does), then DATA; the RCPT replies."""
    commands = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients)]
    await client.send("".join(f"{c}\r\n" for c in commands))
    mail = await client.reply()
    assert mail.code == 250, mail
    rcpt_replies = [await client.reply() for _ in recipients]
    data = await client.command("DATA")
    assert data.code == 354, data
    return rcpt_replies


async def transaction(
    client: AsyncLmtp, recipients: list[str], msg: bytes, sender: str = "alice@example.org"
) -> list[ServerReply]:
    """One whole transaction; the replies after the final dot, one per accepted RCPT."""
    rcpt_replies = await send_envelope(client, recipients, sender)
    accepted = sum(1 for r in rcpt_replies if r.code == 250)
    await client.send(data_section(msg))
    return [await client.reply() for _ in range(accepted)]


async def test_replies_come_in_rcpt_order_one_per_accepted_recipient(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    # Only @example.org has a route, so x@other.test is refused at RCPT.
    running = await start_bridge(
        routes=[{"name": "org", "match": "@example.org", "url": webhook_server.url}]
    )
    webhook_server.behave("b@example.org", status=503, body="busy")
    webhook_server.behave("c@example.org", status=404, body="no such mailbox")
    client = await open_session(running)
    recipients = [
        "a@example.org",
        "x@other.test",
        "b@example.org",
        "a@example.org",
        "c@example.org",
    ]

    rcpt_replies = await send_envelope(client, recipients)
    assert codes(rcpt_replies) == ["250 2.1.5", "550 5.1.1", "250 2.1.5", "250 2.1.5", "250 2.1.5"]
    # the QUIT rides with the dot: it must be answered after all four recipients, never among them
    await client.send(data_section(message()) + b"QUIT\r\n")
    after_dot = await client.rest_until_eof()

    assert codes(after_dot) == ["250 2.0.0", "451 4.3.0", "250 2.0.0", "550 5.1.1", "221 2.0.0"]
    # each reply names the delivery id the webhook got, so an MTA's log line joins its records
    ids = {r.rcpt: r.headers["webhook-id"] for r in webhook_server.requests}
    assert after_dot[0].text == f"2.0.0 delivered {ids['a@example.org']} (HTTP 200)"
    assert after_dot[1].text == f"4.3.0 deferred {ids['b@example.org']} (HTTP 503): busy"
    assert after_dot[2].text == after_dot[0].text
    assert after_dot[3].text == (
        f"5.1.1 refused {ids['c@example.org']} (HTTP 404): no such mailbox"
    )
    # the duplicate is posted once and answered twice; the refused one never posted
    assert sorted(r.rcpt or "" for r in webhook_server.requests) == [
        "a@example.org",
        "b@example.org",
        "c@example.org",
    ]


async def test_each_reply_is_written_as_soon_as_it_is_known(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    webhook_server.behave("slow@example.org", delay=2.0)
    client = await open_session(running)
    await send_envelope(client, ["fast@example.org", "slow@example.org"])

    await client.send(data_section(message()))
    first = await client.reply()
    first_at = time.monotonic()
    second = await client.reply()
    second_at = time.monotonic()

    assert codes([first, second]) == ["250 2.0.0", "250 2.0.0"]
    (slow,) = webhook_server.requests_for("slow@example.org")
    answered = slow.received_at + 2.0  # the webhook answers 2 s after the request came in
    assert first_at < answered, "reply 1 waited for the slow recipient's webhook"
    assert second_at >= answered


# SPEC section 4, row by row: (webhook behaviour, LMTP reply).
STATUS_ROWS = [
    (200, "250 2.0.0"),
    (404, "550 5.1.1"),
    (410, "550 5.1.1"),
    (413, "552 5.3.4"),
    (400, "554 5.6.0"),
    (415, "554 5.6.0"),
    (422, "554 5.6.0"),
    (418, "554 5.0.0"),
    (401, "451 4.7.0"),
    (403, "451 4.7.0"),
    (407, "451 4.7.0"),
    (408, "451 4.3.0"),
    (425, "451 4.3.0"),
    (429, "451 4.3.0"),
    (500, "451 4.3.0"),
    (503, "451 4.3.0"),
    (507, "452 4.2.2"),
    (301, "451 4.3.0"),
]


async def test_every_row_of_the_status_map(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    closed_port = free_port()  # nothing listens there: the "webhook down" row
    running = await start_bridge(
        http_timeout=1,
        routes=[
            {"name": "down", "match": "@down.test", "url": f"http://127.0.0.1:{closed_port}/"},
            {"name": "up", "match": "*", "url": webhook_server.url},
        ],
    )
    for status, _ in STATUS_ROWS:
        webhook_server.behave(
            f"s{status}@example.org", status=status, body=f"reason {status}\r\nmore detail"
        )
    webhook_server.behave("hang@example.org", hang=True)
    webhook_server.behave("reset@example.org", reset=True)
    recipients = [f"s{status}@example.org" for status, _ in STATUS_ROWS]
    recipients += ["hang@example.org", "reset@example.org", "nobody@down.test"]
    client = await open_session(running)

    with trio.fail_after(10):
        replies = await transaction(client, recipients, message())

    got = dict(zip(recipients, replies, strict=True))
    for status, expected in STATUS_ROWS:
        reply = got[f"s{status}@example.org"]
        assert f"{reply.code} {reply.status}" == expected, (status, str(reply))
        assert f"HTTP {status}" in reply.text
        if status != 200:  # the first line of the webhook's body explains a refusal
            assert reply.text.endswith(f"reason {status}"), str(reply)
    timeout = got["hang@example.org"]
    assert timeout.code == 451 and timeout.status.startswith("4.4."), str(timeout)
    assert codes([got["reset@example.org"]]) == ["451 4.4.1"]
    assert codes([got["nobody@down.test"]]) == ["451 4.4.1"]
    assert (await client.command("NOOP")).code == 250


def delivery_ids(request: RecordedRequest) -> tuple[str, str, str]:
    headers = request.headers
    return headers["webhook-id"], headers["Idempotency-Key"], headers["X-Lmtp-Bridge-Delivery-Id"]


async def test_request_headers_ids_signature_and_bcc(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    running = await start_bridge(webhook_secret=secret)
    # to@ is in the To: header; bcc@ is only in the envelope
    webhook_server.behave("to@example.net", status=503, body="try later")
    msg = message(subject="ids", to="<to@example.net>")
    client = await open_session(running)

    first = await transaction(client, ["to@example.net", "bcc@example.net"], msg)
    assert codes(first) == ["451 4.3.0", "250 2.0.0"]
    # the MTA retries the deferred recipient with the very same message
    webhook_server.behave("to@example.net", status=200)
    second = await transaction(client, ["to@example.net"], msg)
    assert codes(second) == ["250 2.0.0"]

    to_requests = webhook_server.requests_for("to@example.net")
    (bcc_request,) = webhook_server.requests_for("bcc@example.net")
    assert len(to_requests) == 2
    for request in [*to_requests, bcc_request]:
        ids = delivery_ids(request)
        assert len(set(ids)) == 1, f"the three id headers differ: {ids}"
        assert request.headers["user-agent"].startswith("lmtp-bridge/")
        # any Standard Webhooks library accepts the signature
        payload = Webhook(secret).verify(request.body, dict(request.headers))
        assert payload["delivery_id"] == ids[0]
        # each copy names its own recipient; the Bcc one appears in no other copy
        assert payload["envelope"]["rcpt_to"] == request.rcpt
        if request.rcpt != "bcc@example.net":
            assert b"bcc@example.net" not in request.body
    assert delivery_ids(to_requests[0]) == delivery_ids(to_requests[1]), "an MTA retry changed ids"
    assert delivery_ids(to_requests[0])[0] != delivery_ids(bcc_request)[0]


async def test_tampered_body_fails_signature_verification(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    # the other side of the check above: verification really depends on the body
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    running = await start_bridge(webhook_secret=secret)
    client = await open_session(running)
    assert codes(await transaction(client, ["a@example.net"], message())) == ["250 2.0.0"]
    (request,) = webhook_server.requests
    data = json.loads(request.body)
    data["envelope"]["rcpt_to"] = "mallory@example.net"
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(json.dumps(data).encode(), dict(request.headers))


async def test_metrics_and_health_after_traffic(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    webhook_server.behave("deferred@example.org", status=503)
    webhook_server.behave("rejected@example.org", status=404)
    before = await metrics_text(running)
    client = await open_session(running)
    replies = await transaction(
        client, ["ok@example.org", "deferred@example.org", "rejected@example.org"], message()
    )
    assert [r.code for r in replies] == [250, 451, 550]
    await client.command("QUIT")
    after = await metrics_text(running)

    def moved(name: str, **labels: str) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    for result in ("delivered", "deferred", "rejected"):
        labels = {"result": result, "route": "default", "stage": "data"}
        assert moved("lmtp_bridge_recipients_total", **labels) == 1, result
        # pre-initialised, so a dashboard's rate() sees a zero rather than a gap
        assert f'result="{result}",route="default",stage="rcpt"' in before
    assert moved("lmtp_bridge_messages_total") == 1
    assert moved("lmtp_bridge_connections_total") == 1
    assert moved("lmtp_bridge_replies_total", code="451") == 1
    assert moved("lmtp_bridge_replies_total", code="550") == 1
    for status_class in ("2xx", "4xx", "5xx"):
        requests = moved(
            "lmtp_bridge_webhook_requests_total", route="default", status_class=status_class
        )
        assert requests == 1, status_class
    assert metric_value(after, "lmtp_bridge_ready") == 1
    assert "@" not in after, "an address leaked into a metric label"
    base = f"http://127.0.0.1:{running.metrics_port}"
    assert (await trio.to_thread.run_sync(http_get, f"{base}/healthz"))[0] == 200
    assert (await trio.to_thread.run_sync(http_get, f"{base}/readyz"))[0] == 200


async def test_recipients_past_the_limit_count_as_deferred_at_rcpt(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """SPEC 6: recipients_total counts every recipient outcome; a 452 4.5.3 (too many
    recipients: the MTA sends them again later) is one decided at RCPT, under its route."""
    running = await start_bridge(
        max_recipients=2,
        routes=[{"name": "org", "match": "@example.org", "url": webhook_server.url}],
    )
    before = await metrics_text(running)
    client = await open_session(running)
    recipients = ["a@example.org", "b@example.org", "c@example.org", "x@other.test"]
    rcpt_replies = await send_envelope(client, recipients)
    assert codes(rcpt_replies) == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"]
    await client.send(data_section(message()))
    assert codes([await client.reply() for _ in range(2)]) == ["250 2.0.0"] * 2
    after = await metrics_text(running)

    def moved(route: str, result: str, stage: str) -> float:
        labels = {"result": result, "route": route, "stage": stage}
        name = "lmtp_bridge_recipients_total"
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert moved("org", "deferred", "rcpt") == 1
    assert moved("none", "deferred", "rcpt") == 1  # no route would have taken it
    assert moved("org", "delivered", "data") == 2


async def test_oversized_message_gets_552_for_every_recipient(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(max_message_size=10000)
    client = await open_session(running)
    before = await metrics_text(running)
    big = message(body="x" * 70 + ("\r\n" + "y" * 70) * 300)  # about 21 kB
    replies = await transaction(client, ["a@example.org", "b@example.org", "c@example.org"], big)

    assert codes(replies) == ["552 5.3.4"] * 3
    # each of the three counts as an outcome, decided after the data, of its route
    rejected = {"result": "rejected", "route": "default", "stage": "data"}
    moved = metric_value(await metrics_text(running), "lmtp_bridge_recipients_total", rejected)
    assert moved - metric_value(before, "lmtp_bridge_recipients_total", rejected) == 3
    assert (await client.command("NOOP")).code == 250  # the session goes on
    assert codes(await transaction(client, ["d@example.org"], message())) == ["250 2.0.0"]
    assert [r.rcpt for r in webhook_server.requests] == ["d@example.org"]


async def test_connection_lost_mid_data_delivers_nothing(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    before = metric_value(await metrics_text(running), "lmtp_bridge_connections_active")
    client = await open_session(running)
    await send_envelope(client, ["a@example.org", "b@example.org"])
    await client.send(data_section(message())[:-5])  # everything but "\r\n.\r\n"
    await client.aclose()

    async def session_gone() -> bool:
        return metric_value(await metrics_text(running), "lmtp_bridge_connections_active") == before

    with trio.fail_after(5):
        await until(session_gone)
    assert webhook_server.requests == []


async def test_quit_pipelined_after_the_dot_is_answered_after_all_replies(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    webhook_server.behave("*", delay=0.5)
    webhook_server.behave("b@example.org", delay=1.0)
    client = await open_session(running)
    await send_envelope(client, ["a@example.org", "b@example.org", "c@example.org"])
    await client.send(data_section(message()) + b"QUIT\r\n")

    with trio.fail_after(10):
        replies = await client.rest_until_eof()
    assert codes(replies) == ["250 2.0.0", "250 2.0.0", "250 2.0.0", "221 2.0.0"]
    assert HOSTNAME in replies[-1].text


async def test_connection_limit_answers_421_and_frees_slots(start_bridge: StartBridge) -> None:
    running = await start_bridge(max_connections=2)
    first = await open_session(running)
    second = await open_session(running)

    third = await AsyncLmtp.connect(running.lmtp_addresses[0])
    with trio.fail_after(5):
        refused = await third.rest_until_eof()
    assert codes(refused) == ["421 4.3.2"]
    assert (await second.command("NOOP")).code == 250  # the others are untouched

    await first.command("QUIT")
    await first.aclose()

    async def accepted() -> bool:
        client = await AsyncLmtp.connect(running.lmtp_addresses[0])
        greeting = await client.reply()
        await client.aclose()
        return greeting.code == 220

    with trio.fail_after(5):
        await until(accepted)


async def test_idle_session_is_closed_with_421(start_bridge: StartBridge) -> None:
    running = await start_bridge(idle_timeout=1)
    client = await open_session(running)
    started = time.monotonic()
    with trio.fail_after(5):
        replies = await client.rest_until_eof()
    assert codes(replies) == ["421 4.4.2"]
    assert time.monotonic() - started >= 0.9


async def test_webhook_request_carries_the_message(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge()
    client = await open_session(running)
    msg = message(subject="Grüße", body="..leading dots survive")
    msg = msg.replace("Grüße".encode(), b"=?utf-8?q?Gr=C3=BC=C3=9Fe?=")
    assert codes(await transaction(client, ["bob@example.org"], msg)) == ["250 2.0.0"]

    (request,) = webhook_server.requests
    assert request.method == "POST" and request.path == "/hook"
    assert request.headers["content-type"].startswith("application/json")
    payload = request.json()
    assert payload["version"] == 1
    assert payload["envelope"]["mail_from"] == "alice@example.org"
    assert payload["envelope"]["lhlo"] == "client.test"
    assert payload["envelope"]["client_address"] == "127.0.0.1"
    assert payload["message"]["subject"] == "Grüße"
    assert payload["message"]["text"].strip() == "..leading dots survive"


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_unix_socket_file_is_removed_when_the_bridge_ends(
    how: str, webhook_server: WebhookServer
) -> None:
    directory = short_tempdir()
    path = os.path.join(directory, "lmtp.sock")
    try:
        stopped = trio.Event()
        async with trio.open_nursery() as nursery:
            settings = settings_for(listen=[f"unix:{path}"], webhook_url=webhook_server.url)
            running = await start_in_process(nursery, settings, stopped)
            client = await AsyncLmtp.connect(f"unix:{path}")
            assert (await client.reply()).code == 220
            await client.aclose()
            if how == "stop":
                running.stop()
                with trio.fail_after(5):
                    await stopped.wait()
            else:
                nursery.cancel_scope.cancel()
        assert not await trio.Path(path).exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_bug_in_one_session_answers_451_then_421_and_the_server_goes_on(
    start_bridge: StartBridge, webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.delivery.deliverer import Deliverer

    running = await start_bridge()
    errors, internal = "lmtp_bridge_protocol_errors_total", {"kind": "internal"}
    before = metric_value(await metrics_text(running), errors, internal)
    real_deliver = Deliverer.deliver

    async def broken_once(self: Deliverer, txn: object, emit: object) -> None:
        monkeypatch.setattr(Deliverer, "deliver", real_deliver)
        raise RuntimeError("a bug in the bridge")

    monkeypatch.setattr(Deliverer, "deliver", broken_once)
    client = await open_session(running)
    await send_envelope(client, ["a@example.org", "b@example.org"])
    await client.send(data_section(message()))
    with trio.fail_after(10):
        replies = await client.rest_until_eof()
    # every recipient is answered (a 4xx, so the MTA keeps the mail), then the session closes
    assert codes(replies) == ["451 4.3.0", "451 4.3.0", "421 4.3.0"]
    assert webhook_server.requests == []
    assert metric_value(await metrics_text(running), errors, internal) == before + 1

    other = await open_session(running)  # the server itself is unharmed
    assert codes(await transaction(other, ["c@example.org"], message())) == ["250 2.0.0"]


async def test_a_spooled_message_is_signed_over_its_whole_body(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    # past spool_threshold the body is read from disk and signed in a worker thread
    secret = "whsec_" + base64.b64encode(b"s" * 32).decode()
    running = await start_bridge(webhook_secret=secret, spool_threshold=4096)
    client = await open_session(running)
    big = message(subject="spooled", body="line of text\r\n" * 20_000)  # ~280 KB
    assert codes(await transaction(client, ["a@example.net"], big)) == ["250 2.0.0"]
    (request,) = webhook_server.requests
    payload = Webhook(secret).verify(request.body, dict(request.headers))
    assert payload["message"]["text"].count("line of text\n") == 20_000
