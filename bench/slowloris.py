#!/usr/bin/env python3
"""Slowloris against the bridge: prints what it measured.

Opens N connections (default 1000, the default max_connections) that each send half a command
and then trickle one byte every few seconds, and measures, for a real client doing whole
transactions at the same time: latency with and without the idle crowd, how many transactions
failed, the bridge's memory per idle connection and how many idle sessions were evicted.
The bridge runs as a subprocess with its default limits.

Usage: bench/slowloris.py [N] [TRANSACTIONS]
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bridge_process import (
    BridgeProcess,
    data_section,
    http_get,
    message,
    metric_value,
    split_hostport,
)
from webhook_server import WebhookServer


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def transaction(address: str, k: int) -> float:
    """One whole LMTP transaction, lockstep; its duration in seconds (raises on failure)."""
    started = time.monotonic()
    with socket.create_connection(split_hostport(address), timeout=30) as sock:
        f = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    return line

        assert reply().startswith(b"220"), "no greeting"
        for command, code in (
            (b"LHLO bench.test\r\n", b"250"),
            (b"MAIL FROM:<bench@example.org>\r\n", b"250"),
            (f"RCPT TO:<r{k}@example.org>\r\n".encode(), b"250"),
            (b"DATA\r\n", b"354"),
            (data_section(message()), b"250"),
            (b"QUIT\r\n", b"221"),
        ):
            sock.sendall(command)
            got = reply()
            assert got.startswith(code), got
    return time.monotonic() - started


def main() -> int:
    crowd = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with WebhookServer() as hook, BridgeProcess(hook.url).wait_ready() as bridge:
        pid = bridge.process.pid
        quiet = [transaction(bridge.address, k) for k in range(runs)]
        rss_before = rss_mib(pid)

        started = time.monotonic()
        idle: list[socket.socket] = []
        for _ in range(crowd):
            sock = socket.create_connection(split_hostport(bridge.address), timeout=30)
            sock.sendall(b"LHLO slow\r\nNO")
            idle.append(sock)
        opened = time.monotonic() - started
        stop = threading.Event()

        def trickle() -> None:  # one byte per connection every 2 s, never a whole line
            while not stop.wait(2):
                for sock in idle:
                    with contextlib.suppress(OSError):
                        sock.send(b"O")

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        time.sleep(1.5)  # the crowd is idle long enough to yield its slots
        rss_crowd = rss_mib(pid)
        busy: list[float] = []
        failed = 0
        for k in range(runs):
            try:
                busy.append(transaction(bridge.address, runs + k))
            except (AssertionError, OSError):
                failed += 1
        stop.set()
        thread.join()
        metrics = http_get(f"{bridge.metrics_url}/metrics")[1]
        for sock in idle:
            sock.close()
    evicted = metric_value(metrics, "lmtp_bridge_protocol_errors_total", {"kind": "evicted"})
    print(f"idle connections: {crowd} opened in {opened:.2f} s (max_connections 1000)")
    print(
        f"bridge RSS: {rss_before:.1f} MiB before, {rss_crowd:.1f} MiB with the crowd "
        f"({(rss_crowd - rss_before) * 1024 / crowd:.1f} KiB per idle connection)"
    )
    print(
        f"transaction latency without crowd: median {statistics.median(quiet) * 1000:.1f} ms, "
        f"max {max(quiet) * 1000:.1f} ms ({runs} runs)"
    )
    if busy:
        print(
            f"transaction latency with crowd:    median {statistics.median(busy) * 1000:.1f} ms, "
            f"max {max(busy) * 1000:.1f} ms ({len(busy)} ok, {failed} failed)"
        )
    print(f"idle sessions evicted to make room: {evicted:.0f}")
    print(f"webhook deliveries: {len(hook.requests)} (expected {2 * runs})")
    return 0 if failed == 0 and len(hook.requests) == 2 * runs else 1


if __name__ == "__main__":
    sys.exit(main())
