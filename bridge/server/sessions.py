"""The LMTP server on trio: listeners (TCP and unix), one task per session, timeouts, drain.

Each session feeds socket bytes to the sans-IO core and acts on its events; a bug in one
session answers 421 there and never reaches the rest of the server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from bridge.base import sockio
from bridge.base.transaction import Envelope, MemoryBudget, MessageBuffer, Recipient
from bridge.delivery.deliverer import Deliverer, Transaction
from bridge.delivery.routing import Router
from bridge.delivery.verify import Verifier
from bridge.lmtp.connection import Limits, LmtpServerConnection
from bridge.lmtp.events import (
    NEED_DATA,
    ConnectionClosed,
    MailFrom,
    MessageAborted,
    MessageData,
    MessageEnd,
    MessageStart,
    ProtocolError,
    Quit,
    RcptTo,
    Reply,
    StartTls,
)
from bridge.ops import metrics
from bridge.ops.logs import log_event
from bridge.webhook.signing import delivery_id

log = logging.getLogger("bridge.server.sessions")

RECEIVE_SIZE = 64 * 1024
EVICT_AFTER = 1.0  # seconds a session must have been idle before a new one may evict it
# seconds for a TLS close_notify, a 421 to a refused connection, the replies after a bug;
# and for replies owed to sessions still open when the shutdown grace ends
CLOSE_GRACE = 2.0

IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Shutting down, try again later")
CUT_BY_SHUTDOWN = Reply(451, "4.3.2", "Shutting down before the webhook answered, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error in the bridge, try again later")
EVICTED = Reply(421, "4.3.2", "Too many connections, closing this idle one")
SESSION_ERROR = Reply(421, "4.3.0", "Internal error in the bridge, closing connection")
NO_ROUTE = Reply(550, "5.1.1", "No route for this recipient")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    hostname: str
    limits: Limits
    idle_timeout: float = 300.0
    max_connections: int = 1000
    shutdown_grace: float = 25.0
    spool_threshold: int = 1 << 20
    spool_dir: str | None = None
    spool_memory_limit: int = 64 << 20  # bytes of messages all sessions hold in memory
    reply_buffer: int = 1 << 20  # octets of unsent replies before the session stops reading
    log_addresses: bool = False  # addresses in the outcome lines of RCPT refusals
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this server context


class LmtpServer:
    """Accepts LMTP sessions on any number of listeners until ``drain()``."""

    def __init__(
        self,
        options: ServerOptions,
        router: Router,
        deliverer: Deliverer,
        verifier: Verifier | None = None,
    ) -> None:
        self.options = options
        self.router = router
        self.deliverer = deliverer
        self.verifier = verifier  # asks a route's verify_url at RCPT; None: nobody is asked
        self.draining = False
        self.drain_deadline = math.inf
        self._sessions: set[Session] = set()
        self._stop_accepting = trio.CancelScope()
        self.memory_budget = MemoryBudget(options.spool_memory_limit)

    def drain(self) -> None:
        """Stop accepting; idle sessions get 421 now, open transactions get the grace period."""
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = trio.current_time() + self.options.shutdown_grace
        self._stop_accepting.cancel()
        for session in list(self._sessions):
            session.begin_drain(self.drain_deadline)

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``drain()`` and until every session has ended (or the grace is over)."""
        async with trio.open_nursery() as sessions:
            with self._stop_accepting:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, sessions)
                    task_status.started()
            for listener in listeners:
                await listener.aclose()
            # sessions still running after the grace (plus time for their last replies) are cut
            sessions.cancel_scope.deadline = self.drain_deadline + CLOSE_GRACE

    async def _accept_loop(self, listener: trio.SocketListener, sessions: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s; pausing", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            sessions.start_soon(self._run_session, stream)

    async def _run_session(self, stream: trio.SocketStream) -> None:
        metrics.CONNECTIONS.inc()
        async with stream:
            if len(self._sessions) >= self.options.max_connections and not self._evict_one():
                metrics.PROTOCOL_ERRORS.labels("too_many_connections").inc()
                await _send_last(stream, TOO_MANY_CONNECTIONS)
                return
            session = Session(self, stream)
            self._sessions.add(session)
            metrics.CONNECTIONS_ACTIVE.inc()
            try:
                await session.run()
            finally:
                self._sessions.discard(session)
                metrics.CONNECTIONS_ACTIVE.dec()

    def _evict_one(self) -> bool:
        """At the connection limit, an idle session (waiting for a command, outside a
        transaction, for at least EVICT_AFTER seconds) makes room for a new connection: the
        longest idle one gets 421. So idle or trickling connections (slowloris) cannot lock
        out MTAs with mail to deliver; False when every session is busy."""
        now = trio.current_time()
        idle = [s for s in self._sessions if s.idle and now - s.idle_since >= EVICT_AFTER]
        if not idle:
            return False
        min(idle, key=lambda s: s.idle_since).evict()
        return True


class Session:
    """One LMTP connection: socket <-> protocol core <-> deliveries.

    Replies go out through a writer task, so the session keeps reading (and answering) a
    client that pipelines without reading its replies, up to ``reply_buffer`` octets of
    unsent replies; past that it stops reading until the client reads (RFC 2920 flow
    control: input waits in the socket, nothing is lost).
    """

    def __init__(self, server: LmtpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.options = server.options
        self.stream: trio.abc.Stream = stream
        self.conn = LmtpServerConnection(
            self.options.hostname, self.options.limits, starttls=self.options.tls is not None
        )
        self.client_address = _peer_address(stream)
        self.idle_since = trio.current_time()  # when the session began to wait for a command
        self._idle_scope: trio.CancelScope | None = None
        self._delivery_scope: trio.CancelScope | None = None
        self._evicted = False
        self._mail: MailFrom | None = None
        self._recipients: list[Recipient] = []
        self._message: MessageBuffer | None = None
        # the writer side
        self._outbox = bytearray()
        self._in_flight = 0  # octets handed to the socket by the writer, not yet sent
        self._wake_writer = trio.Event()
        self._sent = trio.Event()
        self._broken = False

    @property
    def idle(self) -> bool:
        """Waiting for a command outside a transaction, with every reply sent."""
        return self._idle_scope is not None and not self._outbox and not self._in_flight

    def begin_drain(self, deadline: float) -> None:
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        if self._delivery_scope is not None:
            self._delivery_scope.deadline = deadline

    def evict(self) -> None:
        """Close this idle session (421) to make room for a new one at max_connections."""
        if self._idle_scope is not None:
            self._evicted = True
            self._idle_scope.cancel()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, nursery.cancel_scope)
                await self._main()
                nursery.cancel_scope.cancel()
        finally:
            self._drop_message()
            if isinstance(self.stream, trio.SSLStream):
                # close_notify, so the client sees a clean end of the TLS session
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(CLOSE_GRACE),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self.stream.aclose()

    async def _main(self) -> None:
        try:
            await self._loop()
            await self._drain_output()  # every owed reply, while the client reads them
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            self._drop_message()
        except Exception:
            log.exception("session failed", extra={"fields": {"client": self.client_address}})
            metrics.PROTOCOL_ERRORS.labels("internal").inc()
            self._drop_message()
            await self._close_after_bug()

    async def _loop(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                self._queue_output()
                data = await self._receive()
                if data is None:
                    return
                conn.receive_data(data)
                continue
            if not conn.reading_message:
                self.idle_since = trio.current_time()  # a complete command (or data) arrived
            if isinstance(event, MessageData):
                assert self._message is not None
                self._message.write(event.data)
            elif isinstance(event, RcptTo):
                await self._on_rcpt(event)
            elif isinstance(event, MailFrom):
                self._mail = event
                self._recipients = []
                conn.accept()
            elif isinstance(event, MessageStart):
                self._message = MessageBuffer(
                    self.options.spool_threshold, self.options.spool_dir, self.server.memory_budget
                )
            elif isinstance(event, MessageEnd):
                await self._on_message_end(event)
            elif isinstance(event, MessageAborted):
                self._drop_message()
            elif isinstance(event, ProtocolError):
                metrics.PROTOCOL_ERRORS.labels(event.kind).inc()
                if event.recipient is not None:  # 452 4.5.3: deferred at RCPT (SPEC 6)
                    route = self.server.router.route_for(event.recipient)
                    name = None if route is None else route.name
                    metrics.count_recipients(event.reply.code, name, "rcpt")
            elif isinstance(event, StartTls):
                if not await self._start_tls(event):
                    return
            elif isinstance(event, (Quit, ConnectionClosed)):
                return

    async def _on_rcpt(self, event: RcptTo) -> None:
        """Answer one RCPT. The core reads no further command until it is answered, so a
        pipelined batch is answered in order even while a verification is awaited."""
        route = self.server.router.route_for(event.recipient)
        if route is None:  # counted under the route label "none"
            metrics.count_recipients(NO_ROUTE.code, None, "rcpt")
            self.conn.reject(NO_ROUTE)
            self._log_rcpt_refusal(NO_ROUTE, None, event.recipient)
            return
        refusal = self.server.deliverer.refuse_address(route, event.recipient)
        if refusal is None:
            refusal = self.server.deliverer.admit(route)  # the route's circuit breaker
        if refusal is not None:
            metrics.count_recipients(refusal.code, route.name, "rcpt")
            self.conn.reject(refusal)
            self._log_rcpt_refusal(refusal, route.name, event.recipient)
            return
        verifier = self.server.verifier
        if route.verify_url is not None and verifier is not None:
            reply = verifier.lookup(route, event.recipient)
            if reply is None:
                self._queue_output()  # earlier replies leave while the webhook is asked
                assert self._mail is not None  # the core gives RcptTo only after MAIL
                reply = await verifier.ask(route, event.recipient, self._mail.sender)
            if not reply.is_success:
                self.server.deliverer.release(route)  # were it the breaker's probe: not spent
                metrics.count_recipients(reply.code, route.name, "rcpt")
                self.conn.reject(reply)
                return
            self._recipients.append(Recipient(event.recipient, route, event.orcpt))
            self.conn.accept(reply)
            return
        self._recipients.append(Recipient(event.recipient, route, event.orcpt))
        self.conn.accept()

    async def _on_message_end(self, event: MessageEnd) -> None:
        message = self._message
        assert message is not None and self._mail is not None
        # The transaction owns the message now: closed below once every delivery reading it
        # has ended, never by the session's own teardown (a reset client, a stalled writer).
        self._message = None
        self._queue_output()  # replies to the commands before the dot go out while we deliver
        try:
            if event.error is not None:
                self._count_data_outcomes(event.error, self._recipients)
                self.conn.fail_remaining(event.error)
                return
            txn = Transaction(self._envelope(self._mail, message), self._recipients, message)
            with trio.CancelScope() as scope:
                self._delivery_scope = scope
                if self.server.draining:
                    scope.deadline = self.server.drain_deadline
                await self.server.deliverer.deliver(txn, self._emit)
            self._delivery_scope = None
            if self.conn.replies_owed:
                owed = self._recipients[-self.conn.replies_owed :]
                self._count_data_outcomes(CUT_BY_SHUTDOWN, owed)
                self.conn.fail_remaining(CUT_BY_SHUTDOWN)
                self._log_cut(txn, owed)
        finally:
            message.close()
            self.idle_since = trio.current_time()

    def _log_rcpt_refusal(self, reply: Reply, route: str | None, address: str) -> None:
        """The outcome line of a recipient refused or deferred at RCPT by the bridge itself (no
        route, the route's breaker open, an address refused): SPEC 6, one line per outcome."""
        level = logging.WARNING  # as the deliverer logs a refusal or deferral after the data
        if not log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "route": route or metrics.NO_ROUTE,
            "stage": "rcpt",
            "reply": str(reply),
            "client": self.client_address,
        }
        if self.options.log_addresses or log.isEnabledFor(logging.DEBUG):
            fields["rcpt_to"] = address
        log_event(log, level, f"recipient {metrics.result_of(reply.code)}", **fields)

    @staticmethod
    def _log_cut(txn: Transaction, recipients: Sequence[Recipient]) -> None:
        """The outcome line of each recipient the grace period cut off (SPEC 6: one line per
        recipient outcome), like the deliverer's own lines."""
        digest = txn.message.digest()
        for recipient in recipients:
            fields: dict[str, Any] = {
                "delivery_id": delivery_id(digest, recipient.address),
                **txn.log_ids,
                "route": recipient.route.name,
                "http_status": None,
                "error": "shutdown",
                "reply": str(CUT_BY_SHUTDOWN),
            }
            log_event(log, logging.WARNING, "recipient deferred", **fields)

    @staticmethod
    def _count_data_outcomes(reply: Reply, recipients: Sequence[Recipient]) -> None:
        """``reply`` given after the data to every one of ``recipients``, not by the deliverer."""
        for recipient in recipients:
            metrics.count_recipients(reply.code, recipient.route.name, "data")

    def _envelope(self, mail: MailFrom, message: MessageBuffer) -> Envelope:
        return Envelope(
            mail_from=mail.sender,
            lhlo=self.conn.lhlo or "",
            client_address=self.client_address,
            body=mail.body,
            smtputf8=mail.smtputf8,
            size=mail.size,
            xforward=dict(self.conn.xforward),
            received_at=datetime.now(UTC),
            tls=isinstance(self.stream, trio.SSLStream),
        )

    async def _emit(self, replies: Sequence[Reply]) -> None:
        for reply in replies:
            self.conn.send_recipient_reply(reply)
        self._queue_output()  # the writer sends it at once, whatever the delivery does next

    async def _start_tls(self, event: StartTls) -> bool:
        """Send the 220 in plaintext, then the handshake; False if the session is over."""
        assert self.options.tls is not None
        if event.discarded:
            metrics.PROTOCOL_ERRORS.labels("plaintext_after_starttls").inc()
        self._queue_output()
        await self._drain_output(self.options.idle_timeout)
        if self._broken:
            return False
        tls_stream = trio.SSLStream(self.stream, self.options.tls, server_side=True)
        with trio.move_on_after(self.options.idle_timeout):
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                metrics.PROTOCOL_ERRORS.labels("tls_handshake").inc()
                log_event(log, logging.INFO, "TLS handshake failed", exc=exc)
                return False
            self.stream = tls_stream
            self.idle_since = trio.current_time()
            return True
        metrics.PROTOCOL_ERRORS.labels("tls_handshake").inc()
        return False

    async def _receive(self) -> bytes | None:
        """The next bytes from the peer, or None when the session should end (421 sent)."""
        await self._wait_for_reader()
        idle = not self.conn.in_transaction
        if idle and self.server.draining:
            await self._close(SHUTTING_DOWN)
            return None
        if self.conn.reading_message:
            deadline = trio.current_time() + self.options.idle_timeout
        else:
            # a whole command line must come within the idle timeout: a client that trickles
            # a byte at a time (slowloris) cannot hold the session open for longer
            deadline = self.idle_since + self.options.idle_timeout
        with trio.CancelScope(deadline=deadline) as scope:
            if idle:
                self._idle_scope = scope
            try:
                data = await sockio.receive_some(self.stream, RECEIVE_SIZE)
            finally:
                self._idle_scope = None
        if scope.cancelled_caught:
            if self._evicted:
                metrics.PROTOCOL_ERRORS.labels("evicted").inc()
                await self._close(EVICTED)
            elif idle and self.server.draining:
                await self._close(SHUTTING_DOWN)
            else:
                metrics.PROTOCOL_ERRORS.labels("idle_timeout").inc()
                self._drop_message()
                await self._close(IDLE_TIMEOUT)
            return None
        return data

    async def _wait_for_reader(self) -> None:
        """Back-pressure: read no more input while too many replies wait for the client."""
        if self._backlog() > self.options.reply_buffer:
            metrics.PROTOCOL_ERRORS.labels("reply_backlog").inc()
            while self._backlog() > self.options.reply_buffer and not self._broken:
                # the writer gives up (and the session ends) when the client reads nothing
                # for idle_timeout
                await self._sent.wait()
            # we did not read meanwhile: the next command line's time starts now
            self.idle_since = trio.current_time()
        if self._broken:
            raise trio.BrokenResourceError("peer does not read its replies")

    # ---- the writer

    def _backlog(self) -> int:
        return len(self._outbox) + self._in_flight

    def _queue_output(self) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        _count_replies(data)
        if not self._outbox and not self._in_flight and not self._broken:
            # a lockstep client gets its reply without a switch to the writer task
            data = data[sockio.send_now(self.stream, data) :]
            if not data:
                return
        self._outbox += data
        self._wake_writer.set()

    async def _writer(self, session_scope: trio.CancelScope) -> None:
        while True:
            if not self._outbox:
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                continue
            data = bytes(self._outbox)
            self._outbox.clear()
            self._in_flight = len(data)
            try:
                failed = not await self._send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                failed = True
            self._in_flight = 0
            self._sent.set()
            self._sent = trio.Event()
            if failed:
                # the peer is gone or reads nothing: nobody will see any further reply. The
                # message (if any) is freed by its owner once its deliveries have ended.
                self._broken = True
                self._outbox.clear()
                session_scope.cancel()
                return

    async def _send(self, data: bytes) -> bool:
        """Send ``data`` while the client makes progress reading it; False once it has taken
        nothing for idle_timeout (a slow reader is fine, a stalled one is dropped)."""
        view = memoryview(data)
        while view:
            with trio.move_on_after(self.options.idle_timeout):
                view = view[await sockio.send_some(self.stream, view) :]
                self._in_flight = len(view)
                self._sent.set()  # progress: a reader waiting for room may go on
                self._sent = trio.Event()
                continue
            return False
        return True

    async def _drain_output(self, limit: float = math.inf) -> None:
        """Wait until every queued reply has been sent (or the writer gave up on the client:
        no progress for idle_timeout), or ``limit`` seconds have passed."""
        self._queue_output()
        with trio.move_on_after(limit):
            while self._backlog() and not self._broken:
                await self._sent.wait()

    async def _close(self, reply: Reply) -> None:
        self.conn.close(reply)
        await self._drain_output()

    async def _close_after_bug(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                if owed := self.conn.replies_owed:
                    self._count_data_outcomes(INTERNAL_ERROR, self._recipients[-owed:])
                    self.conn.fail_remaining(INTERNAL_ERROR)
                self.conn.close(SESSION_ERROR)
                await self._drain_output(CLOSE_GRACE)
            except Exception as exc:  # the session is lost anyway; the first error is logged
                log_event(log, logging.DEBUG, "could not answer after a session error", exc=exc)

    def _drop_message(self) -> None:
        if self._message is not None:
            self._message.close()
            self._message = None


async def _send_last(stream: trio.SocketStream, reply: Reply) -> None:
    with trio.move_on_after(CLOSE_GRACE):
        try:
            await stream.send_all(reply.to_bytes())
            metrics.REPLIES.labels(str(reply.code)).inc()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _count_replies(data: bytes) -> None:
    """Count each reply by code: the last line of a reply has a space after its code."""
    if data[3:4] == b" " and data.find(b"\r\n") == len(data) - 2:  # one line: lockstep
        metrics.child(metrics.REPLIES, data[:3].decode("ascii", "replace")).inc()
        return
    for line in data.split(b"\r\n"):
        if line[3:4] == b" ":
            metrics.child(metrics.REPLIES, line[:3].decode("ascii", "replace")).inc()


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ""
    if isinstance(peer, tuple):
        return str(peer[0])
    return "unix"


async def open_unix_listener(path: str, mode: int) -> trio.SocketListener:
    """A listening unix socket at ``path`` (a stale socket file is replaced)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def open_tcp_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host or None, backlog=socket.SOMAXCONN)
