"""Tests for the h11-on-trio HTTP server and the /metrics, /healthz, /readyz handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import prometheus_client
import pytest
import trio
import trio.testing

from bridge.ops import httpserver
from bridge.ops.httpserver import (
    HttpRequest,
    HttpResponse,
    Readiness,
    observability_handler,
    serve_http,
    serve_http_connection,
)
from bridge.ops.metrics import init_metrics


async def echo(request: HttpRequest) -> HttpResponse:
    """Answers with what it received, so tests see the request as the handler saw it."""
    summary = f"{request.method} {request.target} {len(request.body)}"
    headers = [("x-summary", summary), ("x-got-header", request.header("X-Test") or "")]
    return HttpResponse(200, headers, request.body)


async def start(
    nursery: trio.Nursery, handler: httpserver.Handler, max_body: int = httpserver.DEFAULT_MAX_BODY
) -> str:
    port = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0, max_body=max_body))
    return f"http://127.0.0.1:{port}"


async def raw_exchange(base_url: str, data: bytes) -> bytes:
    """Send raw bytes, then read everything until the server closes."""
    port = int(base_url.rsplit(":", 1)[1])
    received = bytearray()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                received += chunk
    return bytes(received)


def ready_gauge() -> float | None:
    return prometheus_client.REGISTRY.get_sample_value("lmtp_bridge_ready")


async def test_healthz_answers_ok(nursery: trio.Nursery) -> None:
    url = await start(nursery, observability_handler(Readiness(True)))
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/healthz")
    assert response.status_code == 200
    assert response.text.strip() == "ok"


async def test_readyz_follows_readiness_and_gauge(nursery: trio.Nursery) -> None:
    readiness = Readiness(True)
    url = await start(nursery, observability_handler(readiness))
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{url}/readyz")
        assert (ready.status_code, ready.text.strip()) == (200, "ready")
        assert readiness.ready
        assert ready_gauge() == 1.0

        readiness.set_ready(False)
        draining = await client.get(f"{url}/readyz")
        assert (draining.status_code, draining.text.strip()) == (503, "draining")
        assert not readiness.ready
        assert ready_gauge() == 0.0
        # Health is about the event loop, not about accepting mail.
        assert (await client.get(f"{url}/healthz")).status_code == 200

        readiness.set_ready(True)
        assert (await client.get(f"{url}/readyz")).status_code == 200
        assert ready_gauge() == 1.0


def test_readiness_sets_gauge_on_creation() -> None:
    Readiness(False)
    assert ready_gauge() == 0.0
    Readiness(True)
    assert ready_gauge() == 1.0


async def test_metrics_in_prometheus_text_format(nursery: trio.Nursery) -> None:
    init_metrics(["default"])
    url = await start(nursery, observability_handler(Readiness(True)))
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert "lmtp_bridge_build_info{" in response.text
    assert "lmtp_bridge_ready 1.0" in response.text
    # pre-initialised: the series exists before any request (its value depends on earlier tests)
    assert 'lmtp_bridge_webhook_requests_total{route="default",status_class="5xx"} ' in (
        response.text
    )


async def test_unknown_path_404_and_other_methods_405(nursery: trio.Nursery) -> None:
    url = await start(nursery, observability_handler(Readiness(True)))
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/nope")).status_code == 404
        refused = await client.post(f"{url}/metrics", content=b"x")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET"
        # A query string does not change the path.
        assert (await client.get(f"{url}/healthz?verbose=1")).status_code == 200


async def test_handler_sees_method_target_headers_and_body(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/hook?x=1", content=b"hello body", headers={"X-Test": "yes"}
        )
    assert response.status_code == 200
    assert response.content == b"hello body"
    assert response.headers["x-summary"] == "POST /hook?x=1 10"
    assert response.headers["x-got-header"] == "yes"
    assert response.headers["content-length"] == "10"
    assert response.headers["server"].startswith("lmtp-bridge/")


async def test_chunked_request_body_is_assembled(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"one ", b"two ", b"three"):
            yield piece

    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/hook", content=pieces())
    assert response.status_code == 200
    assert response.content == b"one two three"


async def test_keep_alive_serves_two_requests_on_one_connection(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)
    port = int(url.rsplit(":", 1)[1])
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            )
            first = bytearray()
            while not first.endswith(b"abc"):
                first += await stream.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            assert b"x-summary: POST /first 3" in first

            # The same connection still answers; this time the client asks to close.
            await stream.send_all(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            second = bytearray()
            while chunk := await stream.receive_some(65536):
                second += chunk
    assert second.startswith(b"HTTP/1.1 200 ")
    assert b"x-summary: GET /second 0" in second


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)
    data = await raw_exchange(
        url,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert data.count(b"HTTP/1.1 200 ") == 3
    assert data.index(b"GET /a") < data.index(b"GET /b") < data.index(b"GET /c")


async def test_body_over_max_body_is_413(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo, max_body=10)
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{url}/hook", content=b"x" * 10)).status_code == 200
        too_big = await client.post(f"{url}/hook", content=b"x" * 11)
        assert too_big.status_code == 413

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"xxxx"

        chunked = await client.post(f"{url}/hook", content=pieces())
        assert chunked.status_code == 413
        # Far more than the socket buffers hold: the answer still reaches the client.
        huge = await client.post(f"{url}/hook", content=b"x" * 8_000_000)
        assert huge.status_code == 413
        # The server is still there for the next request.
        assert (await client.post(f"{url}/hook", content=b"ok")).status_code == 200


async def test_expect_100_continue_gets_interim_answer(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)
    data = await raw_exchange(
        url,
        b"POST /h HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\nhi",
    )
    assert data.startswith(b"HTTP/1.1 100 ")
    assert b"HTTP/1.1 200 " in data
    assert data.endswith(b"hi")


async def test_handler_exception_is_500_and_server_survives(nursery: trio.Nursery) -> None:
    async def flaky(request: HttpRequest) -> HttpResponse:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return HttpResponse(200, body=b"fine")

    url = await start(nursery, flaky)
    async with httpx.AsyncClient() as client:
        failed = await client.get(f"{url}/boom")
        assert failed.status_code == 500
        assert b"handler bug" not in failed.content  # internals are logged, not shown
        assert (await client.get(f"{url}/fine")).content == b"fine"


async def test_invalid_response_from_handler_is_500(nursery: trio.Nursery) -> None:
    async def bad(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, [("x-bad", "caf\u00e9\u2603")], b"")

    url = await start(nursery, bad)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/")).status_code == 500


async def test_head_response_has_no_body(nursery: trio.Nursery) -> None:
    async def hello(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, body=b"hello")

    url = await start(nursery, hello)
    data = await raw_exchange(url, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 5\r\n" in data
    assert data.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_and_server_survives(
    nursery: trio.Nursery, garbage: bytes
) -> None:
    url = await start(nursery, echo)
    data = await raw_exchange(url, garbage)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in data.lower()
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/after")).status_code == 200


async def test_oversized_headers_are_refused(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)
    # Larger than one read, so h11 sees an incomplete head grow past its limit.
    big = b"a" * (4 * httpserver.MAX_RECV)
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + big + b"\r\n\r\n"
    data = await raw_exchange(url, huge)
    assert data.startswith(b"HTTP/1.1 431 ")


async def test_client_closing_midway_does_not_kill_server(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo)
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
    await stream.aclose()
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/after")).status_code == 200


async def test_ipv6_loopback(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_http, observability_handler(Readiness(True)), "::1", 0)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://[::1]:{port}/healthz")
    assert response.status_code == 200


async def test_idle_connection_is_closed_after_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http_connection, server, echo)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = bytearray()
        while not answer.endswith(b"\r\n\r\n"):
            answer += await client.receive_some()
        started = trio.current_time()
        # Silence: the server closes without a word once the idle timeout has passed.
        rest = await client.receive_some()
        assert rest == b""
        assert trio.current_time() - started == pytest.approx(httpserver.IDLE_TIMEOUT)


async def test_silence_mid_request_is_408(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http_connection, server, echo)
        await client.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        answer = bytearray()
        while chunk := await client.receive_some():
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ")
