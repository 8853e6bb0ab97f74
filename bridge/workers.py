"""``--workers N``: N trio processes share the LMTP listeners, one SO_REUSEPORT socket each.

The parent binds every socket before forking (so a busy port fails at start, and port 0 gets
one port for all), serves /metrics (Prometheus multiprocess mode), /healthz and /readyz, and on
SIGTERM/SIGINT tells every worker to drain and waits for them. A worker that dies unexpectedly
stops the others (exit 1), so that the supervisor restarts the whole service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable

from bridge.base.listen import ListenAddress, naming_listen_errors, parse_listen
from bridge.config import Settings

log = logging.getLogger("bridge.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def bind_sockets(
    addresses: list[ListenAddress], workers: int, unix_mode: int = 0o666
) -> list[list[socket.socket]]:
    """For each worker, its listening sockets: its own SO_REUSEPORT socket per TCP address
    (the kernel spreads connections over them), and the one shared socket of each unix path."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for address in addresses:
            with naming_listen_errors("LMTP (listen)", address):
                _bind_address(address, per_worker, unix_mode)
    except BaseException:
        close_all(per_worker)
        raise
    return per_worker


def _bind_address(
    address: ListenAddress, per_worker: list[list[socket.socket]], unix_mode: int
) -> None:
    if address.kind == "unix":
        assert address.path is not None
        shared = _unix_socket(address.path, unix_mode)
        for mine in per_worker:
            mine.append(shared)
        return
    infos = socket.getaddrinfo(
        address.host or None,
        address.port or 0,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    seen: set[tuple[int, object]] = set()
    for family, kind, proto, _, sockaddr in infos:
        if (family, sockaddr[0]) in seen:
            continue
        seen.add((family, sockaddr[0]))
        port = sockaddr[1]
        for mine in per_worker:
            sock = socket.socket(family, kind, proto)
            mine.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
            sock.listen(socket.SOMAXCONN)
            port = sock.getsockname()[1]  # port 0: the first socket chose it


def _unix_socket(path: str, mode: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def close_all(per_worker: list[list[socket.socket]]) -> None:
    for mine in per_worker:
        for sock in mine:
            with contextlib.suppress(OSError):
                sock.close()


def serve(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes until SIGTERM/SIGINT; the exit status."""
    metrics_dir = tempfile.mkdtemp(prefix="lmtp-bridge-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # before prometheus_client is first imported
    # a signal during start-up waits for the receivers (parent: _supervise; workers: bridge.app)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        per_worker = bind_sockets(
            settings.listen_addresses, settings.workers, settings.unix_socket_permissions
        )
        children: dict[int, int] = {}  # pid -> worker number
        try:
            for number, mine in enumerate(per_worker):
                pid = os.fork()
                if pid == 0:  # the worker
                    code = 1
                    try:
                        code = _worker(settings, mine, number)
                    finally:
                        os._exit(code)
                children[pid] = number
        finally:
            close_all(per_worker)  # the parent keeps none: a drained worker's port is closed
        return _supervise(settings, children)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker(settings: Settings, sockets: list[socket.socket], number: int) -> int:
    import trio

    from bridge.app import run

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards one SIGTERM
    # SIGTERM stays blocked (from the parent) until the bridge's signal receiver is in place:
    # bridge.app unblocks it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    worker_settings = settings.model_copy(update={"metrics_listen": ""})

    async def main() -> None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        await run(worker_settings, listeners=listeners, worker=number)

    try:
        trio.run(main)
    except Exception:
        log.exception("worker %d failed", number)
        return 1
    return 0


def _supervise(settings: Settings, children: dict[int, int]) -> int:
    import trio

    from bridge.ops import metrics
    from bridge.ops.httpserver import Readiness, observability_handler, serve_http
    from bridge.ops.logs import log_event

    exit_code = 0

    def stop_all() -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    async def main() -> None:
        nonlocal exit_code
        metrics.init_metrics([])
        readiness = Readiness(True)
        async with trio.open_nursery() as nursery:
            if settings.metrics_listen:
                where = parse_listen(settings.metrics_listen)
                handler = multiprocess_handler(observability_handler(readiness))
                with naming_listen_errors("metrics (metrics_listen)", where):
                    await nursery.start(serve_http, handler, where.host, where.port)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD) as sigs:
                log_event(log, logging.INFO, "workers started", workers=len(children))
                draining = False
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                os.kill(os.getpid(), signal.SIGCHLD)  # a worker may have ended before now
                async for signum in sigs:
                    if signum != signal.SIGCHLD:
                        if not draining:
                            draining = True
                            readiness.set_ready(False)
                            log_event(log, logging.INFO, "draining workers", signal=signum)
                            stop_all()
                        continue
                    for pid, number, code in _reap(children):
                        _mark_dead(pid)
                        if code != 0 or not draining:
                            log_event(
                                log,
                                logging.ERROR,
                                "worker ended unexpectedly, stopping all",
                                worker=number,
                                status=code,
                            )
                            exit_code = 1
                            if not draining:
                                draining = True
                                readiness.set_ready(False)
                                stop_all()
                    if not children:
                        break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException:
        stop_all()  # e.g. the metrics port was taken: the workers must not outlive the parent
        raise
    return exit_code


def _reap(children: dict[int, int]) -> list[tuple[int, int, int]]:
    """(pid, worker number, exit code) of each child that ended; they leave ``children``."""
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in children:
            ended.append((pid, children.pop(pid), os.waitstatus_to_exitcode(status)))
    return ended


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def multiprocess_handler(inner: Callable):  # type: ignore[no-untyped-def,type-arg]
    """``inner`` (health, readiness) with /metrics summed over every worker's files."""
    import prometheus_client
    from prometheus_client import CollectorRegistry, multiprocess

    from bridge.ops.httpserver import HttpRequest, HttpResponse

    async def handle(request: HttpRequest) -> HttpResponse:
        if request.path == "/metrics" and request.method == "GET":
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            body = prometheus_client.generate_latest(registry)
            return HttpResponse(
                200, [("content-type", prometheus_client.CONTENT_TYPE_LATEST)], body
            )
        response: HttpResponse = await inner(request)
        return response

    return handle


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: lmtp-bridge serve --workers N")
