"""A real HTTP/1.1 webhook receiver on 127.0.0.1 for tests, run in its own thread.

Behaviour is programmable per recipient; every request is recorded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_KEY = "*"  # behaviour for recipients nobody programmed


@dataclass(frozen=True)
class Step:
    """One answer. ``hang`` waits until the server stops; ``reset`` closes with a TCP RST;
    ``raw`` writes these exact bytes instead of a well-formed response, then closes."""

    status: int = 200
    body: str | bytes = "ok"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    reset: bool = False
    raw: bytes | None = None


class Headers(Mapping[str, str]):
    """Case-insensitive, read-only request headers; repeated fields are joined with ", "."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            self._items[key] = f"{self._items[key]}, {value}" if key in self._items else value

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Headers
    body: bytes
    received_at: float  # time.monotonic()
    rcpt: str | None  # the key the behaviour was chosen by
    client_port: int  # the same for requests on one keep-alive connection

    def json(self) -> Any:
        return json.loads(self.body)


def recipient_of(path: str, headers: Headers, body: bytes) -> str | None:
    """Which recipient a request is for: X-Lmtp-Rcpt-To, else the JSON envelope (or the
    ``rcpt`` of a recipient.verify question), else the path."""
    if "x-lmtp-rcpt-to" in headers:
        return urllib.parse.unquote(headers["x-lmtp-rcpt-to"])
    if "json" in headers.get("content-type", ""):
        try:
            payload = json.loads(body)
            is_question = payload.get("type") == "recipient.verify"
            rcpt = payload["rcpt"] if is_question else payload["envelope"]["rcpt_to"]
        except (ValueError, KeyError, TypeError, AttributeError):
            rcpt = None
        if isinstance(rcpt, str):
            return rcpt
    segment = urllib.parse.unquote(urllib.parse.urlsplit(path).path.rsplit("/", 1)[-1])
    return segment or None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            # The TLS handshake runs here, in the handler's thread, not in the accept loop.
            self.request.settimeout(5)
            self.request.do_handshake()
            self.request.settimeout(None)
            cert = self.request.getpeercert()
            self.server.owner._peer_certs.append(cert)
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _handle(self) -> None:
        owner = self.server.owner
        received_at = time.monotonic()
        headers = Headers(self.headers.items())
        body = self._read_body()
        rcpt = recipient_of(self.path, headers, body)
        recorded = RecordedRequest(
            self.command, self.path, headers, body, received_at, rcpt, self.client_address[1]
        )
        owner._record(recorded)
        # A computed answer (per-message verdicts), else the one programmed for rcpt.
        step = owner.responder(recorded) if owner.responder else owner._next_step(rcpt)

        if step.hang:
            owner._stopping.wait()
            self._abort(rst=False)
            return
        if step.delay and owner._stopping.wait(step.delay):
            self._abort(rst=False)
            return
        if step.reset:
            self._abort(rst=True)
            return
        if step.raw is not None:
            self.wfile.write(step.raw)
            self._abort(rst=False)
            return

        payload = step.body.encode() if isinstance(step.body, str) else step.body
        self.send_response(step.status)
        names = {name.lower() for name in step.headers}
        if "content-type" not in names:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        for name, value in step.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _abort(self, *, rst: bool) -> None:
        """Drop the connection without (further) answer; with ``rst`` the peer sees a reset."""
        self.close_connection = True
        if rst:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The makefile() reader holds a reference: the fd only closes when both are closed.
        self.rfile.close()
        self.connection.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default backlog of 5 resets concurrent connects
    owner: WebhookServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up early is normal here; anything else is kept for the test.
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError | ssl.SSLError | TimeoutError):
            self.owner.errors.append(error)


class WebhookServer:
    """Start with ``start()`` (or ``with``); ``url`` is ``http://127.0.0.1:<port>/hook``.

    With ``tls`` (a server-side SSLContext) it speaks HTTPS: ``https://127.0.0.1:<port>/hook``;
    ``peer_certs`` then lists the client certificate of each connection (empty dict: none).
    """

    def __init__(self, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._behaviour: dict[str, list[Step]] = {}
        self._requests: list[RecordedRequest] = []
        self._connections: set[socket.socket] = set()
        self.errors: list[BaseException | None] = []  # unexpected handler exceptions
        self._peer_certs: list[Any] = []
        # When set, every answer is computed from the request instead of programmed per rcpt.
        self.responder: Callable[[RecordedRequest], Step] | None = None
        self._httpd = _Server(("127.0.0.1", port), _Handler)  # port 0: any free one
        self._httpd.owner = self
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.port: int = self._httpd.server_address[1]
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.url = f"{self.base_url}/hook"

    # --- programming ---

    def behave(
        self,
        rcpt: str,
        steps: Sequence[Step] | None = None,
        *,
        status: int = 200,
        body: str | bytes = "ok",
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        hang: bool = False,
        reset: bool = False,
        raw: bytes | None = None,
    ) -> None:
        """Program the answers for ``rcpt`` (``"*"``: everyone else).

        With ``steps`` the answers are used in order and the last one repeats; otherwise the
        keyword arguments describe the one answer given every time.
        """
        if steps is None:
            steps = [Step(status, body, dict(headers or {}), delay, hang, reset, raw)]
        if not steps:
            raise ValueError("at least one step")
        with self._lock:
            self._behaviour[rcpt.casefold()] = list(steps)

    def _next_step(self, rcpt: str | None) -> Step:
        with self._lock:
            steps = self._behaviour.get((rcpt or "").casefold())
            if steps is None:
                steps = self._behaviour.get(DEFAULT_KEY)
            if steps is None:
                return Step()
            return steps.pop(0) if len(steps) > 1 else steps[0]

    # --- recording ---

    def _record(self, request: RecordedRequest) -> None:
        with self._arrived:
            self._requests.append(request)
            self._arrived.notify_all()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until ``count`` requests have arrived (from trio: ``trio.to_thread.run_sync``)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self._requests) >= count, timeout)

    @property
    def peer_certs(self) -> list[Any]:
        with self._lock:
            return list(self._peer_certs)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, rcpt: str) -> list[RecordedRequest]:
        wanted = rcpt.casefold()
        return [r for r in self.requests if (r.rcpt or "").casefold() == wanted]

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    # --- lifecycle ---

    def start(self) -> WebhookServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: hanging and delayed handlers give up, idle keep-alive links close."""
        self._stopping.set()
        if self._thread.is_alive():
            self._httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
