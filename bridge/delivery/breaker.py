"""Delivery policy: per-route circuit breakers that judge the endpoint, not the recipients (refuse
at RCPT while a webhook is down), and the metrics of the breakers and the Retry-After hints.

The rule (SPEC 4; after resilience4j's failure-rate breaker and Envoy's outlier detection):
each delivery counts once, whatever its in-session retries, as a success (any HTTP answer that
is not 5xx/429: the endpoint is up, even when it refuses the recipient) or an endpoint failure
(connect, DNS, TLS, reset, timeout, an invalid response; HTTP 5xx or 429). A 5xx/429 counts once
per distinct recipient in the window, so a few poison recipients that always get 503 cannot
outweigh the rest. The breaker opens when, over the last ``window`` seconds, at least
``min_calls`` deliveries were judged and at least ``failure_ratio`` of them failed. Open: RCPTs
get 451 4.3.0 for ``cooldown`` seconds; then half-open: one probe RCPT at a time is let through,
and the first outcome of the route decides (success: closed, failure: open again).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from bridge.lmtp.events import Reply
from bridge.ops.logs import log_event
from bridge.ops.metrics import RETRY_AFTER

log = logging.getLogger("bridge.delivery.breaker")

BREAKER_OPEN = Reply(451, "4.3.0", "Webhook unavailable, try again later")
MAX_WINDOW_ENTRIES = 10_000  # outcomes kept per route: a bounded window even at high rates

BREAKER_STATE = Gauge(
    "lmtp_bridge_circuit_breaker_state",
    "Circuit breaker of a route: 0 closed, 1 open (RCPT refused), 2 half-open (one probe)",
    ["route"],
)
BREAKER_REFUSED = Counter(
    "lmtp_bridge_circuit_breaker_refused",
    "Recipients answered 451 4.3.0 at RCPT because the route's breaker was open",
    ["route"],
)
BREAKER_OPENED = Counter(
    "lmtp_bridge_circuit_breaker_opened", "Times a route's breaker opened", ["route"]
)


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The settings of every route's breaker; ``min_calls = 0`` disables them."""

    failure_ratio: float = 0.5
    window: float = 30.0  # seconds of outcomes judged
    min_calls: int = 10
    cooldown: float = 30.0  # seconds open before a probe

    @property
    def enabled(self) -> bool:
        return self.min_calls > 0


@dataclass(frozen=True, slots=True)
class Judgement:
    """One delivery, as the breaker sees it."""

    failed: bool
    why: str  # "HTTP 503", "connect", "HTTP 404": for the transition's log line
    recipient: str | None = None  # set for an HTTP 5xx/429: counted once per recipient


def judge(http_status: int | None, error: str | None, recipient: str) -> Judgement | None:
    """How a delivery's final outcome counts (None: not at all, e.g. a bug of the bridge)."""
    if http_status is not None:
        failed = http_status >= 500 or http_status == 429
        return Judgement(failed, f"HTTP {http_status}", recipient if failed else None)
    if error is None or error == "internal":
        return None
    return Judgement(True, error)  # timeout, connect, reset, tls, protocol


