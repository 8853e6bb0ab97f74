"""The webhook client against a real HTTP server: status map, reply text, retries, metrics."""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

import httpx
import pytest
import trio
from prometheus_client import REGISTRY
from webhook_server import Step, WebhookServer

from bridge import __version__
from bridge.base.route import Route
from bridge.lmtp.events import Reply
from bridge.webhook import client as webhook
from bridge.webhook.client import (
    Outcome,
    WebhookClient,
    WebhookRequest,
    map_response,
    map_transport_error,
    parse_reply,
    sanitize_text,
)

RCPT = "bob@example.org"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_BASE", 0.01)


@pytest.fixture
async def client() -> AsyncIterator[WebhookClient]:
    async with WebhookClient(max_connections=20) as opened:
        yield opened


def route_for(
    url: str,
    *,
    name: str = "test",
    retries: int = 0,
    timeout: float = 5.0,
    status_map: Mapping[str, str] | None = None,
) -> Route:
    return Route(name=name, url=url, timeout=timeout, retries=retries, status_map=status_map or {})


def request_for(
    url: str,
    pieces: Sequence[bytes] = (b'{"hello": "world"}',),
    *,
    rcpt: str = RCPT,
    headers: Sequence[tuple[str, str]] = (),
    length: int | None = None,
) -> WebhookRequest:
    return WebhookRequest(
        url=url,
        headers=[
            ("Content-Type", "application/json"),
            ("X-Lmtp-Rcpt-To", rcpt),
            ("webhook-id", "msg_test"),
            *headers,
        ],
        chunks=lambda: iter(pieces),
        length=sum(map(len, pieces)) if length is None else length,
        delivery_id="msg_test",
    )


async def deliver(
    client: WebhookClient, server: WebhookServer, *, rcpt: str = RCPT, **route_args: object
) -> Outcome:
    route = route_for(server.url, **route_args)  # type: ignore[arg-type]
    return await client.deliver(route, request_for(server.url, rcpt=rcpt))


def assert_one_line(reply: Reply) -> None:
    raw = reply.to_bytes()
    assert raw.count(b"\r\n") == 1 and raw.endswith(b"\r\n")
    assert b"\r" not in raw[:-2] and b"\n" not in raw[:-2]
    assert len(raw) <= 512


# --- the status map, end to end ---------------------------------------------------------------

STATUS_ROWS = [
    (200, 250, "2.0.0"),
    (201, 250, "2.0.0"),
    (202, 250, "2.0.0"),
    (404, 550, "5.1.1"),
    (410, 550, "5.1.1"),
    (413, 552, "5.3.4"),
    (400, 554, "5.6.0"),
    (415, 554, "5.6.0"),
    (422, 554, "5.6.0"),
    (402, 554, "5.0.0"),
    (405, 554, "5.0.0"),
    (409, 554, "5.0.0"),
    (418, 554, "5.0.0"),
    (451, 554, "5.0.0"),
    (401, 451, "4.7.0"),
    (403, 451, "4.7.0"),
    (407, 451, "4.7.0"),
    (408, 451, "4.3.0"),
    (425, 451, "4.3.0"),
    (429, 451, "4.3.0"),
    (500, 451, "4.3.0"),
    (502, 451, "4.3.0"),
    (503, 451, "4.3.0"),
    (504, 451, "4.3.0"),
    (599, 451, "4.3.0"),
    (507, 452, "4.2.2"),
    (301, 451, "4.3.0"),
    (302, 451, "4.3.0"),
    (307, 451, "4.3.0"),
]


@pytest.mark.parametrize(("http_status", "code", "enhanced"), STATUS_ROWS)
async def test_status_map_row(
    client: WebhookClient, webhook_server: WebhookServer, http_status: int, code: int, enhanced: str
) -> None:
    headers = {"Location": "http://127.0.0.1:1/elsewhere"} if 300 <= http_status < 400 else {}
    webhook_server.behave(RCPT, status=http_status, body="", headers=headers)
    outcome = await deliver(client, webhook_server)
    assert (outcome.reply.code, outcome.reply.status) == (code, enhanced)
    assert outcome.http_status == http_status
    assert outcome.error is None
    assert f"HTTP {http_status}" in str(outcome.reply.text)
    assert outcome.attempts == 1
    assert len(webhook_server.requests) == 1  # redirects are not followed


