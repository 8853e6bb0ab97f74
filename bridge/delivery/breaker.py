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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client import Counter, Gauge

from bridge.lmtp.events import Reply
from bridge.ops.logs import log_event
from bridge.ops.metrics import RETRY_AFTER

log = logging.getLogger("bridge.delivery.breaker")

BREAKER_OPEN = Reply(451, "4.3.0", "Webhook unavailable, try again later")
MAX_WINDOW_ENTRIES = 10_000  # failing recipients kept per route: bounded at any rate

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


class Judgement(NamedTuple):
    """One delivery, as the breaker sees it."""

    failed: bool
    http_status: int | None = None
    error: str | None = None  # timeout, dns, refused, connect, reset, tls, protocol
    recipient: str | None = None  # set for an HTTP 5xx/429: counted once per recipient

    @property
    def why(self) -> str:
        """For the transition's log line: "HTTP 503", "connect"."""
        return f"HTTP {self.http_status}" if self.http_status is not None else str(self.error)


_ANSWERED: dict[int, Judgement] = {}  # the successes, made once per status


def judge(http_status: int | None, error: str | None, recipient: str) -> Judgement | None:
    """How a delivery's final outcome counts (None: not at all, e.g. a bug of the bridge)."""
    if http_status is not None:
        if http_status >= 500 or http_status == 429:
            return Judgement(True, http_status, None, recipient)
        found = _ANSWERED.get(http_status)
        if found is None:
            found = _ANSWERED[http_status] = Judgement(False, http_status)
        return found
    if error is None or error == "internal":
        return None
    return Judgement(True, None, error)


BUCKETS = 10  # the window is kept as this many slices of counts


class CircuitBreaker:
    """One route's breaker (the rule is in the module docstring).

    The window is ``BUCKETS`` slices of counts (the oldest slice leaves whole, so "the last
    ``window`` seconds" is exact to a tenth of it), and the recipients of 5xx/429 answers with
    the time of their last one, at most ``MAX_WINDOW_ENTRIES``: a success costs an increment.
    """

    def __init__(
        self, route: str, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.route = route
        self.policy = policy
        self._enabled = policy.enabled
        self._clock = clock
        self.state = State.CLOSED
        self._until = 0.0  # open: refuse until; half-open: the next probe is allowed at
        self._width = policy.window / BUCKETS
        self._head = 0  # number of the newest slice: int(time / width)
        self._ok = [0] * BUCKETS
        self._down = [0] * BUCKETS  # transport failures: each counts
        self._failing: dict[str, float] = {}  # 5xx/429: recipient -> last time; once each

    @property
    def failures(self) -> int:
        self._forget_failing(self._clock())
        return sum(self._down) + len(self._failing)

    @property
    def calls(self) -> int:
        return sum(self._ok) + self.failures

    def admit(self) -> bool:
        """May a recipient of this route be accepted at RCPT now?"""
        if self.state is State.CLOSED or not self._enabled:
            return True
        now = self._clock()
        if now < self._until:
            return False
        # Cool-down over (or the last probe never came back): let one probe through.
        if self.state is State.OPEN:
            self._set(State.HALF_OPEN, f"cool-down of {self.policy.cooldown:g} s over: one probe")
        self._until = now + self.policy.cooldown
        return True

    def release(self) -> None:
        """The recipient admitted last will not be delivered (verification refused it): if it
        was the half-open probe, the next RCPT may probe at once instead of after a cool-down."""
        if self.state is State.HALF_OPEN:
            self._until = self._clock()

    def record(self, judgement: Judgement) -> None:
        """A delivery of this route ended."""
        if not self._enabled:
            return
        if self.state is not State.CLOSED:
            self._decide(judgement)
            return
        now = self._clock()
        slot = self._advance(now)
        if not judgement.failed:
            self._ok[slot] += 1
            return
        if judgement.recipient is None:
            self._down[slot] += 1
        else:
            self._failing.pop(judgement.recipient, None)  # kept in order of last failure
            self._failing[judgement.recipient] = now
            if len(self._failing) > MAX_WINDOW_ENTRIES:
                del self._failing[next(iter(self._failing))]
        failures = self.failures
        calls = sum(self._ok) + failures
        if calls >= self.policy.min_calls and failures >= self.policy.failure_ratio * calls:
            self._open(
                f"{failures} of {calls} deliveries in {self.policy.window:g} s failed at the "
                f"endpoint (last: {judgement.why})"
            )

    def _decide(self, judgement: Judgement) -> None:
        if self.state is State.OPEN:
            return  # a delivery that began before it opened: the cool-down stands
        if judgement.failed:  # half-open: the first outcome decides
            self._open(f"probe failed: {judgement.why}")
        else:
            self._reset()
            self._set(State.CLOSED, f"probe answered: {judgement.why}")

    def _advance(self, now: float) -> int:
        """Move the window to ``now``; the slot of ``now``."""
        head = int(now // self._width)
        if head != self._head:
            for step in range(1, min(head - self._head, BUCKETS) + 1):
                slot = (self._head + step) % BUCKETS
                self._ok[slot] = self._down[slot] = 0
            self._head = head
        return head % BUCKETS

    def _forget_failing(self, now: float) -> None:
        horizon = now - self.policy.window
        failing = self._failing
        while failing:
            oldest = next(iter(failing))
            if failing[oldest] > horizon:
                break
            del failing[oldest]

    def _reset(self) -> None:
        self._ok = [0] * BUCKETS
        self._down = [0] * BUCKETS
        self._failing.clear()

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

    def release(self, route: str) -> None:
        if self.policy.enabled:
            self.get(route).release()

    def record(self, route: str, judgement: Judgement | None) -> None:
        if judgement is not None and self.policy.enabled:
            self.get(route).record(judgement)


def init_policy_metrics(route_names: Iterable[str]) -> None:
    for route in route_names:
        BREAKER_STATE.labels(route).set(0)
        BREAKER_REFUSED.labels(route)
        BREAKER_OPENED.labels(route)
        RETRY_AFTER.labels(route)
