"""The h11 transport against a real HTTP server on 127.0.0.1 that misbehaves on purpose:
it closes idle keep-alive connections, resets mid-response, sends headers slowly, serves TLS."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trustme

from bridge.webhook.client import classify_transport_error
from bridge.webhook.transport import H11Transport

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Behaviour = Callable[["Conn", int], Awaitable[bool]]  # (connection, request number) -> keep going


@dataclass
class Conn:
    stream: trio.abc.Stream
    buffer: bytes = b""

    async def read_request(self) -> bytes | None:
        """One whole request (Content-Length bodies only), or None at EOF."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            rest += data
        self.buffer = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        inner = self.stream
        if isinstance(inner, trio.SSLStream):
            inner = inner.transport_stream
        assert isinstance(inner, trio.SocketStream)
        inner.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        inner.socket.close()


@dataclass
class Server:
    port: int = 0
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


async def _serve(
    behaviour: Behaviour,
    ssl_context: ssl.SSLContext | None,
    server: Server,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.abc.Stream) -> None:
        server.connections += 1
        server.open_now += 1
        server.most_open = max(server.most_open, server.open_now)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True)
        conn = Conn(stream)
        try:
            number = 0
            while True:
                request = await conn.read_request()
                if request is None:
                    return
                server.requests.append(request)
                number += 1
                if not await behaviour(conn, number):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            server.open_now -= 1
            await trio.aclose_forcefully(stream)

    task_status.started()
    await trio.serve_listeners(handle, listeners)


async def answer_ok(conn: Conn, number: int) -> bool:
    await conn.stream.send_all(OK)
    return True


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    async def start(behaviour: Behaviour = answer_ok, tls: ssl.SSLContext | None = None) -> Server:
        server = Server()
        await nursery.start(_serve, behaviour, tls, server)
        return server

    yield start
    nursery.cancel_scope.cancel()


def client(**kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=H11Transport(**kwargs), timeout=5)  # type: ignore[arg-type]


async def test_posts_and_keeps_the_connection_alive(serve) -> None:
    server = await serve()
    async with client() as http:
        for i in range(3):
            response = await http.post(server.url, content=b"x" * (100 + i))
            assert (response.status_code, response.text) == (200, "ok")
    assert server.connections == 1
    assert [r.endswith(b"x" * (100 + i)) for i, r in enumerate(server.requests)] == [True] * 3
    head = server.requests[0].split(b"\r\n\r\n")[0].lower()
    assert b"host: 127.0.0.1:" in head and b"content-length: 100" in head


async def test_a_streamed_body_arrives_whole(serve) -> None:
    server = await serve()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([65 + i]) * 100_000

    async with client() as http:
        response = await http.post(
            server.url, content=pieces(), headers={"Content-Length": "500000"}
        )
    assert response.status_code == 200
    body = server.requests[0].split(b"\r\n\r\n", 1)[1]
    assert body == b"".join(bytes([65 + i]) * 100_000 for i in range(5))


async def test_an_idle_connection_the_server_closed_is_not_used(serve) -> None:
    async def close_after_one(conn: Conn, number: int) -> bool:
        await conn.stream.send_all(OK)
        return False  # the server closes the idle keep-alive connection

    server = await serve(close_after_one)
    async with client() as http:
        for _ in range(3):
            await trio.sleep(0.05)  # the FIN arrives before the next request
            assert (await http.post(server.url, content=b"hi")).status_code == 200
    assert server.connections == 3
    assert len(server.requests) == 3  # each request sent exactly once