async def test_success_reply_text(client: WebhookClient, webhook_server: WebhookServer) -> None:
    outcome = await deliver(client, webhook_server)
    assert str(outcome.reply) == "250 2.0.0 delivered msg_test (HTTP 200)"
    assert outcome.reply.is_success


async def test_body_first_line_in_reply(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, status=422, body="mailbox is full\nsecond line\n")
    outcome = await deliver(client, webhook_server)
    assert str(outcome.reply) == "554 5.6.0 refused msg_test (HTTP 422): mailbox is full"


async def test_long_body_is_cut(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave(RCPT, status=400, body="x" * 2048)
    outcome = await deliver(client, webhook_server)
    prefix = "refused msg_test (HTTP 400): "
    assert outcome.reply.text == prefix + "x" * 200
    assert_one_line(outcome.reply)


async def test_large_error_body_still_answers(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, status=500, body="first\n" + "y" * 1_000_000)
    outcome = await deliver(client, webhook_server)
    assert str(outcome.reply) == "451 4.3.0 deferred msg_test (HTTP 500): first"


@pytest.mark.parametrize(
    "body",
    [
        "bad\r\n250 2.0.0 ok\r\n",
        "\r\n\r\n550 5.1.1 forged\r\n",
        "bad\rinjected",
        "a\x00b\x1bc\x7fd caf\u00e9 \u2028end",
    ],
)
async def test_body_cannot_inject_reply_lines(
    client: WebhookClient, webhook_server: WebhookServer, body: str
) -> None:
    webhook_server.behave(RCPT, status=500, body=body)
    outcome = await deliver(client, webhook_server)
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.3.0")
    assert_one_line(outcome.reply)
    assert all(" " <= ch <= "~" for ch in str(outcome.reply.text))


@pytest.mark.parametrize(
    "header",
    [
        b"450 4.2.0 wait\r250 2.0.0 forged",  # a bare CR inside the value
        b"450 4.2.0 caf\xc3\xa9 \x80\xff\x7f forged",  # obs-text and DEL
    ],
)
async def test_header_cannot_inject_reply_lines(
    client: WebhookClient, webhook_server: WebhookServer, header: bytes
) -> None:
    # Written raw: whatever the HTTP layer makes of the header, the sender gets one 4xx line.
    raw = b"HTTP/1.1 500 Oops\r\nX-Lmtp-Reply: " + header + b"\r\nContent-Length: 0\r\n\r\n"
    webhook_server.behave(RCPT, raw=raw)
    outcome = await deliver(client, webhook_server)
    assert outcome.reply.is_transient
    assert b"250" not in outcome.reply.to_bytes()
    assert_one_line(outcome.reply)
    assert all(" " <= ch <= "~" for ch in str(outcome.reply.text))


# --- X-Lmtp-Reply -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "header", "expected"),
    [
        # the webhook's code, enhanced code and text, then the delivery id (SPEC 6)
        (403, "550 5.7.1 blocked by policy", "550 5.7.1 blocked by policy (msg_test)"),
        (200, "250 2.1.5 filed in Archive", "250 2.1.5 filed in Archive (msg_test)"),
        (503, "452 4.2.2 quota exceeded", "452 4.2.2 quota exceeded (msg_test)"),
        (503, "550 5.7.1", "550 5.7.1 refused msg_test (HTTP 503): ok"),  # no text: ours
        # 2xx only with HTTP 2xx and 4xx/5xx only without: else the map decides
        (200, "550 5.7.1 no", "250 2.0.0 delivered msg_test (HTTP 200)"),
        (500, "250 2.0.0 fake", "451 4.3.0 deferred msg_test (HTTP 500): ok"),
        # the enhanced code's class must match the reply code
        (404, "550 4.7.1 mixed", "550 5.1.1 refused msg_test (HTTP 404): ok"),
        (404, "450 5.7.1 mixed", "550 5.1.1 refused msg_test (HTTP 404): ok"),
        (404, "garbage", "550 5.1.1 refused msg_test (HTTP 404): ok"),
    ],
)
async def test_lmtp_reply_header(
    client: WebhookClient,
    webhook_server: WebhookServer,
    http_status: int,
    header: str,
    expected: str,
) -> None:
    webhook_server.behave(RCPT, status=http_status, headers={"X-Lmtp-Reply": header})
    outcome = await deliver(client, webhook_server)
    assert str(outcome.reply) == expected


