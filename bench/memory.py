#!/usr/bin/env python3
"""Memory of the bridge under big messages: prints what it measured (and checks the goals).

1. A 100 MiB message against a 25 MiB limit, 3 recipients: 3 x 552, and the bridge's resident
   memory must grow by less than 10 MiB (the excess is read and dropped, never buffered).
2. An accepted 50 MiB message in `raw` mode: spooled to a file and streamed from it to the
   webhook; resident memory must grow by less than 1.5 x 50 MiB.

The bridge runs as a subprocess (`python -m bridge serve`); its peak RSS (VmHWM, reset through
/proc/PID/clear_refs after a warm-up message) is compared with its RSS before the message.
Usage: bench/memory.py [--json]     (exit 1 if a goal is missed)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bridge_process import BridgeProcess, message, split_hostport
from webhook_server import WebhookServer

MiB = 1 << 20


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


def read_replies(sock: socket.socket, count: int) -> list[str]:
    buf = b""
    replies: list[str] = []
    while len(replies) < count:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed after {replies}")
        buf += data
        while b"\r\n" in buf and len(replies) < count:
            line, buf = buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                replies.append(line.decode())
    return replies


def deliver(address: str, rcpts: list[str], size: int) -> tuple[list[str], float]:
    """One transaction whose body is `size` bytes of 78-octet lines, streamed 1 MiB at a time."""
    head = message(subject=f"{size} bytes")
    line = b"0123456789" * 7 + b"abcdef\r\n"
    block = line * (MiB // len(line))
    with socket.create_connection(split_hostport(address), timeout=120) as sock:
        read_replies(sock, 1)
        envelope = "LHLO bench.test\r\nMAIL FROM:<bench@example.org>\r\n"
        envelope += "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n"
        sock.sendall(envelope.encode())
        replies = read_replies(sock, 3 + len(rcpts))
        assert replies[-1].startswith("354"), replies
        started = time.monotonic()
        sock.sendall(head)
        sent = len(head)
        while sent + len(block) <= size:
            sock.sendall(block)
            sent += len(block)
        sock.sendall(line * ((size - sent) // len(line)) + b".\r\n")
        accepted = sum(r.startswith("250") for r in replies[2:-1])
        result = read_replies(sock, accepted)
        elapsed = time.monotonic() - started
        sock.sendall(b"QUIT\r\n")
    return result, elapsed


def scenario(name: str, size: int, limit: int, rcpts: list[str], env: dict[str, str]) -> dict:
    with WebhookServer() as hook, BridgeProcess(hook.url, env).wait_ready() as bridge:
        pid = bridge.process.pid
        warm, _ = deliver(bridge.address, rcpts[:1], 2 * MiB)  # imports, pools, first spool
        assert warm[0].startswith("250"), warm
        time.sleep(0.2)
        before = status_kib(pid, "VmRSS")
        reset_peak(pid)
        replies, elapsed = deliver(bridge.address, rcpts, size)
        peak = status_kib(pid, "VmHWM")
        bodies = [len(r.body) for r in hook.requests[1:]]
    growth = (peak - before) / 1024
    return {
        "scenario": name,
        "message_mib": size / MiB,
        "replies": [r[:9] for r in replies],
        "webhook_bodies_mib": [round(b / MiB, 2) for b in bodies],
        "rss_before_mib": round(before / 1024, 1),
        "rss_growth_mib": round(growth, 1),
        "goal_mib": limit / MiB,
        "seconds": round(elapsed, 2),
        "ok": growth < limit / MiB,
    }


def main() -> int:
    rcpts = ["a@example.org", "b@example.org", "c@example.org"]
    results = [
        scenario(
            "100 MiB message, 25 MiB limit",
            100 * MiB,
            10 * MiB,
            rcpts,
            {"LMTP_BRIDGE_MAX_MESSAGE_SIZE": str(25 * MiB), "LMTP_BRIDGE_PAYLOAD": "raw"},
        ),
        scenario(
            "50 MiB message accepted, raw",
            50 * MiB,
            75 * MiB,
            rcpts[:1],
            {"LMTP_BRIDGE_MAX_MESSAGE_SIZE": str(64 * MiB), "LMTP_BRIDGE_PAYLOAD": "raw"},
        ),
    ]
    for r in results:
        if "--json" in sys.argv:
            print(json.dumps(r))
        else:
            print(
                f"{r['scenario']}: replies {r['replies']}, webhook bodies "
                f"{r['webhook_bodies_mib']} MiB, RSS {r['rss_before_mib']} MiB + "
                f"{r['rss_growth_mib']} MiB (goal < {r['goal_mib']:.0f} MiB) in {r['seconds']} s"
                f" -> {'ok' if r['ok'] else 'MISSED'}"
            )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
