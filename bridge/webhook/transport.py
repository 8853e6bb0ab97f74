"""A lean httpx transport: HTTP/1.1 with h11 over trio streams, pooled and kept alive.

httpx stays the client API; this replaces httpcore's pool, which costs most of httpx's ~1 ms of
CPU per request. It keeps what the webhook client needs: a bounded pool with keep-alive and
expiry, connect/read/write/pool timeouts from ``request.extensions["timeout"]``, TLS with
verification, and a retry on a fresh connection only when no byte of the request has left.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import h11
import httpx
import trio

from bridge.base import sockio

RECEIVE_SIZE = 64 * 1024
KEEPALIVE_EXPIRY = 5.0  # seconds an idle pooled connection is kept (httpx's default)
CLOSE_TIMEOUT = 1.0  # seconds spent closing a TLS connection politely
MAX_HEADER_BYTES = 64 * 1024  # response head limit

Origin = tuple[str, str, int]  # scheme, host, port


@dataclass(eq=False)
class _Connection:
    origin: Origin
    stream: trio.abc.Stream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0
    requests: int = 0  # requests begun on this connection

    def socket(self) -> trio.socket.SocketType | None:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        return stream.socket if isinstance(stream, trio.SocketStream) else None

    def looks_alive(self) -> bool:
        """An idle HTTP/1.1 connection must be silent: readable means EOF, RST or garbage."""
        sock = self.socket()
        return sock is not None and sock.fileno() >= 0 and not sock.is_readable()


class _NothingSent(Exception):
    """The first write on a reused connection failed before any byte left: safe to retry."""


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    return dict(request.extensions.get("timeout", {}))


def _deadline(seconds: float | None) -> float:
    return trio.current_time() + seconds if seconds is not None else float("inf")


def _fail_at(deadline: float) -> AbstractContextManager[object]:
    """``trio.fail_at(deadline)``, or nothing when the caller's own deadline comes first: our
    timer could never fire, and a cancel scope costs more than the rest of a small write."""
    if deadline >= trio.current_effective_deadline():
        return contextlib.nullcontext()
    return trio.fail_at(deadline)


class H11Transport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=H11Transport(...))``: HTTP/1.1 only, trio only."""

    def __init__(
        self,
        *,
        verify: bool | ssl.SSLContext = True,
        max_connections: int = 100,
        max_keepalive_connections: int | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        if isinstance(verify, ssl.SSLContext):
            self._ssl_context = verify
        else:
            self._ssl_context = ssl.create_default_context()
            if not verify:
                self._ssl_context.check_hostname = False
                self._ssl_context.verify_mode = ssl.CERT_NONE
        self._ssl_context.set_alpn_protocols(["http/1.1"])
        self._max_connections = max_connections
        self._max_idle = min(max_keepalive_connections or max_connections, max_connections)
        self._keepalive_expiry = keepalive_expiry
        self._slots = trio.Semaphore(max_connections)  # one per request in progress
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._in_use = 0
        self._closed = False

    # --- the pool ------------------------------------------------------------------------------

    def _take_idle(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        now = time.monotonic()
        while stack:
            conn = stack.pop()  # most recently used first: the likeliest to be alive
            self._idle_count -= 1
            if now - conn.idle_since < self._keepalive_expiry and conn.looks_alive():
                return conn
            _close_now(conn)
        return None

    def _put_idle(self, conn: _Connection) -> None:
        if self._closed or self._idle_count >= self._max_idle:
            _close_now(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, []).append(conn)
        self._idle_count += 1

    def _make_room(self) -> None:
        """Close the oldest idle connection(s) so that open connections stay bounded."""
        while self._idle_count and self._idle_count + self._in_use >= self._max_connections:
            _origin, stack = min(
                ((o, s) for o, s in self._idle.items() if s), key=lambda item: item[1][0].idle_since
            )
            _close_now(stack.pop(0))
            self._idle_count -= 1

    async def _connect(self, origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
        scheme, host, port = origin
        self._make_room()
        try:
            with trio.fail_after(timeouts.get("connect") or float("inf")):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                try:
                    if scheme == "https":
                        tls = trio.SSLStream(
                            stream,
                            self._ssl_context,
                            server_hostname=host,
                            https_compatible=True,
                        )
                        await tls.do_handshake()
                        stream = tls
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout("timed out connecting to the webhook") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx.ConnectError(f"cannot connect to the webhook: {exc}") from exc
        return _Connection(origin, stream)

    # --- one request ---------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin: Origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        timeouts = _timeouts(request)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            try:
                with _fail_at(_deadline(timeouts.get("pool") or None)):
                    await self._slots.acquire()
            except trio.TooSlowError as exc:
                raise httpx.PoolTimeout("no free connection in the pool") from exc
        self._in_use += 1
        conn: _Connection | None = None
        try:
            body = await _body_start(request)
            while True:
                conn = self._take_idle(origin)
                fresh = conn is None
                if conn is None:
                    conn = await self._connect(origin, timeouts)
                try:
                    head = await self._send_request(conn, request, body, timeouts, fresh)
                    break
                except _NothingSent:
                    _close_now(conn)  # a reused connection that had died: try another
                    conn = None
            stream = _ResponseStream(self, conn, timeouts)
            return httpx.Response(
                head.status_code,
                headers=head.headers.raw_items(),
                stream=stream,
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
            )
        except BaseException:
            if conn is not None:
                _close_now(conn)
            self._release()
            raise

    def _release(self) -> None:
        self._in_use -= 1
        self._slots.release()

    async def _send_request(
        self,
        conn: _Connection,
        request: httpx.Request,
        body: tuple[bytes, AsyncIterator[bytes] | None],
        timeouts: dict[str, float | None],
        fresh: bool,
    ) -> h11.Response:
        conn.requests += 1
        target = request.url.raw_path
        headers = list(request.headers.raw)
        if not any(k.lower() == b"host" for k, _ in headers):
            headers.insert(0, (b"Host", request.url.netloc))
        try:
            first = conn.h11.send(
                h11.Request(method=request.method, target=target, headers=headers)
            )
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        start, rest = body
        data = first + (conn.h11.send(h11.Data(data=start)) if start else b"")
        if rest is None:
            data += conn.h11.send(h11.EndOfMessage())
        write_timeout = timeouts.get("write")
        await self._write_first(conn, data, write_timeout, retry_safe=not fresh)
        if rest is not None:
            async for piece in rest:
                if piece:
                    await _write(conn, conn.h11.send(h11.Data(data=piece)), write_timeout)
            await _write(conn, conn.h11.send(h11.EndOfMessage()), write_timeout)
        while True:
            event = await _next_event(conn, timeouts.get("read"))
            if isinstance(event, h11.InformationalResponse):
                continue
            assert isinstance(event, h11.Response)
            return event

    async def _write_first(
        self, conn: _Connection, data: bytes, seconds: float | None, *, retry_safe: bool
    ) -> None:
        """The first write of a request: on a reused plain-TCP connection, one ``send()`` that
        fails outright means no byte left, and the request may go on another connection."""
        stream = conn.stream
        if retry_safe and type(stream) is trio.SocketStream:
            try:
                sent = os.write(stream.socket.fileno(), data)  # the socket is non-blocking
            except BlockingIOError:
                sent = 0  # a full buffer: the bytes wait for _write below
            except OSError as exc:
                raise _NothingSent from exc
            data = data[sent:]
            if not data:
                return
        elif not retry_safe:
            data = data[sockio.send_now(stream, data) :]
            if not data:
                return
        await _write(conn, data, seconds)

    async def aclose(self) -> None:
        self._closed = True
        for stack in self._idle.values():
            for conn in stack:
                _close_now(conn)
        self._idle.clear()
        self._idle_count = 0


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self, transport: H11Transport, conn: _Connection, timeouts: dict[str, float | None]
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._timeouts = timeouts
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while True:
            event = await _next_event(conn, self._timeouts.get("read"))
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
                return

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        transport = self._transport
        try:
            if (
                self._complete
                and conn.h11.our_state is h11.DONE
                and conn.h11.their_state is h11.DONE
            ):
                conn.h11.start_next_cycle()
                transport._put_idle(conn)
            else:
                _close_now(conn)  # an unread body or Connection: close
        finally:
            transport._release()


async def _body_start(request: httpx.Request) -> tuple[bytes, AsyncIterator[bytes] | None]:
    """A bytes body whole (sent with the head in one write), else an iterator of pieces."""
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):
        return b"".join([piece async for piece in stream]), None
    assert isinstance(stream, httpx.AsyncByteStream)
    return b"", stream.__aiter__()


# httpx's timeouts are per phase, each with its own exception: hence the `seconds` arguments.
async def _write(conn: _Connection, data: bytes, seconds: float | None) -> None:
    try:
        with _fail_at(_deadline(seconds or None)):
            await conn.stream.send_all(data)
    except trio.TooSlowError as exc:
        raise httpx.WriteTimeout("timed out writing to the webhook") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.WriteError(f"webhook connection lost while sending: {exc}") from exc


async def _next_event(conn: _Connection, seconds: float | None) -> h11.Event:
    deadline = _deadline(seconds)
    while True:
        try:
            event = conn.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(f"invalid HTTP from the webhook: {exc}") from exc
        if event is not h11.NEED_DATA:
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            return event  # type: ignore[return-value]
        try:
            with _fail_at(deadline):
                data = await sockio.receive_some(conn.stream, RECEIVE_SIZE)
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout("timed out waiting for the webhook") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"webhook connection lost while reading: {exc}") from exc
        if not data and conn.h11.their_state is h11.SEND_RESPONSE:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        conn.h11.receive_data(bytes(data))


def _close_now(conn: _Connection) -> None:
    """Close without waiting (no TLS close_notify): enough for a connection we give up on."""
    sock = conn.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
