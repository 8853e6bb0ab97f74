"""Delivery policy: the circuit breaker's states, and the retry budget's arithmetic on a
virtual clock (trio's autojump clock with an httpx MockTransport that hangs)."""

from __future__ import annotations

import logging
import random

import httpx
import pytest
import trio

from bridge.base.route import Route
from bridge.config import MAX_RETRY_BUDGET, ConfigError, load_settings
from bridge.delivery.breaker import (
    BREAKER_OPEN,
    MAX_WINDOW_ENTRIES,
    BreakerPolicy,
    Breakers,
    CircuitBreaker,
    Judgement,
    State,
    judge,
)
from bridge.webhook import client as webhook
from bridge.webhook.client import WebhookClient, WebhookRequest

# Postfix's lmtp_data_done_timeout: how long it waits for each reply after the data.
POSTFIX_DATA_DONE_TIMEOUT = 600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = BreakerPolicy(failure_ratio=0.5, window=30, min_calls=10, cooldown=10)
OK = Judgement(False, 200)
DOWN = Judgement(True, None, "connect")


def poison(rcpt: str) -> Judgement:
    return judge(503, None, rcpt) or pytest.fail("a 503 must count")


def breaker(clock: FakeClock, policy: BreakerPolicy = POLICY) -> CircuitBreaker:
    return CircuitBreaker("r", policy, clock=clock)


def test_judge_counts_only_what_says_the_endpoint_is_down() -> None:
    for status in (500, 502, 503, 504, 507, 429):
        assert judge(status, None, "a@x") == Judgement(True, status, None, "a@x")
    for status in (200, 202, 301, 400, 401, 403, 404, 408, 410, 413, 422, 425):
        assert judge(status, None, "a@x") == Judgement(False, status)
    for error in ("dns", "refused", "connect", "timeout", "tls", "reset", "protocol"):
        assert judge(None, error, "a@x") == Judgement(True, None, error)  # not per recipient
    assert judge(None, "internal", "a@x") is None  # our own bug says nothing of the webhook


def test_poison_recipients_never_open_it_however_often_they_fail() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(50):  # the MTA retries them again and again
        for rcpt in ("p1@x", "p2@x", "p3@x"):
            b.record(poison(rcpt))
            clock.now += 0.1
    assert b.state is State.CLOSED and b.failures == 3
    for i in range(7):  # with some healthy traffic too: 3 of 10 is under the ratio
        b.record(OK)
        b.record(poison(f"p{i % 3 + 1}@x"))
    assert b.state is State.CLOSED and b.admit()


def test_503_for_many_distinct_recipients_opens_it() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for i in range(9):
        b.record(poison(f"user{i}@x"))
    assert b.state is State.CLOSED  # 9 calls: under the minimum volume
    b.record(poison("user9@x"))
    assert b.state is State.OPEN and not b.admit()


def test_an_endpoint_that_is_down_opens_it_at_the_minimum_volume() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(9):
        b.record(DOWN)  # transport failures count each time, recipient or not
    assert b.state is State.CLOSED
    b.record(DOWN)
    assert b.state is State.OPEN


def test_failure_ratio_below_the_threshold_keeps_it_closed() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(6):
        b.record(OK)
    for _ in range(5):
        b.record(DOWN)  # 5 of 11
    assert b.state is State.CLOSED
    b.record(DOWN)  # 6 of 12: half
    assert b.state is State.OPEN


def test_refusals_of_recipients_never_count_as_failures() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for status in (404, 410, 401, 403, 400, 413, 422) * 20:
        b.record(judge(status, None, "a@x") or pytest.fail("an answer counts"))
    assert b.state is State.CLOSED and b.failures == 0


def test_old_outcomes_leave_the_window() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(9):
        b.record(DOWN)
    clock.now += 30  # they are out of the 30 s window
    b.record(DOWN)
    assert b.state is State.CLOSED and b.calls == 1
    for _ in range(8):
        b.record(DOWN)
        clock.now += 1
    b.record(DOWN)
    assert b.state is State.OPEN


