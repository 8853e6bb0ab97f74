"""A small HTTP/1.1 server (h11 on trio) for /metrics, /healthz, /readyz and the demo receiver.
Handlers are plain async functions from a fully read `HttpRequest` to an `HttpResponse`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import NoReturn

import h11
import prometheus_client
import trio

from bridge import __version__
from bridge.ops.logs import log_event
from bridge.ops.metrics import READY

IDLE_TIMEOUT = 30.0
"""Seconds a connection may stay silent (between requests or mid-request) before it is closed."""
CLOSE_LINGER = 2.0
"""Seconds spent reading what the client still sends after we decided to close (see _close)."""
MAX_RECV = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_BODY = 64 * 1024 * 1024

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]  # names in lower case, values decoded as latin-1
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def text_response(
    status: int, text: str, headers: list[tuple[str, str]] | None = None
) -> HttpResponse:
    """A `text/plain` response; a trailing newline is added for curl users."""
    return HttpResponse(
        status,
        [("content-type", "text/plain; charset=utf-8"), *(headers or [])],
        f"{text}\n".encode(),
    )


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `handler` on host:port until cancelled; `task_status.started()` gets the bound port.

    `host` may be an IPv6 literal with or without brackets; "" listens on every interface.
    """
    bind_host = host.strip("[]") or None
    listeners = await trio.open_tcp_listeners(port, host=bind_host)
    if port == 0 and len(listeners) > 1:
        # Port 0 gives every address family its own random port; report and serve only one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound_port: int = listeners[0].socket.getsockname()[1]

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http_connection(stream, handler, max_body=max_body)

    log_event(logger, logging.INFO, "http server listening", host=host, port=bound_port)
    task_status.started(bound_port)
    await trio.serve_listeners(on_connection, listeners)


async def serve_http_connection(
    stream: trio.abc.Stream, handler: Handler, *, max_body: int = DEFAULT_MAX_BODY
) -> None:
    """Answer requests on one connection until either side closes it; never raises (but Cancelled).

    Requests are answered one after another (keep-alive, pipelining); bodies over `max_body`
    answer 413, malformed requests 400, a failing handler 500.
    """
    connection = _Connection(stream, handler, max_body)
    try:
        await connection.run()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        log_event(logger, logging.DEBUG, "http connection lost", error=repr(exc))
    except Exception:
        log_event(logger, logging.ERROR, "http connection failed", exc_info=True)
    finally:
        await trio.aclose_forcefully(stream)


class _Timeout(Exception):
    pass


