"""Tests for the demo receiver: what it prints for each payload type and how it answers."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from functools import partial

import httpx
import pytest
import trio
from bridge_process import StartBridge, message, open_session
from standardwebhooks import Webhook

from bridge.demo import demo_handler
from bridge.ops.httpserver import HttpRequest, serve_http
from bridge.webhook import client as webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXk="

MESSAGE_TEXT = "\n".join(f"line {n}" for n in range(1, 9))


def json_payload(rcpt_to: str = "bob@example.net") -> bytes:
    document = {
        "version": 1,
        "delivery_id": "dlv-json-1",
        "envelope": {
            "mail_from": "alice@example.org",
            "rcpt_to": rcpt_to,
            "size": 1234,
            "body": "8BITMIME",
            "smtputf8": False,
        },
        "message": {
            "subject": "Quarterly r\u00e9sum\u00e9",
            "text": MESSAGE_TEXT,
            "html": None,
            "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "size": 99}],
        },
    }
    return json.dumps(document).encode()


RAW_MESSAGE = (
    b"Return-Path: <alice@example.org>\r\n"
    b"Delivered-To: bob@example.net\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9_plans?=\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"See you at noon.\r\nBring the slides.\r\n"
)


def request(
    body: bytes,
    content_type: str,
    *,
    delivery_id: str = "dlv-1",
    extra: dict[str, str] | None = None,
    method: str = "POST",
) -> HttpRequest:
    headers = {"content-type": content_type, "webhook-id": delivery_id, **(extra or {})}
    return HttpRequest(method, "/", [(k.lower(), v) for k, v in headers.items()], body)


def signed(body: bytes, delivery_id: str, *secrets: str, age: float = 0) -> dict[str, str]:
    """Headers signed by the reference Standard Webhooks library, not by our code."""
    moment = datetime.now(tz=UTC) - timedelta(seconds=age)
    signatures = " ".join(Webhook(s).sign(delivery_id, moment, body.decode()) for s in secrets)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signatures,
    }


async def test_json_delivery_is_printed_and_accepted() -> None:
    out = io.StringIO()
    response = await demo_handler(out)(request(json_payload(), "application/json"))
    assert response.status == 200
    printed = out.getvalue()
    assert "dlv-1" in printed
    assert "bob@example.net" in printed
    assert "alice@example.org" in printed
    assert "Quarterly r\u00e9sum\u00e9" in printed
    assert "1234 bytes" in printed
    assert "a.pdf" in printed
    assert "line 1" in printed and "line 5" in printed
    assert "line 6" not in printed  # only the first lines of the body
    assert "signature" not in printed  # nothing to check without a secret


async def test_raw_delivery_is_parsed_with_email() -> None:
    out = io.StringIO()
    headers = {
        "x-lmtp-mail-from": "alice@example.org",
        "x-lmtp-rcpt-to": "j%C3%BCrgen@example.net",
    }
    response = await demo_handler(out)(request(RAW_MESSAGE, "message/rfc822", extra=headers))
    assert response.status == 200
    printed = out.getvalue()
    assert "Caf\u00e9 plans" in printed
    assert "j\u00fcrgen@example.net" in printed
    assert "alice@example.org" in printed
    assert f"{len(RAW_MESSAGE)} bytes" in printed
    assert "See you at noon." in printed


async def test_multipart_delivery_is_parsed() -> None:
    envelope = {"mail_from": "alice@example.org", "rcpt_to": "carol@example.net", "size": 77}
    message = {"subject": "Form post", "text": "hello from the form", "attachments": []}
    built = httpx.Request(
        "POST",
        "http://demo/",
        data={"envelope": json.dumps(envelope), "message": json.dumps(message)},
        files={"file": ("notes.txt", b"twelve bytes", "text/plain")},
    )
    body = built.read()
    out = io.StringIO()
    response = await demo_handler(out)(request(body, built.headers["content-type"]))
    assert response.status == 200
    printed = out.getvalue()
    assert "carol@example.net" in printed
    assert "Form post" in printed
    assert "hello from the form" in printed
    assert "notes.txt (text/plain, 12 bytes)" in printed


async def test_status_recipient_chooses_the_http_answer() -> None:
    out = io.StringIO()
    handler = demo_handler(out)
    response = await handler(request(json_payload("status-503@example.org"), "application/json"))
    assert response.status == 503
    assert response.body.decode().strip() == "demo: answering 503"
    assert "503" in out.getvalue()

    raw = await handler(
        request(RAW_MESSAGE, "message/rfc822", extra={"x-lmtp-rcpt-to": "Status-404@example.org"})
    )
    assert raw.status == 404
    assert raw.body.decode().strip() == "demo: answering 404"

    # Not a status: an ordinary recipient whose name merely looks similar.
    ordinary = await handler(request(json_payload("status-x@example.org"), "application/json"))
    assert ordinary.status == 200


async def test_signature_verified_with_the_right_secret() -> None:
    body = json_payload()
    out = io.StringIO()
    handler = demo_handler(out, [SECRET])
    headers = signed(body, "dlv-signed", SECRET)
    response = await handler(request(body, "application/json", extra=headers))
    assert response.status == 200
    assert "signature:   verified" in out.getvalue()


async def test_signature_verified_during_key_rotation() -> None:
    body = json_payload()
    out = io.StringIO()
    # The bridge signs with old and new secrets; the receiver knows only the new one.
    headers = signed(body, "dlv-rotated", OTHER_SECRET, SECRET)
    await demo_handler(out, [SECRET])(request(body, "application/json", extra=headers))
    assert "signature:   verified" in out.getvalue()


@pytest.mark.parametrize(
    "tamper",
    ["wrong secret", "changed body", "old timestamp", "missing headers"],
)
async def test_signature_not_verified(tamper: str) -> None:
    body = json_payload()
    headers = signed(body, "dlv-x", OTHER_SECRET if tamper == "wrong secret" else SECRET)
    if tamper == "changed body":
        body = body.replace(b"bob@", b"eve@")
    if tamper == "old timestamp":
        headers = signed(body, "dlv-x", SECRET, age=3600)
    if tamper == "missing headers":
        del headers["webhook-signature"]
    out = io.StringIO()
    response = await demo_handler(out, [SECRET])(request(body, "application/json", extra=headers))
    assert response.status == 200  # the demo reports, it does not refuse
    assert "signature:   NOT verified" in out.getvalue()


def test_invalid_secret_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="base64"):
        demo_handler(io.StringIO(), ["whsec_not base64!"])


async def test_bad_requests_are_explained() -> None:
    out = io.StringIO()
    handler = demo_handler(out)
    assert (await handler(request(b"", "application/json", method="GET"))).status == 405
    broken = await handler(request(b"{not json", "application/json"))
    assert broken.status == 400
    assert b"cannot parse JSON" in broken.body
    unknown = await handler(request(b"hi", "text/plain"))
    assert unknown.status == 415


async def test_demo_behind_the_http_server(nursery: trio.Nursery) -> None:
    out = io.StringIO()
    port = await nursery.start(partial(serve_http, demo_handler(out, [SECRET]), "127.0.0.1", 0))
    body = json_payload()
    headers = {"content-type": "application/json", **signed(body, "dlv-e2e", SECRET)}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"http://127.0.0.1:{port}/", content=body, headers=headers)
        assert response.status_code == 200
        failing = await client.post(
            f"http://127.0.0.1:{port}/",
            content=json_payload("status-451@example.org"),
            headers={"content-type": "application/json"},
        )
        assert failing.status_code == 451
    printed = out.getvalue()
    assert "dlv-e2e" in printed
    assert "signature:   verified" in printed


async def test_a_per_message_delivery_gets_a_verdict_for_each_status_recipient() -> None:
    out = io.StringIO()
    handler = demo_handler(out)
    rcpts = ["bob@example.org", "status-404@example.org", "status-503@example.org"]
    envelope = {"mail_from": "a@example.org", "recipients": [{"address": r} for r in rcpts]}
    body = json.dumps({"envelope": envelope, "message": {"subject": "hi"}}).encode()
    response = await handler(request(body, "application/json"))
    assert response.status == 200
    verdicts = {"status-404@example.org": 404, "status-503@example.org": 503}
    assert json.loads(response.body) == {"recipients": verdicts}
    assert "bob@example.org, status-404@example.org" in out.getvalue()

    headers = [("content-type", "message/rfc822"), *(("x-lmtp-rcpt-to", r) for r in rcpts)]
    raw = await handler(HttpRequest("POST", "/", headers, RAW_MESSAGE))
    assert json.loads(raw.body) == {"recipients": verdicts}


async def test_a_retried_delivery_shows_its_attempt_number(
    nursery: trio.Nursery, start_bridge: StartBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_BASE", 0.01)
    out = io.StringIO()
    port = await nursery.start(partial(serve_http, demo_handler(out), "127.0.0.1", 0))
    running = await start_bridge(webhook_url=f"http://127.0.0.1:{port}/hook", http_retries=2)
    client = await open_session(running)
    with trio.fail_after(30):
        assert (await client.command("MAIL FROM:<alice@example.org>")).code == 250
        assert (await client.command("RCPT TO:<status-503@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(message() + b".\r\n")
        assert (await client.reply()).code == 451
    await client.aclose()
    heads = [line for line in out.getvalue().splitlines() if line.startswith("--- delivery ")]
    assert len(heads) == 3, out.getvalue()
    assert [h.rsplit("(", 1)[1] for h in heads] == [
        "attempt 1) ---",
        "attempt 2) ---",
        "attempt 3) ---",
    ]
    assert len({h.split()[2] for h in heads}) == 1  # the same delivery id each time
