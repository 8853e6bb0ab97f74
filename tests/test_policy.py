"""Delivery policy: the circuit breaker's states, and the retry budget's arithmetic on a
virtual clock (trio's autojump clock with an httpx MockTransport that hangs)."""

from __future__ import annotations

import random

import httpx
import pytest
import trio

from bridge.base.route import Route
from bridge.config import MAX_RETRY_BUDGET, ConfigError, load_settings
from bridge.delivery.breaker import BREAKER_OPEN, Breakers, CircuitBreaker, State
from bridge.webhook import client as webhook
from bridge.webhook.client import WebhookClient, WebhookRequest

# Postfix's lmtp_data_done_timeout: how long it waits for each reply after the data.
POSTFIX_DATA_DONE_TIMEOUT = 600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("r", threshold=3, cooldown=30, clock=clock)
    breaker.record(success=False)
    breaker.record(success=False)
    breaker.record(success=True)  # a definite answer resets the count
    breaker.record(success=False, failures=2)
    assert breaker.state is State.CLOSED and breaker.admit()
    breaker.record(success=False)
    assert breaker.state is State.OPEN
    assert not breaker.admit()
    clock.now += 29.9
    assert not breaker.admit()


def test_half_open_lets_one_probe_through_then_closes_or_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("r", threshold=1, cooldown=10, clock=clock)
    breaker.record(success=False)
    clock.now += 10
    assert breaker.admit()  # the probe
    assert breaker.state is State.HALF_OPEN
    assert not breaker.admit() and not breaker.admit()  # everyone else waits for it
    breaker.record(success=False)  # the probe failed: a new cool-down
    assert breaker.state is State.OPEN and not breaker.admit()
    clock.now += 10
    assert breaker.admit()
    breaker.record(success=True)
    assert breaker.state is State.CLOSED
    assert all(breaker.admit() for _ in range(5))


def test_a_probe_that_never_reports_back_is_replaced_after_a_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("r", threshold=1, cooldown=10, clock=clock)
    breaker.record(success=False)
    clock.now += 10
    assert breaker.admit()  # its transaction is then reset: no outcome ever comes
    clock.now += 9
    assert not breaker.admit()
    clock.now += 1
    assert breaker.admit()


def test_threshold_zero_disables_the_breaker() -> None:
    breakers = Breakers(threshold=0, cooldown=10)
    for _ in range(100):
        breakers.get("r").record(success=False)
    assert breakers.admit("r") is None


def test_breakers_are_per_route() -> None:
    breakers = Breakers(threshold=1, cooldown=10)
    breakers.get("down").record(success=False)
    assert breakers.admit("down") == BREAKER_OPEN
    assert str(BREAKER_OPEN).startswith("451 4.3.0")
    assert breakers.admit("up") is None


# --- retry budget -----------------------------------------------------------------------


def hanging_client() -> tuple[WebhookClient, list[float]]:
    """A client whose webhook never answers; returns it and the (virtual) start times."""
    starts: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        starts.append(trio.current_time())
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return WebhookClient(transport=httpx.MockTransport(handler)), starts


REQUEST = WebhookRequest(
    url="http://127.0.0.1:9/hook", headers=[], chunks=lambda: iter([b"{}"]), length=2
)


@pytest.mark.parametrize(
    ("http_timeout", "retries", "budget"),
    [
        (30.0, 2, 120.0),  # the defaults: 3 x 30 s + backoff, inside the budget
        (100.0, 5, 120.0),  # a long timeout: the budget cuts the second try short
        (300.0, 10, 300.0),  # the largest settings allowed
        (5.0, 1000, 60.0),  # many retries: the budget stops them
    ],
)
async def test_retry_budget_always_ends_inside_postfix_timeout(
    autojump_clock: trio.abc.Clock, http_timeout: float, retries: int, budget: float
) -> None:
    client, starts = hanging_client()
    route = Route(
        name="r", url="http://x", timeout=http_timeout, retries=retries, retry_budget=budget
    )
    began = trio.current_time()
    outcome = await client.deliver(route, REQUEST)
    spent = trio.current_time() - began
    await client.aclose()
    assert outcome.reply.code == 451 and outcome.error == "timeout"
    assert spent <= budget + 0.01 < POSTFIX_DATA_DONE_TIMEOUT / 2 + 0.1
    assert len(starts) == outcome.attempts <= retries + 1
    if http_timeout * (retries + 1) + 10 < budget:
        assert outcome.attempts == retries + 1  # the budget never cuts what fits in it


async def test_no_retry_starts_with_less_than_a_minimal_attempt_left(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    client, starts = hanging_client()
    # 1st try 10 s, backoff 0.2 s, 2nd try 10 s, backoff 0.5 s: 20.7 s; 0.3 s left < MIN_ATTEMPT
    route = Route(name="r", url="http://x", timeout=10, retries=5, retry_budget=21.0)
    outcome = await client.deliver(route, REQUEST)
    await client.aclose()
    assert outcome.attempts == 2
    assert starts[1] - starts[0] == pytest.approx(10.2)
    assert webhook.MIN_ATTEMPT == 1.0


def test_budget_is_capped_well_inside_postfix_timeout() -> None:
    assert MAX_RETRY_BUDGET <= POSTFIX_DATA_DONE_TIMEOUT / 2
    with pytest.raises(ConfigError) as raised:
        load_settings(
            overrides={"webhook_url": "http://127.0.0.1:1/x", "http_retry_budget": 601},
            environ={},
        )
    assert raised.value.problems[0].startswith("http_retry_budget:")
    settings = load_settings(overrides={"webhook_url": "http://127.0.0.1:1/x"}, environ={})
    # the documented default arithmetic: 3 tries x 30 s + backoff (<= 0.2 + 0.5 s) < 120 s
    worst = settings.http_timeout * (settings.http_retries + 1) + 0.2 + 0.5
    assert worst < settings.http_retry_budget <= MAX_RETRY_BUDGET
