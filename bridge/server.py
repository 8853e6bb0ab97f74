"""The LMTP server on trio: listeners (TCP and unix), one task per session, timeouts, drain.

Each session feeds socket bytes to the sans-IO core and acts on its events; a bug in one
session answers 421 there and never reaches the rest of the server.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from bridge import metrics
from bridge.delivery import Deliverer, Transaction
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
)
from bridge.logs import log_event
from bridge.routing import Router
from bridge.transaction import Envelope, MessageBuffer, Recipient

log = logging.getLogger("bridge.server")

RECEIVE_SIZE = 64 * 1024
CLOSE_GRACE = 2.0  # seconds a last reply may take to leave before the socket is dropped

IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Shutting down, try again later")
CUT_BY_SHUTDOWN = Reply(451, "4.3.2", "Shutting down before the webhook answered, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error in the bridge, try again later")
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


class LmtpServer:
    """Accepts LMTP sessions on any number of listeners until ``drain()``."""

    def __init__(self, options: ServerOptions, router: Router, deliverer: Deliverer) -> None:
        self.options = options
        self.router = router
        self.deliverer = deliverer
        self.draining = False
        self.drain_deadline = math.inf
        self._sessions: set[Session] = set()
        self._stop_accepting = trio.CancelScope()

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
            if len(self._sessions) >= self.options.max_connections:
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


class Session:
    """One LMTP connection: socket <-> protocol core <-> deliveries."""

    def __init__(self, server: LmtpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.options = server.options
        self.stream = stream
        self.conn = LmtpServerConnection(self.options.hostname, self.options.limits)
        self.client_address = _peer_address(stream)
        self._idle_scope: trio.CancelScope | None = None
        self._delivery_scope: trio.CancelScope | None = None
        self._mail: MailFrom | None = None
        self._recipients: list[Recipient] = []
        self._message: MessageBuffer | None = None

    def begin_drain(self, deadline: float) -> None:
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        if self._delivery_scope is not None:
            self._delivery_scope.deadline = deadline

    async def run(self) -> None:
        try:
            await self._loop()
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
                await self._flush()
                data = await self._receive()
                if data is None:
                    return
                conn.receive_data(data)
            elif isinstance(event, MessageData):
                assert self._message is not None
                self._message.write(event.data)
            elif isinstance(event, RcptTo):
                self._on_rcpt(event)
            elif isinstance(event, MailFrom):
                self._mail = event
                self._recipients = []
                conn.accept()
            elif isinstance(event, MessageStart):
                self._message = MessageBuffer(self.options.spool_threshold, self.options.spool_dir)
            elif isinstance(event, MessageEnd):
                await self._on_message_end(event)
            elif isinstance(event, MessageAborted):
                self._drop_message()
            elif isinstance(event, ProtocolError):
                metrics.PROTOCOL_ERRORS.labels(event.kind).inc()
            elif isinstance(event, (Quit, ConnectionClosed)):
                await self._flush()
                return

    def _on_rcpt(self, event: RcptTo) -> None:
        route = self.server.router.route_for(event.recipient)
        if route is None:
            self.conn.reject(NO_ROUTE)
            return
        self._recipients.append(Recipient(event.recipient, route, event.orcpt))
        self.conn.accept()

    async def _on_message_end(self, event: MessageEnd) -> None:
        message = self._message
        assert message is not None and self._mail is not None
        try:
            if event.error is not None:
                metrics.RECIPIENTS.labels("rejected").inc(len(self._recipients))
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
                metrics.RECIPIENTS.labels("deferred").inc(self.conn.replies_owed)
                self.conn.fail_remaining(CUT_BY_SHUTDOWN)
        finally:
            self._drop_message()

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
        )

    async def _emit(self, replies: Sequence[Reply]) -> None:
        for reply in replies:
            self.conn.send_recipient_reply(reply)
        # a reply must never be cut in half, even when the grace period ends right now
        with trio.CancelScope(shield=True):
            await self._flush()

    async def _receive(self) -> bytes | None:
        """The next bytes from the peer, or None when the session should end (421 sent)."""
        idle = not self.conn.in_transaction
        if idle and self.server.draining:
            await self._close(SHUTTING_DOWN)
            return None
        with trio.move_on_after(self.options.idle_timeout) as scope:
            if idle:
                self._idle_scope = scope
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            finally:
                self._idle_scope = None
        if scope.cancelled_caught:
            if idle and self.server.draining:
                await self._close(SHUTTING_DOWN)
            else:
                metrics.PROTOCOL_ERRORS.labels("idle_timeout").inc()
                self._drop_message()
                await self._close(IDLE_TIMEOUT)
            return None
        return data

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            _count_replies(data)
            with trio.move_on_after(self.options.idle_timeout):
                await self.stream.send_all(data)
                return
            raise trio.BrokenResourceError("peer does not read its replies")

    async def _close(self, reply: Reply) -> None:
        self.conn.close(reply)
        with trio.move_on_after(CLOSE_GRACE):
            await self._flush()

    async def _close_after_bug(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
            try:
                if self.conn.replies_owed:
                    self.conn.fail_remaining(INTERNAL_ERROR)
                self.conn.close(SESSION_ERROR)
                await self._flush()
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
    for line in data.split(b"\r\n"):
        if line[3:4] == b" ":
            metrics.REPLIES.labels(line[:3].decode("ascii", "replace")).inc()


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
