"""Limits and hostile clients against the running bridge (CONFORMANCE X11, X13, S02, S25, S27,
§4 item 13): big pipelines written without reading, the reply backlog bound, trickling clients
(slowloris) and a thousand idle connections.

The bridge runs in-process on port 0; the clients are plain blocking sockets in worker threads
(so they really do write without reading) or trio streams.
"""

from __future__ import annotations

import socket
import threading
import time

import trio
from bridge_process import (
    AsyncLmtp,
    StartBridge,
    data_section,
    message,
    metric_value,
    split_hostport,
    until,
)
from test_e2e_server import codes, metrics_text, open_session
from webhook_server import WebhookServer

MB = 1 << 20


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def reply_codes(wire: bytes) -> list[int]:
    return [int(line[:3]) for line in wire.split(b"\r\n")[:-1] if line[3:4] != b"-"]


def write_then_read(address: str, payload: bytes, timeout: float = 120) -> bytes:
    """Write everything without reading a byte, then read every reply until the server closes.
    A deadlock shows as a socket timeout."""
    with socket.create_connection(split_hostport(address), timeout=timeout) as sock:
        sock.sendall(payload)
        return read_all(sock)


def big_message(size: int, tag: str) -> bytes:
    line = b"." + b"x" * 76 + b"\r\n"  # every line starts with a dot: worst case for the scanner
    return message(subject=tag) + line * (size // len(line))


async def test_X13_5_mb_pipeline_written_without_reading_completes_and_loses_nothing(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """Postfix-shaped transactions (MAIL, RCPTs, DATA, data, dot) back to back, 5 MB in one go,
    with QUIT at the end; the client reads only after writing the last byte."""
    running = await start_bridge(payload="raw")
    webhook_server.behave("b@example.org", status=503)
    webhook_server.behave("c@example.org", status=404)
    transactions = 100
    messages = [big_message(50_000, f"m{k}") for k in range(transactions)]
    pipeline = [b"LHLO client.test\r\n"]
    for k, msg in enumerate(messages):
        pipeline.append(
            f"MAIL FROM:<s@example.org> SIZE={len(msg)}\r\nRCPT TO:<a{k}@example.org>\r\n"
            "RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n".encode()
        )
        pipeline.append(data_section(msg))
    pipeline.append(b"QUIT\r\n")
    payload = b"".join(pipeline)
    assert len(payload) > 5 * 1000 * 1000

    with trio.fail_after(150):
        wire = await trio.to_thread.run_sync(write_then_read, running.lmtp_addresses[0], payload)

    expected = [220, 250] + [250, 250, 250, 250, 354, 250, 451, 550] * transactions + [221]
    assert reply_codes(wire) == expected
    requests = webhook_server.requests
    assert len(requests) == 3 * transactions
    bodies = {r.rcpt: r.body for r in requests}
    for k, msg in enumerate(messages):
        assert bodies[f"a{k}@example.org"].endswith(msg)  # raw: trace headers, then the bytes


async def test_X13_S27_rcpt_flood_written_without_reading(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """5 MB of RCPT commands past max_recipients: each gets 452 4.5.3 (flow control, not an
    error: the session is not closed), then the message goes to the accepted ones.

    The 5 MB of replies exceed the default reply_buffer_size (1 MiB, sized for what real MTAs
    write between reads); with the buffer raised above them, completing does not depend on how
    much the kernel's socket buffers happen to hold."""
    running = await start_bridge(max_recipients=5, reply_buffer_size=8 * MB)
    rcpts = 5 * MB // len(b"RCPT TO:<r000000@example.org>\r\n")
    lines = b"".join(b"RCPT TO:<r%06d@example.org>\r\n" % i for i in range(rcpts))
    payload = (
        b"LHLO client.test\r\nMAIL FROM:<s@example.org>\r\n"
        + lines
        + b"DATA\r\n"
        + data_section(message())
        + b"QUIT\r\n"
    )
    with trio.fail_after(150):
        wire = await trio.to_thread.run_sync(write_then_read, running.lmtp_addresses[0], payload)
    got = reply_codes(wire)
    assert got == [220, 250, 250] + [250] * 5 + [452] * (rcpts - 5) + [354] + [250] * 5 + [221]
    assert b"452 4.5.3 " in wire
    assert len(webhook_server.requests) == 5


def backlog_events() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "lmtp_bridge_protocol_errors_total", {"kind": "reply_backlog"}
    )
    return value or 0.0


async def test_X11_reply_backlog_is_bounded_and_nothing_is_lost(
    start_bridge: StartBridge,
) -> None:
    """A client that pipelines many commands and reads late: past reply_buffer_size the bridge
    stops reading (back-pressure) instead of buffering replies without bound; once the client
    reads, every command is answered, in order."""
    running = await start_bridge(reply_buffer_size=4096)
    noops = 400_000  # 2.4 MB of input, 5.6 MB of replies: more than the socket buffers hold
    received: list[bytes] = []
    before = backlog_events()

    def client() -> None:
        with socket.create_connection(
            split_hostport(running.lmtp_addresses[0]), timeout=60
        ) as sock:

            def reader() -> None:
                # read nothing until the bridge has hit the bound and stopped reading
                deadline = time.monotonic() + 60
                while backlog_events() == before and time.monotonic() < deadline:
                    time.sleep(0.05)
                received.append(read_all(sock))

            thread = threading.Thread(target=reader)
            thread.start()
            sock.sendall(b"LHLO c\r\n" + b"NOOP\r\n" * noops + b"QUIT\r\n")
            thread.join()

    with trio.fail_after(120):
        await trio.to_thread.run_sync(client)
    assert backlog_events() > before
    assert reply_codes(received[0]) == [220, 250] + [250] * noops + [221]


async def test_S25_trickled_command_line_still_times_out(start_bridge: StartBridge) -> None:
    """The idle timeout bounds a whole command line, not each read: one byte every 0.25 s
    (slowloris) does not keep a session open."""
    running = await start_bridge(idle_timeout=1)
    client = await open_session(running)
    trickle = b"NOOP" + b" and more" * 100  # 0.1 s a byte: 90 s, far past the 1 s timeout
    sent = 0
    with trio.fail_after(60):
        try:
            for byte in trickle:
                await client.send(bytes([byte]))
                sent += 1
                await trio.sleep(0.1)
        except trio.BrokenResourceError:
            pass
        replies = await client.rest_until_eof()
    assert codes(replies) == ["421 4.4.2"]
    assert sent < len(trickle)  # cut while the bytes were still coming


async def test_S25_commands_that_keep_coming_are_not_cut(start_bridge: StartBridge) -> None:
    """The timeout is per command line: a session busy for longer than idle_timeout with
    commands that each come in time is never cut; silence after them is."""
    running = await start_bridge(idle_timeout=1)
    client = await open_session(running)
    with trio.fail_after(20):
        for _ in range(12):  # 0.3 s apart: 3.6 s in all
            assert (await client.command("NOOP")).code == 250
            await trio.sleep(0.3)
        assert (await client.command("MAIL FROM:<a@example.org>")).code == 250
        await trio.sleep(0.5)
        assert (await client.command("RSET")).code == 250
        started = time.monotonic()
        replies = await client.rest_until_eof()  # then silence: cut after idle_timeout
    assert codes(replies) == ["421 4.4.2"]
    assert 0.8 <= time.monotonic() - started < 5


async def test_S25_slow_message_data_is_not_cut_while_it_flows(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """Message data that keeps coming is not a command line: the timeout is per read there."""
    running = await start_bridge(idle_timeout=3)
    client = await open_session(running)
    await client.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert [(await client.reply()).code for _ in range(3)] == [250, 250, 354]
    with trio.fail_after(20):
        for line in data_section(message(body="x\r\n" * 8)).split(b"\r\n")[:-1]:
            await client.send(line + b"\r\n")
            await trio.sleep(0.5)  # 15 lines: about 7.5 s in all, each read well within 3 s
        assert codes([await client.reply()]) == ["250 2.0.0"]
    assert len(webhook_server.requests) == 1


async def test_slowloris_1000_idle_connections_do_not_stop_other_clients(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    """1,000 connections that say half a command and wait, with max_connections at its default
    (1,000): an MTA with mail still gets through, because an idle session yields its slot."""
    running = await start_bridge()
    address = running.lmtp_addresses[0]
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            for _ in range(1000):
                stream = await trio.open_tcp_stream(*split_hostport(address))
                await stream.send_all(b"LHLO slow\r\nNO")
                idle.append(stream)

            async def all_in() -> bool:
                text = await metrics_text(running)
                return metric_value(text, "lmtp_bridge_connections_active") >= 1000

            await until(all_in)
            await trio.sleep(1.1)  # idle long enough to yield (EVICT_AFTER)
            started = time.monotonic()
            for k in range(3):
                client = await open_session(running)
                await client.send(
                    f"MAIL FROM:<a@example.org>\r\nRCPT TO:<b{k}@example.org>\r\nDATA\r\n"
                )
                assert [(await client.reply()).code for _ in range(3)] == [250, 250, 354]
                await client.send(data_section(message()) + b"QUIT\r\n")
                assert codes(await client.rest_until_eof()) == ["250 2.0.0", "221 2.0.0"]
            elapsed = time.monotonic() - started
        text = await metrics_text(running)
        assert metric_value(text, "lmtp_bridge_protocol_errors_total", {"kind": "evicted"}) >= 1
        assert len(webhook_server.requests) == 3
        print(f"3 transactions with 1000 idle connections open: {elapsed:.3f} s")
    finally:
        for stream in idle:
            await stream.aclose()


async def test_max_connections_refuses_when_no_session_is_idle(start_bridge: StartBridge) -> None:
    """Sessions inside a transaction are never evicted: at the limit a newcomer gets 421."""
    running = await start_bridge(max_connections=2)
    busy = [await open_session(running) for _ in range(2)]
    for client in busy:
        assert (await client.command("MAIL FROM:<a@example.org>")).code == 250
    await trio.sleep(1.1)
    third = await AsyncLmtp.connect(running.lmtp_addresses[0])
    with trio.fail_after(5):
        assert codes(await third.rest_until_eof()) == ["421 4.3.2"]
    for client in busy:
        assert (await client.command("RSET")).code == 250