def test_the_window_is_bounded() -> None:
    clock = FakeClock()
    b = breaker(clock, BreakerPolicy(failure_ratio=1.0, window=3600, min_calls=1, cooldown=1))
    b.record(OK)  # so that the failures never reach 100 %
    for i in range(MAX_WINDOW_ENTRIES + 500):  # every recipient of a big domain answered 503
        b.record(poison(f"user{i}@x"))
    assert b.state is State.CLOSED and b.failures == MAX_WINDOW_ENTRIES
    for _ in range(100_000):  # successes are counts, whatever the rate
        b.record(OK)
    assert b.calls == 100_001 + MAX_WINDOW_ENTRIES


def test_half_open_lets_one_probe_through_then_closes_or_reopens() -> None:
    clock = FakeClock()
    b = breaker(clock, BreakerPolicy(min_calls=1, cooldown=10))
    b.record(DOWN)
    assert b.state is State.OPEN and not b.admit()
    clock.now += 10
    assert b.admit()  # the probe
    assert b.state is State.HALF_OPEN
    assert not b.admit() and not b.admit()  # everyone else waits for it
    b.record(poison("probe@x"))  # the probe failed: a new cool-down
    assert b.state is State.OPEN and not b.admit()
    clock.now += 10
    assert b.admit()
    b.record(Judgement(False, 404))  # any answer but 5xx/429: the endpoint is back
    assert b.state is State.CLOSED
    assert all(b.admit() for _ in range(5))
    assert b.calls == 0  # judged afresh


def test_outcomes_of_earlier_deliveries_do_not_move_an_open_breaker() -> None:
    clock = FakeClock()
    b = breaker(clock, BreakerPolicy(min_calls=1, cooldown=10))
    b.record(DOWN)
    clock.now += 5
    b.record(DOWN)  # began before it opened: the cool-down is not extended
    b.record(OK)  # nor does a late success close it
    assert b.state is State.OPEN
    clock.now += 5
    assert b.admit() and b.state is State.HALF_OPEN


def test_a_probe_that_never_reports_back_is_replaced_after_a_cooldown() -> None:
    clock = FakeClock()
    b = breaker(clock, BreakerPolicy(min_calls=1, cooldown=10))
    b.record(DOWN)
    clock.now += 10
    assert b.admit()  # its transaction is then reset: no outcome ever comes
    clock.now += 9
    assert not b.admit()
    clock.now += 1
    assert b.admit()


def test_a_probe_refused_at_rcpt_after_all_is_not_spent() -> None:
    """Verification refused the probe's recipient: no delivery will report back, so the next
    RCPT probes at once; a release outside half-open changes nothing."""
    clock = FakeClock()
    b = breaker(clock, BreakerPolicy(min_calls=1, cooldown=10))
    b.release()  # closed: nothing to give back
    assert b.state is State.CLOSED and b.admit()
    b.record(DOWN)
    b.release()  # open: the cool-down stands
    assert not b.admit()
    clock.now += 10
    assert b.admit() and b.state is State.HALF_OPEN
    assert not b.admit()
    b.release()
    assert b.admit()  # the next recipient is the probe
    assert not b.admit()
    b.record(OK)
    assert b.state is State.CLOSED


def test_every_transition_is_one_log_line_with_the_route_and_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    b = CircuitBreaker("orders", BreakerPolicy(min_calls=2, cooldown=10), clock=clock)
    with caplog.at_level(logging.INFO, logger="bridge.delivery.breaker"):
        b.record(DOWN)
        b.record(poison("a@x"))
        clock.now += 10
        b.admit()
        b.admit()  # refused while the probe is out: no transition, no line
        b.record(OK)
    lines = [(r.getMessage(), r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [
        (
            "circuit breaker opened",
            {
                "route": "orders",
                "reason": "2 of 2 deliveries in 30 s failed at the endpoint (last: HTTP 503)",
            },
        ),
        (
            "circuit breaker half-open",
            {"route": "orders", "reason": "cool-down of 10 s over: one probe"},
        ),
        ("circuit breaker closed", {"route": "orders", "reason": "probe answered: HTTP 200"}),
    ]


def test_min_calls_zero_disables_the_breakers() -> None:
    breakers = Breakers(BreakerPolicy(min_calls=0))
    for _ in range(100):
        breakers.record("r", DOWN)
    assert breakers.admit("r") is None


def test_breakers_are_per_route() -> None:
    breakers = Breakers(BreakerPolicy(min_calls=1))
    breakers.record("down", DOWN)
    breakers.record("down", None)  # a bug of the bridge: nothing to judge
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
