"""Recipient verification at RCPT (SPEC 7): ask the route's ``verify_url`` whether a recipient
exists, cache the answer per (route, recipient), and share one request among concurrent asks."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from prometheus_client import Counter

from bridge.base.route import Route, template_values
from bridge.lmtp.events import Reply
from bridge.ops.logs import log_event
from bridge.ops.metrics import VERIFY_CACHE, VERIFY_REQUESTS, child
from bridge.webhook.client import (
    Answer,
    RedirectRefused,
    WebhookClient,
    WebhookRequest,
    classify_transport_error,
    map_response,
    map_transport_error,
    parse_reply,
)
from bridge.webhook.signing import Signer

log = logging.getLogger("bridge.delivery.verify")

VERIFIED = Reply(250, "2.1.5", "Recipient OK (verified)")
UNVERIFIED = Reply(250, "2.1.5", "Recipient OK (not verified: the verify webhook failed)")
VERIFY_RESULTS = ("accepted", "refused", "error")
# Cache-Control: max-age beyond this is cut to it (a day): an answer is never kept for ever.
MAX_AGE_CAP = 86400
_ID_PREFIX = "vrfy_"
_MAX_AGE = re.compile(r"(?:^|[\s,])max-age[ \t]*=[ \t]*\"?([0-9]{1,12})\"?", re.IGNORECASE)
_NO_STORE = re.compile(r"(?:^|[\s,])no-(?:store|cache)\b", re.IGNORECASE)

CacheKey = tuple[str, str]  # (route name, recipient with its domain in lower case)


def cache_seconds(cache_control: str | None, default: float) -> float:
    """How long an answer may be kept: ``max-age=N`` (at most MAX_AGE_CAP), 0 for
    ``no-store`` / ``no-cache``, else ``default``."""
    if not cache_control:
        return default
    if _NO_STORE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return default
    return float(min(int(match.group(1)), MAX_AGE_CAP))


class VerifyCache:
    """Answers by (route, recipient), each until its own expiry; at most ``size`` of them,
    the least recently used going first. ``size`` 0 keeps nothing."""

    __slots__ = ("_clock", "_entries", "size")

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, Reply]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> Reply | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: CacheKey, reply: Reply, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            self._entries.pop(key, None)  # an older answer must not outlive this one
            return
        self._entries[key] = (self._clock() + ttl, reply)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@dataclass(slots=True)
class _Flight:
    """One verify request in progress; RCPTs for the same recipient wait for its answer."""

    done: trio.Event
    reply: Reply | None = None  # None when the asking session went away before the answer


class Verifier:
    """Decides RCPTs of routes with a ``verify_url``: from the cache, or by asking it."""

    def __init__(
        self,
        client: WebhookClient,
        *,
        cache_ttl: float = 300.0,
        negative_ttl: float = 60.0,
        cache_size: int = 10_000,
        delimiter: str = "+",
        log_addresses: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.cache = VerifyCache(cache_size, clock)
        self._delimiter = delimiter
        self._log_addresses = log_addresses
        self._flights: dict[CacheKey, _Flight] = {}
        self._signers: dict[tuple[str, ...], Signer] = {}
        self._hits: dict[str, Counter] = {}  # route name -> its cache-hit counter

    def lookup(self, route: Route, rcpt: str) -> Reply | None:
        """The cached RCPT reply for ``rcpt`` of ``route``, or None: ``ask()`` then."""
        reply = self.cache.get(cache_key(route, rcpt))
        if reply is not None:
            hits = self._hits.get(route.name)
            if hits is None:
                hits = self._hits[route.name] = VERIFY_CACHE.labels(route.name, "true")
            hits.inc()
            if not reply.is_success:
                self._log(logging.INFO, route, rcpt, reply, cached=True)
        return reply

    async def ask(self, route: Route, rcpt: str, mail_from: str) -> Reply:
        """The RCPT reply after asking the route's verify_url (one request for every RCPT of
        the same recipient meanwhile). A 2xx reply accepts, anything else refuses."""
        child(VERIFY_CACHE, route.name, "false").inc()
        key = cache_key(route, rcpt)
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.reply is not None:
                return flight.reply
            # the asking session went away (cancelled) before the answer: ask again
        flight = self._flights[key] = _Flight(trio.Event())
        try:
            flight.reply = await self._request(route, rcpt, mail_from, key)
            return flight.reply
        finally:
            del self._flights[key]
            flight.done.set()

    async def verify(self, route: Route, rcpt: str, mail_from: str) -> Reply:
        """``lookup()``, else ``ask()``."""
        return self.lookup(route, rcpt) or await self.ask(route, rcpt, mail_from)

    # ---- one request

    async def _request(self, route: Route, rcpt: str, mail_from: str, key: CacheKey) -> Reply:
        assert route.verify_url is not None
        started = time.monotonic()
        request = self._build(route, rcpt, mail_from)
        failure: Exception
        try:
            with trio.move_on_after(route.verify_timeout):
                answer = await self._client.post_once(route, request, route.verify_timeout)
                return self._answered(route, rcpt, key, answer, started)
            failure = httpx.TimeoutException("no answer within verify_timeout")
        except RedirectRefused as exc:
            failure = httpx.RemoteProtocolError(f"redirect not followed: {exc}")
        except Exception as exc:
            failure = exc
            if classify_transport_error(exc) == "internal":
                log.exception("verify request failed unexpectedly", extra={"route": route.name})
        reply = map_transport_error(failure, route.status_map)
        return self._failed(route, rcpt, reply, None, classify_transport_error(failure), started)

    def _build(self, route: Route, rcpt: str, mail_from: str) -> WebhookRequest:
        assert route.verify_url is not None
        body = _body({"type": "recipient.verify", "rcpt": rcpt, "mail_from": mail_from,
                      "route": route.name})  # fmt: skip
        # unique per request: a receiver that deduplicates by webhook-id must not drop a
        # second question about the same recipient
        request_id = _ID_PREFIX + base64.b32encode(os.urandom(20)).decode("ascii").lower()
        headers = [
            ("Content-Type", "application/json"),
            *self._signer(route).headers(request_id, body),
            *route.headers.items(),
        ]
        url = route.verify_url
        if "{" in url:
            url = url.format_map(template_values(rcpt, self._delimiter))
        return WebhookRequest(url, headers, lambda: (body,), len(body), in_memory=True)

    def _answered(
        self, route: Route, rcpt: str, key: CacheKey, answer: Answer, started: float
    ) -> Reply:
        status = answer.status
        chosen = parse_reply(answer.reply_header) if answer.reply_header is not None else None
        if 200 <= status < 300:
            reply = VERIFIED
            if chosen is not None and chosen.is_success:
                reply = Reply(chosen.code, chosen.status, chosen.text or VERIFIED.text)
            ttl = cache_seconds(answer.cache_control, self.cache_ttl)
            result = "accepted"
        else:
            reply = map_response(status, answer.body_start, answer.reply_header, route.status_map)
            deliberate = chosen is not None and not chosen.is_success  # X-Lmtp-Reply chose it
            if reply.is_transient and not deliberate:  # SPEC 4's 451/452 rows
                return self._failed(route, rcpt, reply, status, "http", started)
            ttl = cache_seconds(answer.cache_control, self.negative_ttl)
            result = "refused"
        self.cache.put(key, reply, ttl)
        child(VERIFY_REQUESTS, route.name, result).inc()
        level = logging.DEBUG if reply.is_success else logging.INFO
        self._log(
            level, route, rcpt, reply, http_status=status, duration=time.monotonic() - started
        )
        return reply

    def _failed(
        self,
        route: Route,
        rcpt: str,
        reply: Reply,
        status: int | None,
        error: str,
        started: float,
    ) -> Reply:
        """No usable answer: ``verify_on_error`` decides, and nothing is cached."""
        child(VERIFY_REQUESTS, route.name, "error").inc()
        if route.verify_on_error == "accept":
            decided = UNVERIFIED
        else:  # the MTA's log names what failed
            decided = Reply(
                reply.code, reply.status, f"recipient verification failed: {reply.text}"
            )
        self._log(
            logging.WARNING,
            route,
            rcpt,
            decided,
            http_status=status,
            error=error,
            failure=str(reply),
            duration=time.monotonic() - started,
        )
        return decided

    def _signer(self, route: Route) -> Signer:
        signer = self._signers.get(route.secrets)
        if signer is None:
            signer = self._signers[route.secrets] = Signer(route.secrets)
        return signer

    def _log(
        self,
        level: int,
        route: Route,
        rcpt: str,
        reply: Reply,
        *,
        cached: bool = False,
        duration: float | None = None,
        **fields: object,
    ) -> None:
        if not log.isEnabledFor(level):
            return
        outcome = "accepted" if reply.is_success else "refused"
        extra: dict[str, Any] = {"route": route.name, "stage": "rcpt", "reply": str(reply)}
        extra.update(fields)
        extra["cached"] = cached
        if duration is not None:
            extra["duration"] = round(duration, 4)
        if self._log_addresses or log.isEnabledFor(logging.DEBUG):
            extra["rcpt_to"] = rcpt
        log_event(log, level, f"recipient verification: {outcome}", **extra)


def cache_key(route: Route, rcpt: str) -> CacheKey:
    """(route name, the address with its domain in lower case): one entry per mailbox."""
    local, at, domain = rcpt.rpartition("@")
    if not at:
        return route.name, rcpt
    lowered = domain.lower()
    return route.name, rcpt if lowered == domain else f"{local}@{lowered}"


def _body(obj: dict[str, str]) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (an address that was not UTF-8)
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def init_verify_metrics(routes: Iterable[Route]) -> None:
    """Zeros for every route that verifies, so dashboards see them before the first RCPT."""
    for route in routes:
        if route.verify_url is None:
            continue
        for result in VERIFY_RESULTS:
            VERIFY_REQUESTS.labels(route.name, result)
        for hit in ("true", "false"):
            VERIFY_CACHE.labels(route.name, hit)
