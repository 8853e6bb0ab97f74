"""Closing sessions over real sockets: every owed reply is written while the client reads (after
QUIT, after a half-close), a client that reads nothing for idle_timeout is dropped, and a
message's buffer outlives every delivery that reads it, whatever the client does meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import threading
import time

import pytest
import trio
from bridge_process import (
    BridgeProcess,
    StartBridge,
    data_section,
    http_get,
    message,
    metric_value,
    metrics_text,
    split_hostport,
    until,
    wait_for,
)
from webhook_server import WebhookServer

RSETS = 50_000  # ~950 KB of replies: more than the socket buffers hold, < reply_buffer
RSET_REPLY = b"250 2.0.0 Reset OK\r\n"


async def connect(address: str, rcvbuf: int | None = None) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect(), so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(split_hostport(address))
    return sock


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    with contextlib.suppress(OSError):  # the bridge may close before it read everything
        while view:
            view = view[await sock.send(view) :]


async def active_sessions(running: object) -> float:
    return metric_value(await metrics_text(running), "lmtp_bridge_connections_active")  # type: ignore[arg-type]


def pipelined_rsets(count: int) -> bytes:
    return b"LHLO client.test\r\n" + b"RSET\r\n" * count


def check_complete(received: bytes, count: int, last_reply: bytes | None) -> None:
    """Greeting, every RSET reply, then ``last_reply`` (a code and status) as the last line."""
    assert received.startswith(b"220 ")
    assert received.endswith(b"\r\n"), f"the stream ends mid-line: {received[-40:]!r}"
    assert received.count(RSET_REPLY) == count, received[-200:]
    last = received.rstrip(b"\r\n").rpartition(b"\r\n")[2]
    if last_reply is None:
        assert last == RSET_REPLY.rstrip(b"\r\n"), last
    else:
        assert last.startswith(last_reply + b" "), last


# what ends the session after the pipelined RSETs, and the last reply it owes
ENDINGS = {
    "quit": (b"QUIT\r\n", b"221 2.0.0"),
    "half-close": (b"", None),
    "errors": (b"BOGUS\r\n" * 11, b"421 4.7.0"),  # past max_command_errors
    "drain": (b"", b"421 4.3.2"),
}


@pytest.mark.parametrize("end", list(ENDINGS))
def test_a_client_that_reads_late_gets_every_reply(webhook_server: WebhookServer, end: str) -> None:
    """LHLO + 50,000 RSET + an ending in one write, then 2.5 s of not reading: more than the
    old 2 s close grace, far less than idle_timeout (and the shutdown grace). The bridge runs
    as its own process, so its work and the client's pause do not share one event loop."""
    tail, last_reply = ENDINGS[end]
    with BridgeProcess(webhook_server.url, {"LMTP_BRIDGE_SHUTDOWN_GRACE": "20"}) as bridge:
        bridge.wait_ready()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(split_hostport(bridge.address))
        sock.settimeout(30)
        sock.sendall(pipelined_rsets(RSETS) + tail)
        if end == "half-close":
            sock.shutdown(socket.SHUT_WR)
        # the pause starts once the bridge has answered everything (into its reply buffer)
        replies_queued(bridge, "250", RSETS + 1)
        if end == "drain":
            bridge.sigterm()
        if last_reply is not None:
            replies_queued(bridge, last_reply[:3].decode(), 1)
        time.sleep(2.5)
        received = bytearray()
        while data := sock.recv(65536):
            received += data
        sock.close()
        if end == "drain":
            assert bridge.wait(30) == 0
    check_complete(bytes(received), RSETS, last_reply)


def replies_queued(bridge: BridgeProcess, code: str, count: int) -> None:
    """Wait until the bridge has answered ``count`` replies with ``code`` (counted as queued)."""

    def done() -> bool:
        text = http_get(f"{bridge.metrics_url}/metrics")[1]
        return metric_value(text, "lmtp_bridge_replies_total", {"code": code}) >= count

    wait_for(done, timeout=60, what=f"{count} replies {code}")


def test_a_slow_but_steady_reader_is_not_cut_by_idle_timeout(
    webhook_server: WebhookServer,
) -> None:
    """idle_timeout bounds a reader that makes no progress, not the time the replies take.
    The bridge runs as its own process: the reader's pace is not the bridge's CPU time."""
    count = 80_000  # ~1.5 MB of replies: more than the socket buffers and the reply buffer
    env = {"LMTP_BRIDGE_IDLE_TIMEOUT": "2"}
    with BridgeProcess(webhook_server.url, env) as bridge:
        bridge.wait_ready()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(split_hostport(bridge.address))
        sock.settimeout(30)
        wire = pipelined_rsets(count) + b"QUIT\r\n"
        sender = threading.Thread(target=_send_quietly, args=(sock, wire), daemon=True)
        sender.start()
        received = bytearray()
        started = time.monotonic()
        while data := sock.recv(16 * 1024):  # ~16 KiB per 50 ms: ~5 s for all of it
            received += data
            time.sleep(0.05)
        sock.close()
        sender.join(5)
        assert time.monotonic() - started > 2 * 2  # it did take more than idle_timeout
    check_complete(bytes(received), count, b"221 2.0.0")


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


async def test_a_client_that_reads_nothing_is_dropped_after_idle_timeout(
    start_bridge: StartBridge,
) -> None:
    running = await start_bridge(idle_timeout=1)
    before = await active_sessions(running)
    sock = await connect(running.lmtp_addresses[0], rcvbuf=16 * 1024)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        async with trio.open_nursery() as nursery:
            # the bridge stops reading once its reply buffer is full: never wait for this
            nursery.start_soon(send_all, sock, pipelined_rsets(200_000) + b"QUIT\r\n")
            with trio.fail_after(15):
                await until(lambda: _gone(running, before))
            nursery.cancel_scope.cancel()


async def _gone(running: object, before: float) -> bool:
    return await active_sessions(running) == before


# ---- a message's buffer outlives its deliveries ----

RECIPIENTS = 50
ROUNDS = 40


async def test_a_reset_after_the_dot_never_truncates_a_request_body(
    start_bridge: StartBridge, webhook_server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    """50 recipients pipelined to the final dot, then a TCP reset (SO_LINGER 0) 3-20 ms later:
    no delivery may read a message the session has already freed (h11 would refuse the short
    body: "Too little data for declared Content-Length")."""
    running = await start_bridge(payload="raw")
    address = running.lmtp_addresses[0]
    rcpts = [f"r{i}@example.org" for i in range(RECIPIENTS)]
    wire = (
        b"LHLO client.test\r\nMAIL FROM:<alice@example.org>\r\n"
        + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        + b"DATA\r\n"
        + data_section(message(body="x" * 2000))
    )
    rng = random.Random(15)
    before = await active_sessions(running)
    with caplog.at_level(logging.ERROR):
        for _ in range(ROUNDS):
            sock = await connect(address)
            await send_all(sock, wire)
            await trio.sleep(rng.uniform(0.003, 0.020))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        with trio.fail_after(20):
            await until(lambda: _gone(running, before))
    errors = [r.getMessage() + str(r.exc_info and r.exc_info[1]) for r in caplog.records]
    assert errors == []
    # every request that reached the webhook carried the whole message
    for request in webhook_server.requests:
        assert request.body.endswith(b"x" * 2000 + b"\r\n"), request.body[-80:]
