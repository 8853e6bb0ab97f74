"""Failures people can tell apart: DNS, refused, reset, TLS and timeout, each with its own
`error=` value and reply text (SPEC 4's enhanced codes kept), for both webhook transports (ours on
h11, and httpx's own: http_transport = httpx), against real sockets; and log lines that carry the
delivery id, the MTA's queue id (XFORWARD IDENT) and the Message-ID."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import pytest
import trio
import trustme
from bridge_process import StartBridge, message, open_session
from webhook_server import WebhookServer

from bridge.base.route import Route
from bridge.webhook import client as webhook
from bridge.webhook.client import Outcome, WebhookClient, WebhookRequest
from bridge.webhook.transport import H11Transport

Behaviour = Callable[[socket.socket, threading.Event], None]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_BASE", 0.01)


@pytest.fixture(params=["h11", "httpx"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[WebhookClient]:
    """The WebhookClient as the bridge builds it: on our h11 transport (the default) or on
    httpx's own (http_transport = httpx). Certificates are checked against the system's CAs."""
    transport = H11Transport() if request.param == "h11" else None
    async with WebhookClient(transport=transport) as opened:
        yield opened


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_request_head(conn: socket.socket) -> None:
    seen = b""
    while b"\r\n\r\n" not in seen:
        data = conn.recv(65536)
        if not data:
            return
        seen += data


def reset_after_request(conn: socket.socket, stop: threading.Event) -> None:
    read_request_head(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST


def never_answer(conn: socket.socket, stop: threading.Event) -> None:
    read_request_head(conn)
    stop.wait(30)


def answer_ok(conn: socket.socket, stop: threading.Event) -> None:
    read_request_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


@contextmanager
def tcp_server(behave: Behaviour, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A real server on 127.0.0.1 (its port), one thread per connection doing ``behave``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)  # a refused handshake ends here
            behave(conn, stop)
        except OSError:
            pass
        finally:
            conn.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def route(url: str, timeout: float = 10.0) -> Route:
    return Route(name="test", url=url, timeout=timeout, retries=0)


def request(url: str) -> WebhookRequest:
    return WebhookRequest(
        url=url,
        headers=[("Content-Type", "application/json"), ("webhook-id", "msg_test")],
        chunks=lambda: iter([b'{"hello": "world"}']),
        length=18,
    )


async def post(client: WebhookClient, url: str, route_timeout: float = 10.0) -> Outcome:
    with trio.fail_after(60):
        return await client.deliver(route(url, route_timeout), request(url))


def summary(outcome: Outcome) -> tuple[str | None, str]:
    return outcome.error, str(outcome.reply)


async def test_refused(client: WebhookClient) -> None:
    outcome = await post(client, f"http://127.0.0.1:{closed_port()}/hook")
    assert summary(outcome) == ("refused", "451 4.4.1 webhook connection refused")
    assert outcome.detail == "Connection refused"


async def test_host_name_that_does_not_resolve(client: WebhookClient) -> None:
    outcome = await post(client, "http://nonexistent.invalid/hook")
    assert summary(outcome) == ("dns", "451 4.4.1 webhook host name not found (DNS)")
    assert outcome.detail  # the resolver's words, e.g. "Name or service not known"


async def test_reset_by_the_server(client: WebhookClient) -> None:
    with tcp_server(reset_after_request) as port:
        outcome = await post(client, f"http://127.0.0.1:{port}/hook")
    assert summary(outcome) == ("reset", "451 4.4.1 webhook connection reset")


async def test_server_that_never_answers_times_out(client: WebhookClient) -> None:
    with tcp_server(never_answer) as port:
        outcome = await post(client, f"http://127.0.0.1:{port}/hook", route_timeout=1.0)
    assert summary(outcome) == ("timeout", "451 4.4.2 webhook timed out")


@pytest.fixture(scope="module")
def untrusted_tls() -> ssl.SSLContext:
    """A server certificate for 127.0.0.1 from a CA nobody trusts."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_tls_certificate_not_trusted(
    client: WebhookClient, untrusted_tls: ssl.SSLContext
) -> None:
    with tcp_server(answer_ok, tls=untrusted_tls) as port:
        outcome = await post(client, f"https://127.0.0.1:{port}/hook")
    error, reply = summary(outcome)
    assert error == "tls"
    assert reply.startswith("451 4.4.1 webhook TLS error: certificate verify failed: "), reply
    assert "issuer" in reply  # "unable to get local issuer certificate": says which problem