def test_lmtp_reply_header_is_sanitized() -> None:
    reply = map_response(500, "", "550 5.7.1 nope\r\n250 2.0.0 forged", {})
    assert str(reply) == "550 5.7.1 nope"
    reply = map_response(500, "", "550 5.7.1 " + "z" * 600, {})
    assert_one_line(reply)
    assert reply.text == "z" * 200


def test_delivery_id_in_every_reply_text_and_never_cut() -> None:
    did = "msg_" + "a" * 32
    assert str(map_response(200, "", None, {}, did)) == f"250 2.0.0 delivered {did} (HTTP 200)"
    refused = map_response(410, "gone", None, {}, did)
    assert str(refused) == f"550 5.1.1 refused {did} (HTTP 410): gone"
    assert str(map_response(429, "", None, {}, did)) == f"451 4.3.0 deferred {did} (HTTP 429)"
    chosen = map_response(500, "", "550 5.7.1 " + "z" * 600, {}, did)
    assert_one_line(chosen)
    assert str(chosen) == f"550 5.7.1 {'z' * 200} ({did})"
    override = map_response(503, "", None, {"5xx": "452 4.2.2 " + "q" * 300}, did)
    assert str(override).endswith(f" ({did})") and len(override.to_bytes()) <= 512
    timeout = map_transport_error(httpx.ReadTimeout("slow"), {}, did)
    assert str(timeout) == f"451 4.4.2 webhook timed out ({did})"
    overridden = map_transport_error(httpx.ConnectError("no"), {"error": "450 4.4.1"}, did)
    assert str(overridden) == f"450 4.4.1 webhook connection failed ({did})"


def test_lmtp_reply_header_without_text_uses_default_text() -> None:
    assert str(map_response(451, "held", "550 5.7.1", {})) == (
        "550 5.7.1 webhook answered HTTP 451: held"
    )


def test_parse_reply() -> None:
    assert parse_reply("451 4.3.0") == Reply(451, "4.3.0", "")
    assert parse_reply(" 550 5.1.1 no such user ") == Reply(550, "5.1.1", "no such user")
    for bad in ("451", "451 5.3.0", "351 3.0.0", "421 4.3.2 closing", "45 4.3.0", "abc 4.3.0"):
        assert parse_reply(bad) is None


def test_sanitize_text() -> None:
    assert sanitize_text("  \r\n\tfirst\tline  \nsecond") == "firstline"
    assert sanitize_text("caf\u00e9\x1b[0m  \u00fcber  alles ") == "caf[0m ber alles"
    assert sanitize_text("\n\n") == ""
    assert len(sanitize_text("a" * 1000)) == 200


# --- transport failures -----------------------------------------------------------------------


