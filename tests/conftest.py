"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from webhook_server import WebhookServer

if TYPE_CHECKING:
    from bridge_process import StartBridge

    from bridge.app import Running


# Hypothesis profiles: "ci" (the default) keeps the library's 100 examples, with no per-example
# deadline (the machines are shared and loaded); "long" is the fuzzing run on demand:
# HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_parse_fuzz.py
settings.register_profile("ci", deadline=None)
settings.register_profile(
    "long",
    deadline=None,
    max_examples=20_000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    """A real HTTP webhook receiver on 127.0.0.1; its ``url`` ends in ``/hook``."""
    with WebhookServer() as server:
        yield server
    assert not server.errors, f"the test webhook server failed: {server.errors!r}"


# ---- end-to-end: the bridge in this process (tests/bridge_process.py) ----

DRAIN_LIMIT = 20.0  # seconds a test's bridge may take to drain after the test


@pytest.fixture
async def start_bridge(webhook_server: WebhookServer) -> AsyncIterator[StartBridge]:
    """``await start_bridge(**settings)`` runs the bridge under trio on port 0 (webhook_url is
    the webhook_server's unless routes are given); each one is drained when the test ends,
    and one that does not finish draining fails the test."""
    import trio
    from bridge_process import settings_for, start_in_process

    started: list[tuple[Running, trio.Event]] = []
    async with trio.open_nursery() as nursery:

        async def start(**overrides: object) -> Running:
            if "routes" not in overrides:
                overrides.setdefault("webhook_url", webhook_server.url)
            stopped = trio.Event()
            running = await start_in_process(nursery, settings_for(**overrides), stopped)
            started.append((running, stopped))
            return running

        yield start
        for running, _ in started:
            running.stop()
        with trio.move_on_after(DRAIN_LIMIT):
            for _, stopped in started:
                await stopped.wait()
        if not all(stopped.is_set() for _, stopped in started):
            nursery.cancel_scope.cancel()
            pytest.fail(f"the bridge did not drain within {DRAIN_LIMIT} s")