async def test_every_failure_has_its_own_reply_text(
    client: WebhookClient, untrusted_tls: ssl.SSLContext
) -> None:
    outcomes = [
        await post(client, f"http://127.0.0.1:{closed_port()}/hook"),
        await post(client, "http://nonexistent.invalid/hook"),
    ]
    with tcp_server(reset_after_request) as port:
        outcomes.append(await post(client, f"http://127.0.0.1:{port}/hook"))
    with tcp_server(never_answer) as port:
        outcomes.append(await post(client, f"http://127.0.0.1:{port}/hook", route_timeout=1.0))
    with tcp_server(answer_ok, tls=untrusted_tls) as port:
        outcomes.append(await post(client, f"https://127.0.0.1:{port}/hook"))
    assert [o.error for o in outcomes] == ["refused", "dns", "reset", "timeout", "tls"]
    assert len({o.reply.text for o in outcomes}) == len(outcomes)
    assert [o.reply.status for o in outcomes] == ["4.4.1", "4.4.1", "4.4.1", "4.4.2", "4.4.1"]


# ---- the log lines of a delivery ---------------------------------------------------------------


def bridge_records(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, object]]:
    found = []
    for record in caplog.records:
        if record.getMessage() == msg:
            fields = dict(getattr(record, "fields", {}) or {})
            fields.update({k: v for k, v in record.__dict__.items() if k in LOG_KEYS})
            found.append(fields)
    return found


LOG_KEYS = ("delivery_id", "queue_id", "message_id", "attempt", "error", "detail", "route")


@pytest.mark.parametrize("transport", ["h11", "httpx"])
async def test_log_lines_name_the_delivery_the_queue_id_and_the_message_id(
    transport: str,
    start_bridge: StartBridge,
    webhook_server: WebhookServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    url = f"http://127.0.0.1:{closed_port()}/hook"
    running = await start_bridge(webhook_url=url, http_retries=1, http_transport=transport)
    client = await open_session(running)
    assert (await client.command("XFORWARD IDENT=4Bc1dQ2xyzz")).code == 250
    assert (await client.command("MAIL FROM:<alice@example.org>")).code == 250
    assert (await client.command("RCPT TO:<bob@example.org>")).code == 250
    assert (await client.command("DATA")).code == 354
    evil_id = "<e2e\x1b[31m" + "x" * 300 + "@example.org>"
    body = message(Message_ID=evil_id).replace(b"Message-ID: <e2e-test@example.org>\r\n", b"")
    await client.send(body + b".\r\n")
    reply = await client.reply()
    assert (reply.code, reply.status) == (451, "4.4.1")
    assert "webhook connection refused" in reply.text, reply
    await client.aclose()

    (retried,) = bridge_records(caplog, "webhook attempt failed; retrying")
    (final,) = bridge_records(caplog, "recipient deferred")
    assert retried["attempt"] == 1 and final["attempts"] == 2
    for fields in (retried, final):
        assert fields["error"] == "refused" and fields["detail"] == "Connection refused"
        assert fields["queue_id"] == "4Bc1dQ2xyzz"
        assert str(fields["delivery_id"]).startswith("msg_")
        shown = str(fields["message_id"])
        assert shown.startswith("<e2e[31mxxx") and shown.endswith("...")  # no ESC, bounded
        assert len(shown) == 128 and shown.isprintable() and " " not in shown
    assert retried["delivery_id"] == final["delivery_id"]
    json.dumps(final)  # plain values: the JSON log format can write them
