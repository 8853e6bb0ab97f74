"""Delivery policy: per-route circuit breakers (refuse at RCPT while a webhook is down) and the
metrics of the policy, the breakers and the webhooks' Retry-After hints."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge

from bridge.lmtp.events import Reply
from bridge.ops.metrics import RETRY_AFTER

BREAKER_OPEN = Reply(451, "4.3.0", "Webhook unavailable, try again later")

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


class CircuitBreaker:
    """One route's breaker.

    Closed: everything passes; ``threshold`` retryable failures in a row open it. Open: RCPTs
    are refused for ``cooldown`` seconds, then one RCPT is let through as a probe (half-open).
    A success closes it; a retryable failure opens it again. A probe that never delivers (its
    transaction was reset) lets the next one through after another ``cooldown``.
    """

    def __init__(
        self,
        route: str,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.route = route
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self._until = 0.0  # open: refuse until; half-open: next probe allowed at

    def admit(self) -> bool:
        """May a recipient of this route be accepted at RCPT now?"""
        if self.state is State.CLOSED or self.threshold == 0:
            return True
        now = self._clock()
        if now < self._until:
            return False
        # Cool-down over (or the last probe never came back): let one probe through.
        self._set(State.HALF_OPEN)
        self._until = now + self.cooldown
        return True

    def record(self, success: bool, failures: int = 1) -> None:
        """An outcome of the webhook: ``success`` (any definite answer: 2xx or a permanent
        refusal) or ``failures`` retryable failures in a row."""
        if self.threshold == 0:
            return
        if success:
            self.failures = 0
            self._set(State.CLOSED)
            return
        self.failures += failures
        if self.state is State.HALF_OPEN or self.failures >= self.threshold:
            if self.state is not State.OPEN:
                BREAKER_OPENED.labels(self.route).inc()
            self._set(State.OPEN)
            self._until = self._clock() + self.cooldown

    def _set(self, state: State) -> None:
        self.state = state
        BREAKER_STATE.labels(self.route).set(int(state))


class Breakers:
    """The breakers of every route, by route name."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._by_route: dict[str, CircuitBreaker] = {}

    def get(self, route: str) -> CircuitBreaker:
        breaker = self._by_route.get(route)
        if breaker is None:
            breaker = CircuitBreaker(route, self.threshold, self.cooldown, self._clock)
            self._by_route[route] = breaker
        return breaker

    def admit(self, route: str) -> Reply | None:
        """None to accept the RCPT, else the reply that refuses it."""
        if self.threshold == 0 or self.get(route).admit():
            return None
        BREAKER_REFUSED.labels(route).inc()
        return BREAKER_OPEN


def init_policy_metrics(route_names: Iterable[str]) -> None:
    for route in route_names:
        BREAKER_STATE.labels(route).set(0)
        BREAKER_REFUSED.labels(route)
        BREAKER_OPENED.labels(route)
        RETRY_AFTER.labels(route)
