"""The running bridge: listeners, webhook client, metrics endpoint and signals, wired together.

``run()`` serves until SIGTERM/SIGINT (or ``Running.stop()``), drains, and returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field

import httpx
import trio

from bridge import __version__
from bridge.base import memory
from bridge.base.listen import ListenAddress, naming_listen_errors, parse_listen
from bridge.config import Settings
from bridge.config.routes import build_router
from bridge.delivery.breaker import BreakerPolicy, Breakers, init_policy_metrics
from bridge.delivery.deliverer import Deliverer
from bridge.delivery.verify import Verifier, init_verify_metrics
from bridge.lmtp.connection import Limits
from bridge.ops import metrics
from bridge.ops.httpserver import Readiness, observability_handler, serve_http
from bridge.ops.logs import log_event
from bridge.server.sessions import LmtpServer, ServerOptions, open_tcp_listeners, open_unix_listener
from bridge.server.tls import server_context
from bridge.webhook.client import WebhookClient, tls_setting
from bridge.webhook.transport import H11Transport

log = logging.getLogger("bridge")


@dataclass
class Running:
    """What a started bridge exposes to its caller (tests, the demo command)."""

    server: LmtpServer
    readiness: Readiness
    lmtp_addresses: list[str] = field(default_factory=list)  # "127.0.0.1:2424", "unix:/path"
    metrics_port: int | None = None

    def stop(self) -> None:
        """Begin the graceful drain, as SIGTERM does."""
        self.readiness.set_ready(False)
        self.server.drain()


def server_options(settings: Settings) -> ServerOptions:
    return ServerOptions(
        hostname=settings.hostname,
        limits=Limits(
            max_message_size=settings.max_message_size,
            max_recipients=settings.max_recipients,
            max_command_errors=settings.max_command_errors,
        ),
        idle_timeout=settings.idle_timeout,
        max_connections=settings.max_connections,
        shutdown_grace=settings.shutdown_grace,
        spool_threshold=settings.spool_threshold,
        spool_dir=settings.spool_dir,
        spool_memory_limit=settings.spool_memory_limit,
        reply_buffer=settings.reply_buffer_size,
        log_addresses=settings.log_addresses,
        tls=server_context(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_cert_file
        else None,
    )


def webhook_transport(settings: Settings) -> httpx.AsyncBaseTransport | None:
    """The lean h11 transport unless httpx's own is asked for (or needed: proxies)."""
    if settings.http_transport != "h11" or settings.http_trust_env:
        return None
    verify = tls_setting(settings.http_verify, settings.http_client_cert, settings.http_client_key)
    return H11Transport(verify=verify, max_connections=settings.http_max_connections)


async def open_listeners(settings: Settings) -> tuple[list[trio.SocketListener], list[str]]:
    listeners: list[trio.SocketListener] = []
    names: list[str] = []
    try:
        for address in settings.listen_addresses:
            with naming_listen_errors("LMTP (listen)", address):
                if address.kind == "unix":
                    assert address.path is not None
                    listeners.append(
                        await open_unix_listener(address.path, settings.unix_socket_permissions)
                    )
                    names.append(f"unix:{address.path}")
                    continue
                for listener in await open_tcp_listeners(address.host or "", address.port or 0):
                    listeners.append(listener)
                    names.append(_tcp_name(listener))
    except BaseException:
        for listener in listeners:  # the ones opened before the failure
            await trio.aclose_forcefully(listener)
        raise
    return listeners, names


def _listener_name(listener: trio.SocketListener) -> str:
    if listener.socket.family == socket.AF_UNIX:
        return f"unix:{listener.socket.getsockname()}"
    return _tcp_name(listener)