async def test_timeout(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave(RCPT, hang=True)
    outcome = await deliver(client, webhook_server, timeout=0.5)
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.4.2")
    assert outcome.http_status is None
    assert outcome.error == "timeout"
    assert 0.4 < outcome.duration < 3


async def test_slow_answer_within_timeout(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, delay=0.2)
    outcome = await deliver(client, webhook_server, timeout=2.0)
    assert outcome.reply.code == 250


async def test_connection_reset(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave(RCPT, reset=True)
    outcome = await deliver(client, webhook_server)
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.4.1")
    assert outcome.error == "reset"
    assert len(webhook_server.requests_for(RCPT)) == 1


async def test_connection_refused(client: WebhookClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    outcome = await client.deliver(route_for(url), request_for(url))
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.4.1")
    assert outcome.error == "refused"
    assert outcome.http_status is None


@pytest.fixture
def not_tls_server() -> Iterator[str]:
    """A port that answers a TLS ClientHello with plain HTTP bytes: a real TLS failure."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/hook"
    stop.set()
    thread.join(timeout=5)
    listener.close()


async def test_tls_error_real(client: WebhookClient, not_tls_server: str) -> None:
    outcome = await client.deliver(route_for(not_tls_server), request_for(not_tls_server))
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.4.1")
    assert outcome.error == "tls"


async def test_tls_certificate_error_mocked() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed")
        except ssl.SSLError as exc:
            raise httpx.ConnectError("TLS handshake failed", request=request) from exc

    url = "https://hook.example.test/hook"
    async with WebhookClient(transport=httpx.MockTransport(handler)) as mocked:
        outcome = await mocked.deliver(route_for(url), request_for(url))
    assert (outcome.reply.code, outcome.reply.status, outcome.error) == (451, "4.4.1", "tls")


def test_transport_error_map() -> None:
    assert map_transport_error(httpx.ReadTimeout("slow"), {}) == Reply(
        451, "4.4.2", "webhook timed out"
    )
    assert map_transport_error(httpx.PoolTimeout("busy"), {}).status == "4.4.2"
    assert map_transport_error(httpx.ConnectError("refused"), {}).status == "4.4.1"
    assert map_transport_error(httpx.WriteError("broken pipe"), {}).status == "4.4.1"
    assert map_transport_error(httpx.RemoteProtocolError("garbled"), {}).status == "4.3.0"
    assert map_transport_error(ValueError("a bug"), {"error": "554 5.0.0"}) == Reply(
        451, "4.3.0", "internal error"
    )


async def test_bug_is_an_outcome_not_an_exception(
    client: WebhookClient, webhook_server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Iterator[bytes]:
        raise RuntimeError("payload bug")

    request = WebhookRequest(webhook_server.url, [], broken, 10)
    with caplog.at_level(logging.ERROR, logger="bridge.webhook.client"):
        outcome = await client.deliver(route_for(webhook_server.url, retries=2), request)
    assert (outcome.reply.code, outcome.reply.status, outcome.error) == (451, "4.3.0", "internal")
    assert outcome.attempts == 3  # a 451 like any other
    assert any(r.exc_info and "payload bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_wrong_length_is_a_bug_not_a_hang(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    request = request_for(webhook_server.url, [b"12345"], length=9)
    outcome = await client.deliver(route_for(webhook_server.url), request)
    assert (outcome.reply.code, outcome.reply.status, outcome.error) == (451, "4.3.0", "internal")


async def test_cancellation_propagates(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, hang=True)
    route = route_for(webhook_server.url, name="cancel-test", timeout=30)
    with trio.move_on_after(0.3) as scope:
        await client.deliver(route, request_for(webhook_server.url))
        pytest.fail("deliver returned although its caller was cancelled")
    assert scope.cancelled_caught
    in_flight = {"route": "cancel-test"}
    assert REGISTRY.get_sample_value("lmtp_bridge_webhook_requests_in_flight", in_flight) == 0


# --- retries ----------------------------------------------------------------------------------


async def test_retry_until_success(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave(RCPT, [Step(503), Step(503), Step(200)])
    outcome = await deliver(client, webhook_server, retries=2)
    assert outcome.reply.code == 250
    assert (outcome.attempts, outcome.http_status) == (3, 200)
    sent = webhook_server.requests_for(RCPT)
    assert len(sent) == 3
    # every attempt carries the same body and the same delivery id
    assert {r.body for r in sent} == {b'{"hello": "world"}'}
    assert {r.headers["webhook-id"] for r in sent} == {"msg_test"}


async def test_retries_exhausted(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave(RCPT, status=503, body="busy")
    outcome = await deliver(client, webhook_server, retries=2)
    assert str(outcome.reply) == "451 4.3.0 deferred msg_test (HTTP 503): busy"
    assert outcome.attempts == 3
    assert len(webhook_server.requests_for(RCPT)) == 3


async def test_transport_failure_is_retried(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, [Step(reset=True), Step(200)])
    outcome = await deliver(client, webhook_server, retries=1)
    assert (outcome.reply.code, outcome.attempts, outcome.error) == (250, 2, None)


@pytest.mark.parametrize("http_status", [404, 413, 422, 200])
async def test_permanent_and_success_not_retried(
    client: WebhookClient, webhook_server: WebhookServer, http_status: int
) -> None:
    webhook_server.behave(RCPT, status=http_status)
    outcome = await deliver(client, webhook_server, retries=2)
    assert outcome.attempts == 1
    assert len(webhook_server.requests_for(RCPT)) == 1


def test_backoff_is_short_and_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_BASE", 0.2)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert [webhook.backoff_delay(n) for n in (1, 2, 3, 4, 10)] == [0.2, 0.5, 1.25, 2.0, 2.0]


# --- status_map overrides ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "status_map", "expected"),
    [
        ({"status": 404}, {"404": "451 4.3.0"}, (451, "4.3.0")),
        ({"status": 404}, {"4xx": "451 4.3.0"}, (451, "4.3.0")),
        ({"status": 404}, {"404": "550 5.1.1", "4xx": "451 4.3.0"}, (550, "5.1.1")),
        ({"status": 409}, {"404": "550 5.1.1", "4xx": "451 4.3.0"}, (451, "4.3.0")),
        ({"status": 503}, {"5xx": "554 5.0.0 gone"}, (554, "5.0.0")),
        ({"status": 200}, {"2xx": "250 2.6.0"}, (250, "2.6.0")),
        ({"status": 404}, {"404": "250 2.0.0"}, (550, "5.1.1")),  # never a 2xx without HTTP 2xx
        ({"status": 404}, {"404": "nonsense"}, (550, "5.1.1")),
        ({"hang": True}, {"timeout": "452 4.4.2"}, (452, "4.4.2")),
        ({"hang": True}, {"error": "451 4.4.0"}, (451, "4.4.0")),
        ({"reset": True}, {"error": "451 4.4.0", "timeout": "452 4.4.2"}, (451, "4.4.0")),
    ],
)
async def test_status_map_override(
    client: WebhookClient,
    webhook_server: WebhookServer,
    behaviour: dict[str, object],
    status_map: dict[str, str],
    expected: tuple[int, str],
) -> None:
    webhook_server.behave(RCPT, **behaviour)  # type: ignore[arg-type]
    outcome = await deliver(client, webhook_server, status_map=status_map, timeout=0.3)
    assert (outcome.reply.code, outcome.reply.status) == expected
    assert_one_line(outcome.reply)


async def test_override_text_is_used(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave(RCPT, status=503)
    outcome = await deliver(client, webhook_server, status_map={"503": "554 5.0.0 gone for good"})
    assert str(outcome.reply) == "554 5.0.0 gone for good (msg_test)"


# --- what is sent -----------------------------------------------------------------------------


async def test_headers_sent(client: WebhookClient, webhook_server: WebhookServer) -> None:
    extra = [("Authorization", "Bearer t0k3n"), ("Idempotency-Key", "msg_test")]
    request = request_for(webhook_server.url, headers=extra)
    await client.deliver(route_for(webhook_server.url), request)
    (sent,) = webhook_server.requests
    assert sent.method == "POST"
    assert sent.path == "/hook"
    assert sent.headers["user-agent"] == f"lmtp-bridge/{__version__}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == "Bearer t0k3n"
    assert sent.headers["idempotency-key"] == "msg_test"
    assert sent.headers["x-lmtp-rcpt-to"] == RCPT
    assert sent.headers["content-length"] == str(len(sent.body))


@pytest.mark.parametrize(
    "pieces",
    [
        [b"a" * 10, b"b" * 20, b"c" * 30],  # small: sent as one bytes object
        [bytes([i]) * 50_000 for i in range(7)],  # large: streamed
        [b"x" * 300_000, b"", b"y" * 1],
    ],
)
async def test_chunked_body_arrives_whole(
    client: WebhookClient, webhook_server: WebhookServer, pieces: list[bytes]
) -> None:
    request = request_for(webhook_server.url, pieces)
    outcome = await client.deliver(route_for(webhook_server.url, retries=1), request)
    assert outcome.reply.code == 250
    (sent,) = webhook_server.requests
    assert sent.body == b"".join(pieces)
    assert sent.headers["content-length"] == str(len(sent.body))
    assert "transfer-encoding" not in sent.headers


async def test_large_body_resent_whole_on_retry(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, [Step(503), Step(200)])
    pieces = [b"m" * 100_000, b"n" * 100_000]
    outcome = await client.deliver(
        route_for(webhook_server.url, retries=1), request_for(webhook_server.url, pieces)
    )
    assert (outcome.reply.code, outcome.attempts) == (250, 2)
    assert [r.body for r in webhook_server.requests] == [b"".join(pieces)] * 2


async def test_connections_are_reused(client: WebhookClient, webhook_server: WebhookServer) -> None:
    webhook_server.behave("nobody@example.org", status=404, body="no such user")
    for rcpt in (RCPT, "nobody@example.org", RCPT):
        await deliver(client, webhook_server, rcpt=rcpt)
    assert len({r.client_port for r in webhook_server.requests}) == 1


async def test_concurrent_deliveries(client: WebhookClient, webhook_server: WebhookServer) -> None:
    outcomes: dict[str, Outcome] = {}
    for i in range(0, 20, 2):
        webhook_server.behave(f"r{i}@example.org", status=404)

    async def one(rcpt: str) -> None:
        url = webhook_server.url
        outcomes[rcpt] = await client.deliver(route_for(url), request_for(url, rcpt=rcpt))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, f"r{i}@example.org")
    assert len(webhook_server.requests) == 20
    for i in range(20):
        assert outcomes[f"r{i}@example.org"].reply.code == (550 if i % 2 == 0 else 250)


# --- metrics ----------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics(client: WebhookClient, webhook_server: WebhookServer) -> None:
    route = "metrics-test"

    def requests(status_class: str) -> float:
        return sample("lmtp_bridge_webhook_requests_total", route=route, status_class=status_class)

    before = {c: requests(c) for c in ("2xx", "5xx", "error")}
    retries_before = sample("lmtp_bridge_webhook_retries_total", route=route)
    observed_before = sample("lmtp_bridge_webhook_request_duration_seconds_count", route=route)

    webhook_server.behave(RCPT, [Step(503), Step(reset=True), Step(200)])
    outcome = await deliver(client, webhook_server, name=route, retries=2)
    assert outcome.attempts == 3

    assert requests("2xx") - before["2xx"] == 1
    assert requests("5xx") - before["5xx"] == 1
    assert requests("error") - before["error"] == 1
    assert sample("lmtp_bridge_webhook_retries_total", route=route) - retries_before == 2
    observed = sample("lmtp_bridge_webhook_request_duration_seconds_count", route=route)
    assert observed - observed_before == 3
    assert sample("lmtp_bridge_webhook_requests_in_flight", route=route) == 0


async def test_in_flight_gauge_while_waiting(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    route = "inflight-test"
    webhook_server.behave(RCPT, delay=0.5)
    seen: list[float] = []

    async def watch() -> None:
        assert await trio.to_thread.run_sync(webhook_server.wait_for_requests, 1)
        seen.append(sample("lmtp_bridge_webhook_requests_in_flight", route=route))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await deliver(client, webhook_server, name=route)
    assert seen == [1.0]
    assert sample("lmtp_bridge_webhook_requests_in_flight", route=route) == 0


def test_verify_accepts_a_ca_file() -> None:
    import certifi

    assert isinstance(webhook.tls_setting(certifi.where()), ssl.SSLContext)
    assert webhook.tls_setting(False) is False


# --- the test server itself -------------------------------------------------------------------


def test_server_picks_recipient_from_header_json_or_path(webhook_server: WebhookServer) -> None:
    webhook_server.behave("header@example.org", status=410)
    webhook_server.behave("json@example.org", status=413)
    webhook_server.behave("path@example.org", status=507)
    with httpx.Client() as http:
        by_header = http.post(
            webhook_server.url, headers={"X-Lmtp-Rcpt-To": "header%40example.org"}, content=b"x"
        )
        by_json = http.post(webhook_server.url, json={"envelope": {"rcpt_to": "JSON@example.org"}})
        by_path = http.post(f"{webhook_server.url}/path@example.org", content=b"")
        default = http.post(webhook_server.url, content=b"")
    assert [r.status_code for r in (by_header, by_json, by_path, default)] == [410, 413, 507, 200]
    assert default.text == "ok"
    assert len(webhook_server.requests_for("json@example.org")) == 1
    assert webhook_server.requests_for("header@example.org")[0].body == b"x"


def test_server_stops_promptly_with_a_hanging_request() -> None:
    server = WebhookServer().start()
    server.behave("*", hang=True)
    failures: list[BaseException] = []

    def post() -> None:
        try:
            httpx.post(server.url, content=b"x", timeout=30)
        except httpx.HTTPError as exc:
            failures.append(exc)

    caller = threading.Thread(target=post)
    caller.start()
    assert server.wait_for_requests(1)
    server.stop()
    caller.join(timeout=5)
    assert not caller.is_alive()
    assert failures  # the hanging request was dropped, never answered


async def test_a_cookie_set_by_the_webhook_is_never_sent_with_a_later_delivery(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave("*", status=200, headers={"Set-Cookie": "session=abc; Path=/"})
    for _ in range(2):
        assert (await deliver(client, webhook_server)).reply.code == 250
    # the bridge keeps no state between deliveries, cookies included
    assert [r.headers.get("cookie") for r in webhook_server.requests] == [None, None]