class CircuitBreaker:
    """One route's breaker (the rule is in the module docstring)."""

    def __init__(
        self, route: str, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.route = route
        self.policy = policy
        self._clock = clock
        self.state = State.CLOSED
        self._until = 0.0  # open: refuse until; half-open: the next probe is allowed at
        # the window: (time, failed, recipient of a 5xx/429 or None), oldest first
        self._window: deque[tuple[float, bool, str | None]] = deque()
        self._successes = 0
        self._plain_failures = 0  # transport failures: each counts
        self._failing_recipients: dict[str, int] = {}  # 5xx/429: each recipient counts once

    @property
    def failures(self) -> int:
        return self._plain_failures + len(self._failing_recipients)

    @property
    def calls(self) -> int:
        return self._successes + self.failures

    def admit(self) -> bool:
        """May a recipient of this route be accepted at RCPT now?"""
        if self.state is State.CLOSED or not self.policy.enabled:
            return True
        now = self._clock()
        if now < self._until:
            return False
        # Cool-down over (or the last probe never came back): let one probe through.
        if self.state is State.OPEN:
            self._set(State.HALF_OPEN, f"cool-down of {self.policy.cooldown:g} s over: one probe")
        self._until = now + self.policy.cooldown
        return True

    def record(self, judgement: Judgement) -> None:
        """A delivery of this route ended."""
        if not self.policy.enabled:
            return
        if self.state is State.OPEN:
            return  # a delivery that began before it opened: the cool-down stands
        if self.state is State.HALF_OPEN:  # the first outcome decides
            if judgement.failed:
                self._open(f"probe failed: {judgement.why}")
            else:
                self._reset()
                self._set(State.CLOSED, f"probe answered: {judgement.why}")
            return
        now = self._clock()
        self._evict(now)
        self._add(now, judgement)
        if not judgement.failed:
            return
        calls, failures = self.calls, self.failures
        if calls >= self.policy.min_calls and failures >= self.policy.failure_ratio * calls:
            self._open(
                f"{failures} of {calls} deliveries in {self.policy.window:g} s failed at the "
                f"endpoint (last: {judgement.why})"
            )

    def _add(self, now: float, judgement: Judgement) -> None:
        if len(self._window) >= MAX_WINDOW_ENTRIES:
            self._drop_oldest()
        key = judgement.recipient
        self._window.append((now, judgement.failed, key))
        if not judgement.failed:
            self._successes += 1
        elif key is None:
            self._plain_failures += 1
        else:
            self._failing_recipients[key] = self._failing_recipients.get(key, 0) + 1

    def _evict(self, now: float) -> None:
        horizon = now - self.policy.window
        while self._window and self._window[0][0] <= horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, failed, key = self._window.popleft()
        if not failed:
            self._successes -= 1
        elif key is None:
            self._plain_failures -= 1
        else:
            left = self._failing_recipients[key] - 1
            if left:
                self._failing_recipients[key] = left
            else:
                del self._failing_recipients[key]

    def _reset(self) -> None:
        self._window.clear()
        self._successes = self._plain_failures = 0
        self._failing_recipients.clear()

    def _open(self, reason: str) -> None:
        self._reset()
        self._until = self._clock() + self.policy.cooldown
        if self.state is not State.OPEN:
            BREAKER_OPENED.labels(self.route).inc()
            self._set(State.OPEN, reason)

    def _set(self, state: State, reason: str) -> None:
        self.state = state
        BREAKER_STATE.labels(self.route).set(int(state))
        name = {State.CLOSED: "closed", State.OPEN: "opened", State.HALF_OPEN: "half-open"}
        level = logging.WARNING if state is State.OPEN else logging.INFO
        log_event(log, level, f"circuit breaker {name[state]}", route=self.route, reason=reason)


class Breakers:
    """The breakers of every route, by route name."""

    def __init__(
        self, policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or BreakerPolicy(min_calls=0)
        self._clock = clock
        self._by_route: dict[str, CircuitBreaker] = {}

    def get(self, route: str) -> CircuitBreaker:
        breaker = self._by_route.get(route)
        if breaker is None:
            breaker = CircuitBreaker(route, self.policy, self._clock)
            self._by_route[route] = breaker
        return breaker

    def admit(self, route: str) -> Reply | None:
        """None to accept the RCPT, else the reply that refuses it."""
        if not self.policy.enabled or self.get(route).admit():
            return None
        BREAKER_REFUSED.labels(route).inc()
        return BREAKER_OPEN

    def record(self, route: str, judgement: Judgement | None) -> None:
        if judgement is not None and self.policy.enabled:
            self.get(route).record(judgement)


def init_policy_metrics(route_names: Iterable[str]) -> None:
    for route in route_names:
        BREAKER_STATE.labels(route).set(0)
        BREAKER_REFUSED.labels(route)
        BREAKER_OPENED.labels(route)
        RETRY_AFTER.labels(route)
