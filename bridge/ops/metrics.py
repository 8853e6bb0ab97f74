"""Every Prometheus metric of the bridge, in one place (names are part of the contract)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from bridge import __version__

RESULTS = ("delivered", "deferred", "rejected")
STAGES = ("rcpt", "data")  # where a recipient's outcome was decided
NO_ROUTE = "none"  # route label of a recipient no route matches (a reserved route name)
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
PROTOCOL_ERROR_KINDS = (
    "syntax",
    "sequence",
    "unknown_command",
    "line_too_long",
    "too_many_recipients",
    "message_too_big",
    "parameter",
    "idle_timeout",
    "too_many_connections",
    "too_many_errors",
    "internal",
)

CONNECTIONS = Counter("lmtp_bridge_connections", "LMTP connections accepted")
# multiprocess_mode: how --workers sums a gauge over live processes (ignored with one process)
CONNECTIONS_ACTIVE = Gauge(
    "lmtp_bridge_connections_active", "LMTP connections open now", multiprocess_mode="livesum"
)
MESSAGES = Counter("lmtp_bridge_messages", "Messages received to the end of data")
MESSAGE_SIZE = Histogram(
    "lmtp_bridge_message_size_bytes",
    "Size of received messages",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
)
MESSAGE_RECIPIENTS = Histogram(
    "lmtp_bridge_message_recipients",
    "Accepted recipients per message",
    buckets=(1, 2, 5, 10, 20, 50, 100, 500, 1000),
)
RECIPIENTS = Counter(
    "lmtp_bridge_recipients",
    "Recipient outcomes, decided at RCPT or after the data",
    ["result", "route", "stage"],
)
REPLIES = Counter("lmtp_bridge_replies", "LMTP replies sent, by 3-digit code", ["code"])
WEBHOOK_REQUESTS = Counter(
    "lmtp_bridge_webhook_requests", "Webhook requests by outcome", ["route", "status_class"]
)
WEBHOOK_DURATION = Histogram(
    "lmtp_bridge_webhook_request_duration_seconds",
    "Duration of one webhook request",
    ["route"],
    # 15 and 20: resolution below the default 30 s timeout, for the "p99 near the timeout" alert
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 60),
)
WEBHOOK_TIMEOUT = Gauge(
    "lmtp_bridge_webhook_timeout_seconds",
    "The route's timeout for one webhook request (what the latency alert compares p99 with)",
    ["route"],
    multiprocess_mode="max",
)
WEBHOOK_IN_FLIGHT = Gauge(
    "lmtp_bridge_webhook_requests_in_flight",
    "Webhook requests waiting for an answer",
    ["route"],
    multiprocess_mode="livesum",
)
WEBHOOK_RETRIES = Counter(
    "lmtp_bridge_webhook_retries", "Webhook requests retried inside the session", ["route"]
)
PROTOCOL_ERRORS = Counter(
    "lmtp_bridge_protocol_errors", "Commands or sessions refused by the protocol", ["kind"]
)
READY = Gauge(
    "lmtp_bridge_ready",
    "1 while the bridge accepts connections, 0 while draining",
    multiprocess_mode="livemin",
)
BUILD_INFO = Gauge(
    "lmtp_bridge_build_info", "Build information", ["version"], multiprocess_mode="max"
)

COMMON_REPLY_CODES = (
    "221",
    "250",
    "252",
    "354",
    "421",
    "451",
    "452",
    "500",
    "501",
    "503",
    "550",
    "552",
    "554",
    "555",
)


_M = TypeVar("_M", Counter, Gauge, Histogram)
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}
MAX_CACHED_CHILDREN = 4096
RETRY_AFTER = Counter(
    "lmtp_bridge_webhook_retry_after",
    "Webhook answers with a Retry-After header (logged and counted, not obeyed)",
    ["route"],
)


def child(metric: _M, *values: str) -> _M:
    """``metric.labels(*values)``, looked up once: the hot paths count every reply and every
    request, and ``labels()`` validates and locks on each call."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        if len(_children) >= MAX_CACHED_CHILDREN:  # label values can come from config: bounded
            _children.clear()
        found = _children[key] = metric.labels(*values)
    return found


def init_metrics(route_names: Iterable[str]) -> None:
    """Pre-initialise every bounded label value so dashboards see zeros, not gaps."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    BUILD_INFO.labels(__version__).set(1)
    for result in RESULTS:
        RECIPIENTS.labels(result, NO_ROUTE, "rcpt")
    for code in COMMON_REPLY_CODES:
        REPLIES.labels(code)
    for kind in PROTOCOL_ERROR_KINDS:
        PROTOCOL_ERRORS.labels(kind)
    for route in route_names:
        for result in RESULTS:
            for stage in STAGES:
                RECIPIENTS.labels(result, route, stage)
        for status_class in STATUS_CLASSES:
            WEBHOOK_REQUESTS.labels(route, status_class)
        WEBHOOK_DURATION.labels(route)
        WEBHOOK_IN_FLIGHT.labels(route)
        WEBHOOK_RETRIES.labels(route)


def result_of(code: int) -> str:
    """The ``result`` label of a recipient answered with reply ``code``."""
    if code < 400:
        return "delivered"
    return "deferred" if code < 500 else "rejected"


def count_recipients(code: int, route: str | None, stage: str, count: int = 1) -> None:
    """Count ``count`` recipient outcomes answered with reply ``code`` (an LMTP 3-digit code).

    ``route`` is the route's name, None for a recipient no route matches; ``stage`` is "rcpt"
    for an outcome decided at RCPT (unknown route, breaker open, verification refused: call it
    only for a refused RCPT, an accepted one is counted when its delivery ends) or "data".
    """
    child(RECIPIENTS, result_of(code), route or NO_ROUTE, stage).inc(count)


def init_route_timeouts(timeouts: Iterable[tuple[str, float]]) -> None:
    """Publish each route's request timeout: (route name, seconds) pairs."""
    for route, seconds in timeouts:
        WEBHOOK_TIMEOUT.labels(route).set(seconds)


def status_class(http_status: int | None) -> str:
    if http_status is None or not 200 <= http_status < 600:
        return "error"
    return f"{http_status // 100}xx"


# Recipient verification at RCPT (SPEC 7); pre-initialised per verifying route by
# bridge.delivery.verify.init_verify_metrics.
VERIFY_REQUESTS = Counter(
    "lmtp_bridge_verify_requests",
    "Recipient verification requests by result: accepted (2xx), refused (a refusing reply), "
    "error (no usable answer: verify_on_error decided)",
    ["route", "result"],
)
VERIFY_CACHE = Counter(
    "lmtp_bridge_verify_cache",
    "RCPTs of verifying routes answered from the verification cache (hit) or not",
    ["route", "hit"],
)