class _Connection:
    def __init__(self, stream: trio.abc.Stream, handler: Handler, max_body: int) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def run(self) -> None:
        while True:
            try:
                request = await self._read_request()
            except _Timeout:
                # Silence between requests is a normal end of keep-alive; mid-request it is a 408.
                if self.h11.their_state is not h11.IDLE or self.h11.trailing_data[0]:
                    await self._send_error(text_response(408, "request timeout"))
                await self._close()
                return
            except h11.RemoteProtocolError as exc:
                log_event(logger, logging.DEBUG, "malformed http request", error=str(exc))
                await self._send_error(text_response(exc.error_status_hint, f"bad request: {exc}"))
                await self._close()
                return
            if request is None:
                return
            if isinstance(request, HttpResponse):
                await self._send_error(request)
                await self._close()
                return

            response = await self._call_handler(request)
            await self._send_response(response, head=request.method == "HEAD")
            if self.h11.our_state is h11.MUST_CLOSE:
                await self._close()
                return
            self.h11.start_next_cycle()

    async def _read_request(self) -> HttpRequest | HttpResponse | None:
        """The next complete request; None when the client closed; a 413 response when too big."""
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise RuntimeError(f"unexpected h11 event {event!r}")
        head = event
        declared = _content_length(head.headers)
        if declared is not None and declared > self.max_body:
            return text_response(413, "request body too large")
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    return text_response(413, "request body too large")
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # h11 raises on a close mid-body, so this is a bug, not the client's fault
                raise RuntimeError(f"unexpected h11 event {event!r}")
        return HttpRequest(
            method=head.method.decode("ascii"),
            target=head.target.decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
            body=bytes(body),
        )

    async def _next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is h11.PAUSED:  # we always finish a cycle before asking for more
                raise RuntimeError("h11 paused while reading a request")
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            data: bytes | bytearray = b""
            with trio.move_on_after(IDLE_TIMEOUT) as scope:
                data = await self.stream.receive_some(MAX_RECV)
            if scope.cancelled_caught:
                raise _Timeout
            self.h11.receive_data(bytes(data))

    async def _call_handler(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self.handler(request)
        except Exception:
            log_event(
                logger,
                logging.ERROR,
                "http handler failed",
                exc_info=True,
                method=request.method,
                path=request.path,
            )
            return text_response(500, "internal server error")

    async def _send_response(self, response: HttpResponse, *, head: bool) -> None:
        try:
            start = self._response_head(response)
        except (h11.LocalProtocolError, ValueError):  # e.g. a non-ASCII header from the handler
            log_event(logger, logging.ERROR, "http handler gave an invalid response", exc_info=True)
            response = text_response(500, "internal server error")
            start = self._response_head(response)
        await self._send(start)
        if response.body and not head:
            await self._send(h11.Data(data=response.body))
        await self._send(h11.EndOfMessage())

    async def _send_error(self, response: HttpResponse) -> None:
        """Answer a request we will not serve, then the connection closes."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        closing = HttpResponse(
            response.status, [*response.headers, ("connection", "close")], response.body
        )
        await self._send_response(closing, head=False)

    def _response_head(self, response: HttpResponse) -> h11.Response:
        headers = [
            (name, value)
            for name, value in response.headers
            if name.lower() not in ("content-length", "transfer-encoding", "date", "server")
        ]
        headers += [
            ("content-length", str(len(response.body))),
            ("date", formatdate(usegmt=True)),
            ("server", f"lmtp-bridge/{__version__}"),
        ]
        return h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )

    async def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            # A client that stops reading must not pin the connection forever.
            with trio.fail_after(IDLE_TIMEOUT):
                await self.stream.send_all(data)

    async def _close(self) -> None:
        """Close our side, then read what is left for a moment so our answer is not reset away.

        Closing a socket with unread input makes the kernel send RST, and the client may lose the
        413 or 400 we just wrote; reading until EOF (bounded in time) avoids that.
        """
        with trio.move_on_after(CLOSE_LINGER):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            while await self.stream.receive_some(MAX_RECV):
                pass


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has already checked it is a number
    return None


class Readiness:
    """Whether the bridge accepts connections; mirrored in the `lmtp_bridge_ready` gauge."""

    def __init__(self, ready: bool = False) -> None:
        self._ready = ready
        READY.set(1 if ready else 0)

    @property
    def ready(self) -> bool:
        return self._ready

    def set_ready(self, ready: bool) -> None:
        self._ready = ready
        READY.set(1 if ready else 0)


def observability_handler(readiness: Readiness) -> Handler:
    """GET /metrics, /healthz and /readyz; 404 for other paths, 405 for other methods."""

    async def handle(request: HttpRequest) -> HttpResponse:
        path = request.path
        if path not in ("/metrics", "/healthz", "/readyz"):
            return text_response(404, "not found")
        if request.method != "GET":
            return text_response(405, "method not allowed", [("allow", "GET")])
        if path == "/metrics":
            body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
            return HttpResponse(
                200, [("content-type", prometheus_client.CONTENT_TYPE_LATEST)], body
            )
        if path == "/healthz":
            return text_response(200, "ok")
        if readiness.ready:
            return text_response(200, "ready")
        return text_response(503, "draining")

    return handle


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
