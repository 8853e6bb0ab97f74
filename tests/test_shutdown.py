"""Graceful shutdown of a real bridge process: SIGTERM drains open transactions within the grace,
tells idle sessions 421, never turns a cut-off delivery into a 250, and exits 0.
"""

from __future__ import annotations

import signal
import time

import pytest
from bridge_process import (
    BridgeProcess,
    SyncLmtp,
    data_section,
    http_get,
    message,
    wait_for,
)
from webhook_server import WebhookServer


def start_transaction(bridge: BridgeProcess, rcpt: str) -> SyncLmtp:
    """A session whose message to ``rcpt`` has been sent up to and including the final dot."""
    client = SyncLmtp.connect(bridge.address)
    client.greet()
    assert client.command("MAIL FROM:<alice@example.org>").code == 250
    assert client.command(f"RCPT TO:<{rcpt}>").code == 250
    assert client.command("DATA").code == 354
    client.send(data_section(message()))
    return client


def readyz(bridge: BridgeProcess) -> int | None:
    try:
        return http_get(f"{bridge.metrics_url}/readyz", timeout=1)[0]
    except OSError:
        return None


def test_sigterm_finishes_an_open_delivery_and_refuses_new_work(
    webhook_server: WebhookServer,
) -> None:
    webhook_server.behave("slow@example.org", delay=3)
    with BridgeProcess(webhook_server.url, {"LMTP_BRIDGE_SHUTDOWN_GRACE": "10"}) as bridge:
        bridge.wait_ready()
        idle = SyncLmtp.connect(bridge.address)
        idle.greet()
        busy = start_transaction(bridge, "slow@example.org")
        wait_for(lambda: webhook_server.requests_for("slow@example.org"), what="the slow POST")

        bridge.sigterm()
        signalled = time.monotonic()
        assert wait_for(lambda: readyz(bridge) == 503, what="/readyz to say 503")

        # an idle session is told at once
        told = idle.reply()
        assert (told.code, told.status) == (421, "4.3.2"), str(told)
        assert idle.at_eof()
        # a new connection is refused, or answered 421; one that raced into the listen
        # backlog just before the listener closed is reset, which an MTA also retries later
        try:
            late = SyncLmtp.connect(bridge.address, timeout=5)
        except ConnectionRefusedError:
            pass
        else:
            try:
                greeting = late.reply()
            except ConnectionResetError:
                pass
            else:
                assert (greeting.code, greeting.status) == (421, "4.3.2"), str(greeting)
            late.close()
        # the delivery in flight is allowed to finish: a real 250, after the webhook said 200
        delivered = busy.reply()
        assert (delivered.code, delivered.status) == (250, "2.0.0"), str(delivered)
        assert time.monotonic() - signalled > 1.5
        after = busy.reply()  # then this session, idle now, is closed too
        assert (after.code, after.status) == (421, "4.3.2"), str(after)
        assert busy.at_eof()

        assert bridge.wait(10) == 0, bridge.log
        assert '"draining"' in bridge.log


def test_sigterm_cuts_a_delivery_slower_than_the_grace_with_451(
    webhook_server: WebhookServer,
) -> None:
    webhook_server.behave("stuck@example.org", hang=True)
    with BridgeProcess(
        webhook_server.url,
        {"LMTP_BRIDGE_SHUTDOWN_GRACE": "1", "LMTP_BRIDGE_HTTP_TIMEOUT": "30"},
    ) as bridge:
        bridge.wait_ready()
        client = start_transaction(bridge, "stuck@example.org")
        wait_for(lambda: webhook_server.requests_for("stuck@example.org"), what="the POST")

        bridge.sigterm()
        cut = client.reply()

        assert cut.code == 451, f"a delivery cut off by the grace period got {cut}"
        assert bridge.wait(10) == 0, bridge.log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_idle_bridge_exits_0_on_signal(
    signum: signal.Signals, webhook_server: WebhookServer
) -> None:
    with BridgeProcess(webhook_server.url) as bridge:
        bridge.wait_ready()
        bridge.process.send_signal(signum)
        assert bridge.wait(10) == 0, bridge.log


def test_signals_that_keep_coming_while_it_stops_still_exit_0(
    webhook_server: WebhookServer,
) -> None:
    """A supervisor that repeats its SIGTERM (or a --workers parent whose SIGTERM reaches a worker
    that has already drained) must not turn a clean stop into death by signal."""
    with BridgeProcess(webhook_server.url) as bridge:
        bridge.wait_ready()
        while bridge.process.poll() is None:
            try:
                bridge.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.0002)
        assert bridge.wait(10) == 0, bridge.log
        assert "already draining; signal ignored" in bridge.log