def _tcp_name(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(
    settings: Settings,
    *,
    handle_signals: bool = True,
    listeners: list[trio.SocketListener] | None = None,
    worker: int | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve LMTP until told to stop, then drain within ``shutdown_grace`` and return."""
    router = build_router(settings)
    metrics.init_metrics(route.name for route in router.routes)
    metrics.init_route_timeouts((route.name, route.timeout) for route in router.routes)
    init_policy_metrics(route.name for route in router.routes)
    init_verify_metrics(router.routes)
    readiness = Readiness()
    async with WebhookClient(
        max_connections=settings.http_max_connections,
        verify=settings.http_verify,
        transport=webhook_transport(settings),
        client_cert=settings.http_client_cert,
        client_key=settings.http_client_key,
        trust_env=settings.http_trust_env,
        follow_redirects=settings.http_follow_redirects,
        max_redirects=settings.http_max_redirects,
    ) as client:
        deliverer = Deliverer(
            client,
            settings.hostname,
            log_addresses=settings.log_addresses,
            breakers=Breakers(
                BreakerPolicy(
                    failure_ratio=settings.breaker_failure_ratio,
                    window=settings.breaker_window,
                    min_calls=settings.breaker_min_calls,
                    cooldown=settings.breaker_cooldown,
                )
            ),
            recipient_delimiter=settings.recipient_delimiter,
            trusted_authserv_ids=settings.trusted_authserv_ids,
            max_verdicts_size=settings.max_verdicts_size,
            parse_threads=settings.parse_threads,
            parse_limits=settings.parse_limits,
        )
        verifier = Verifier(
            client,
            cache_ttl=settings.verify_cache_ttl,
            negative_ttl=settings.verify_negative_ttl,
            cache_size=settings.verify_cache_size,
            delimiter=settings.recipient_delimiter,
            log_addresses=settings.log_addresses,
        )
        server = LmtpServer(server_options(settings), router, deliverer, verifier)
        if listeners is None:
            listeners, names = await open_listeners(settings)
        else:  # opened by the parent of --workers
            names = [_listener_name(listener) for listener in listeners]
        running = Running(server, readiness, names)
        try:
            async with trio.open_nursery() as nursery:
                if settings.metrics_listen:
                    where = parse_listen(settings.metrics_listen)
                    with naming_listen_errors("metrics (metrics_listen)", where):
                        running.metrics_port = await nursery.start(
                            serve_http, observability_handler(readiness), where.host, where.port
                        )
                if handle_signals:
                    nursery.start_soon(_stop_on_signal, running)
                nursery.start_soon(memory.trim_forever)
                await nursery.start(_serve_then_stop, server, listeners, nursery.cancel_scope)
                readiness.set_ready(True)
                log_event(
                    log,
                    logging.INFO,
                    "lmtp-bridge ready",
                    version=__version__,
                    listen=names,
                    worker=worker,
                    metrics_port=running.metrics_port,
                )
                task_status.started(running)
        finally:
            # also when cancelled: a stale socket file would mislead the next start's clients
            _remove_unix_sockets(settings.listen_addresses)
        log_event(log, logging.INFO, "lmtp-bridge stopped")


async def _serve_then_stop(
    server: LmtpServer,
    listeners: list[trio.SocketListener],
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await server.serve(listeners, task_status=task_status)
    everything.cancel()  # the metrics endpoint and the signal watcher end with the server


async def _stop_on_signal(running: Running) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # a --workers worker blocks them until now, so an early SIGTERM waits for this receiver
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        draining = False
        # The receiver stays open for the whole drain: a second signal (a supervisor's repeat,
        # or systemd and a --workers parent both signalling a worker) must not kill deliveries
        # in flight; shutdown_grace bounds the drain.
        try:
            async for signum in signals:
                name = signal.Signals(signum).name
                if draining:
                    log_event(log, logging.INFO, "already draining; signal ignored", signal=name)
                    continue
                draining = True
                grace = running.server.options.shutdown_grace
                log_event(log, logging.INFO, "draining", signal=name, grace=grace)
                running.stop()
        finally:
            # The drain is over and the process is on its way out. Closing the receiver restores
            # the default handlers, so a late signal (a --workers parent's SIGTERM reaching an
            # idle worker that drained at once) would kill it and read as a crash: held instead.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def _remove_unix_sockets(addresses: list[ListenAddress]) -> None:
    for address in addresses:
        if address.kind == "unix" and address.path:
            with contextlib.suppress(OSError):
                os.unlink(address.path)
