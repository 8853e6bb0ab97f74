"""``--workers N``: real processes sharing one port (SO_REUSEPORT), metrics summed over them,
SIGTERM draining all of them, and a dead worker stopping the service."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bridge_process import (
    BridgeProcess,
    SyncLmtp,
    data_section,
    http_get,
    message,
    metric_value,
    tool,
    wait_for,
)
from webhook_server import WebhookServer

pytestmark = pytest.mark.peer
DELIVERED = {"result": "delivered", "route": "default", "stage": "data"}


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def owner_of_connections(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to local ``port`` each of ``pids`` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            counts[inodes[fields[9]]] += 1
    return counts


def readyz_is(bridge: BridgeProcess, code: int) -> bool:
    try:
        return http_get(f"{bridge.metrics_url}/readyz", timeout=1)[0] == code
    except OSError:
        return False


def deliver(address: str, rcpt: str) -> str:
    lmtp = SyncLmtp.connect(address)
    try:
        lmtp.greet()
        assert lmtp.command("MAIL FROM:<alice@example.org>").code == 250
        assert lmtp.command(f"RCPT TO:<{rcpt}>").code == 250
        assert lmtp.command("DATA").code == 354
        lmtp.send(data_section(message()))
        return str(lmtp.reply())
    finally:
        lmtp.close()


def test_workers_share_the_port_and_sum_their_metrics(webhook_server: WebhookServer) -> None:
    with BridgeProcess(webhook_server.url, {"LMTP_BRIDGE_WORKERS": "2"}) as bridge:
        bridge.wait_ready()
        workers = children(bridge.process.pid)
        assert len(workers) == 2, bridge.log
        # 40 idle connections: the kernel spreads them over both workers' sockets
        held = [SyncLmtp.connect(bridge.address) for _ in range(40)]
        for lmtp in held:
            lmtp.greet()
        spread = owner_of_connections(bridge.port, workers)
        for lmtp in held:
            lmtp.close()
        assert sum(spread.values()) == 40 and all(spread.values()), spread

        done = subprocess.run(
            [
                *(tool("smtp-source"), "-L", "-d", "-s", "8", "-m", "200", "-l", "2000"),
                *("-f", "sender@example.org", "-t", "bob@example.org", bridge.address),
            ],
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, (done.stderr, bridge.log[-3000:])
        assert webhook_server.wait_for_requests(200, timeout=10)
        _, text = http_get(f"{bridge.metrics_url}/metrics")
        assert metric_value(text, "lmtp_bridge_recipients_total", DELIVERED) == 200
        assert metric_value(text, "lmtp_bridge_messages_total") == 200
        assert metric_value(text, "lmtp_bridge_ready") == 1
        bridge.sigterm()
        assert bridge.wait(20) == 0, bridge.log


def test_sigterm_drains_every_worker(webhook_server: WebhookServer) -> None:
    webhook_server.behave("slow@example.org", delay=1.5)
    env = {"LMTP_BRIDGE_WORKERS": "2", "LMTP_BRIDGE_SHUTDOWN_GRACE": "10"}
    with BridgeProcess(webhook_server.url, env) as bridge:
        bridge.wait_ready()
        workers = children(bridge.process.pid)
        # one slow delivery in flight on each worker (spread found by trial, as the kernel hashes)
        sessions: list[SyncLmtp] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lmtp = SyncLmtp.connect(bridge.address)
            lmtp.greet()
            sessions.append(lmtp)
            if all(owner_of_connections(bridge.port, workers).values()):
                break
        busy = [owner_of_connections(bridge.port, workers)]
        for lmtp in sessions:
            assert lmtp.command("MAIL FROM:<alice@example.org>").code == 250
            assert lmtp.command("RCPT TO:<slow@example.org>").code == 250
            assert lmtp.command("DATA").code == 354
            lmtp.send(data_section(message()))
        assert webhook_server.wait_for_requests(len(sessions), timeout=5)
        bridge.sigterm()
        wait_for(lambda: readyz_is(bridge, 503), 5, "readyz 503")
        for lmtp in sessions:  # each in-flight delivery finishes with its 250, then 421
            assert lmtp.reply().code == 250
            assert lmtp.reply().code == 421
            lmtp.close()
        assert bridge.wait(20) == 0, bridge.log
        assert all(c for c in busy[0].values()), busy
        with pytest.raises(OSError):
            SyncLmtp.connect(bridge.address, timeout=2)


def test_a_signal_to_every_process_still_drains(webhook_server: WebhookServer) -> None:
    """systemd (KillMode=control-group) and Ctrl-C signal the parent and every worker at once;
    the parent then signals the workers again: a delivery in flight still gets its 250."""
    webhook_server.behave("slow@example.org", delay=1.5)
    env = {"LMTP_BRIDGE_WORKERS": "2", "LMTP_BRIDGE_SHUTDOWN_GRACE": "10"}
    with BridgeProcess(webhook_server.url, env) as bridge:
        bridge.wait_ready()
        lmtp = SyncLmtp.connect(bridge.address)
        lmtp.greet()
        assert lmtp.command("MAIL FROM:<alice@example.org>").code == 250
        assert lmtp.command("RCPT TO:<slow@example.org>").code == 250
        assert lmtp.command("DATA").code == 354
        lmtp.send(data_section(message()))
        assert webhook_server.wait_for_requests(1, timeout=5)
        for pid in [bridge.process.pid, *children(bridge.process.pid)]:
            os.kill(pid, signal.SIGINT)
        assert lmtp.reply().code == 250
        lmtp.close()
        assert bridge.wait(20) == 0, bridge.log
        assert "worker ended unexpectedly" not in bridge.log
        assert "already draining; signal ignored" in bridge.log


def test_a_dead_worker_stops_the_service(webhook_server: WebhookServer) -> None:
    with BridgeProcess(webhook_server.url, {"LMTP_BRIDGE_WORKERS": "2"}) as bridge:
        bridge.wait_ready()
        first, second = children(bridge.process.pid)
        os.kill(first, signal.SIGKILL)
        assert bridge.wait(20) == 1, bridge.log
        assert (
            not Path(f"/proc/{second}").exists()
            or "zombie" in Path(f"/proc/{second}/status").read_text()
        )
        assert "worker ended unexpectedly" in bridge.log


def test_workers_on_port_zero_and_a_unix_socket(
    webhook_server: WebhookServer, tmp_path: Path
) -> None:
    path = tmp_path / "lmtp.sock"
    with BridgeProcess(
        webhook_server.url, {"LMTP_BRIDGE_WORKERS": "3"}, listen=f"unix:{path}"
    ) as bridge:
        wait_for(path.exists, 15, "the unix socket")
        wait_for(lambda: readyz_is(bridge, 200), 15, "ready")
        import socket as socket_module

        for i in range(6):
            sock = socket_module.socket(socket_module.AF_UNIX)
            sock.connect(str(path))
            lmtp = SyncLmtp(sock)
            lmtp.greet()
            assert lmtp.command("MAIL FROM:<alice@example.org>").code == 250
            assert lmtp.command(f"RCPT TO:<u{i}@example.org>").code == 250
            assert lmtp.command("DATA").code == 354
            lmtp.send(data_section(message()))
            assert lmtp.reply().code == 250
            lmtp.close()
        bridge.sigterm()
        assert bridge.wait(20) == 0, bridge.log
    assert not path.exists()


def test_a_sigterm_while_the_workers_start_still_drains_cleanly(
    webhook_server: WebhookServer,
) -> None:
    """Workers still importing when the parent forwards SIGTERM hold it until they can drain."""
    with BridgeProcess(webhook_server.url, {"LMTP_BRIDGE_WORKERS": "2"}) as bridge:
        wait_for(lambda: "workers started" in bridge.log, 15, "the parent to fork")
        bridge.sigterm()
        assert bridge.wait(20) == 0, bridge.log