async def test_a_request_on_a_dead_connection_is_retried_only_if_no_byte_left(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the idle check to miss it: a reset connection fails the first send() outright, so
    the request goes again on a new one; a connection closed with FIN accepts the bytes, so the
    request may have arrived and is not silently repeated."""
    closing = {"reset": True}

    async def close_after_one(conn: Conn, number: int) -> bool:
        reset = closing["reset"]  # read before answering: the client flips it on the answer
        await conn.stream.send_all(OK)
        if reset:
            await trio.sleep(0.05)  # let the client read the answer first
            conn.reset()
        return False

    monkeypatch.setattr("bridge.webhook.transport._Connection.looks_alive", lambda self: True)
    server = await serve(close_after_one)
    async with client() as http:
        assert (await http.post(server.url, content=b"one")).status_code == 200
        closing["reset"] = False  # the next connection ends with a FIN
        await trio.sleep(0.2)
        assert (await http.post(server.url, content=b"two")).status_code == 200
        assert server.connections == 2
        await trio.sleep(0.2)
        with pytest.raises(httpx.HTTPError) as caught:
            await http.post(server.url, content=b"three")
    assert classify_transport_error(caught.value) == "reset"
    assert [r.rsplit(b"\n", 1)[-1] for r in server.requests] == [b"one", b"two"]


async def test_a_reset_mid_response_is_a_reset_and_the_connection_is_dropped(serve) -> None:
    async def reset_mid_body(conn: Conn, number: int) -> bool:
        if number == 1 and conn is not None and len(calls) == 0:
            calls.append(1)
            await conn.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await trio.sleep(0.05)
            conn.reset()
            return False
        await conn.stream.send_all(OK)
        return True

    calls: list[int] = []
    server = await serve(reset_mid_body)
    async with client() as http:
        with pytest.raises(httpx.HTTPError) as caught:
            await http.post(server.url, content=b"x")
        assert classify_transport_error(caught.value) == "reset"
        assert (await http.post(server.url, content=b"y")).status_code == 200
    assert server.connections == 2


async def test_a_reset_before_any_answer_is_a_reset(serve) -> None:
    async def reset(conn: Conn, number: int) -> bool:
        conn.reset()
        return False

    server = await serve(reset)
    async with client() as http:
        with pytest.raises(httpx.HTTPError) as caught:
            await http.post(server.url, content=b"x")
    assert classify_transport_error(caught.value) == "reset"


async def test_slow_headers_time_out_and_slow_but_in_time_headers_do_not(serve) -> None:
    async def slow_headers(conn: Conn, number: int) -> bool:
        for piece in (b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n", b"\r\nok"):
            await conn.stream.send_all(piece)
            await trio.sleep(0.3)
        return True

    server = await serve(slow_headers)
    async with client() as http:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await http.post(server.url, content=b"x", timeout=httpx.Timeout(5, read=0.1))
        assert classify_transport_error(caught.value) == "timeout"
        response = await http.post(server.url, content=b"x", timeout=httpx.Timeout(5, read=2))
        assert response.status_code == 200


async def test_connect_errors_and_timeouts_are_classified() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.post(f"http://127.0.0.1:{port}/", content=b"x")
    assert classify_transport_error(caught.value) == "refused"


async def test_the_pool_bounds_open_connections_and_times_out(serve) -> None:
    async def slow(conn: Conn, number: int) -> bool:
        await trio.sleep(0.2)
        await conn.stream.send_all(OK)
        return True

    server = await serve(slow)
    async with client(max_connections=2) as http:

        async def post() -> None:
            await http.post(server.url, content=b"x")

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(post)
        assert server.most_open <= 2
        assert len(server.requests) == 6
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(post)
            await trio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await http.post(server.url, content=b"x", timeout=httpx.Timeout(5, pool=0.05))


async def test_a_cancelled_request_frees_its_slot_and_drops_its_connection(serve) -> None:
    async def hang_first(conn: Conn, number: int) -> bool:
        if server.connections == 1:
            await trio.sleep_forever()
        await conn.stream.send_all(OK)
        return True

    server = await serve(hang_first)
    async with client(max_connections=1) as http:
        with trio.move_on_after(0.2):
            await http.post(server.url, content=b"x")
        response = await http.post(server.url, content=b"y", timeout=httpx.Timeout(5, pool=1))
        assert response.status_code == 200
    assert server.connections == 2


async def test_an_unread_response_body_is_not_reused(serve) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"z" * 200000

    async def answer_big(conn: Conn, number: int) -> bool:
        await conn.stream.send_all(big)
        return True

    server = await serve(answer_big)
    async with client() as http:
        for _ in range(2):
            async with http.stream("POST", server.url, content=b"x") as response:
                async for _piece in response.aiter_raw():
                    break
    assert server.connections == 2


async def test_connection_close_from_the_server_is_honoured(serve) -> None:
    async def close_header(conn: Conn, number: int) -> bool:
        await conn.stream.send_all(
            b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbusy"
        )
        return True  # the server would keep reading, but the client must not reuse

    server = await serve(close_header)
    async with client() as http:
        for _ in range(2):
            response = await http.post(server.url, content=b"x")
            assert (response.status_code, response.text) == (503, "busy")
    assert server.connections == 2


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_verified_with_the_right_ca_and_refused_without(serve, ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server = await serve(tls=server_context)
    url = f"https://localhost:{server.port}/hook"
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with client(verify=trusted) as http:
        for _ in range(2):
            assert (await http.post(url, content=b"x")).status_code == 200
    assert server.connections == 1  # TLS connections are kept alive too

    async with client() as http:  # the system CAs do not know ours
        with pytest.raises(httpx.ConnectError) as caught:
            await http.post(url, content=b"x")
    assert classify_transport_error(caught.value) == "tls"

    async with client(verify=False) as http:
        assert (await http.post(url, content=b"x")).status_code == 200
