"""Recipient verification at RCPT (SPEC 7), the verifier alone: the status map at RCPT,
verify_on_error, the cache (TTLs, max-age, LRU bound, errors never kept), single-flight, the
signed request, the metrics. Against httpx.MockTransport or a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from standardwebhooks import Webhook
from webhook_server import WebhookServer

from bridge.base.route import Route
from bridge.config import ConfigError, load_settings, redacted_dump
from bridge.config.routes import build_router
from bridge.delivery.verify import (
    MAX_AGE_CAP,
    UNVERIFIED,
    VERIFIED,
    Verifier,
    VerifyCache,
    cache_seconds,
    init_verify_metrics,
)
from bridge.lmtp.events import Reply
from bridge.webhook.client import WebhookClient

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
RCPT = "bob@example.net"
SENDER = "alice@example.org"

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def route(
    name: str = "verified",
    *,
    on_error: str = "accept",
    timeout: float = 5.0,
    url: str = "http://verify.test/verify",
    status_map: Mapping[str, str] | None = None,
    secrets: tuple[str, ...] = (),
) -> Route:
    return Route(
        name=name,
        url="http://deliver.test/hook",
        secrets=secrets,
        verify_url=url,
        verify_timeout=timeout,
        verify_on_error=on_error,
        status_map=status_map or {},
    )


class Mock:
    """A verify webhook behind httpx.MockTransport: answers with ``handler``, counts requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.handler(request)
        if not isinstance(answer, httpx.Response):
            answer = await answer
        return answer


def answering(status: int, body: str = "", headers: Mapping[str, str] | None = None) -> Mock:
    return Mock(lambda request: response(status, body, headers))


def response(
    status: int, body: str = "", headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """An answer the client can stream (as from a socket), unlike one made with ``text=``."""
    return httpx.Response(
        status, headers=dict(headers or {}), stream=httpx.ByteStream(body.encode())
    )


def verifier_for(mock: Mock, clock: FakeClock | None = None, **options: float) -> Verifier:
    client = WebhookClient(transport=httpx.MockTransport(mock))
    return Verifier(client, clock=clock or FakeClock(), **options)  # type: ignore[arg-type]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- the status map at RCPT -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, (250, "2.1.5")),
        (204, (250, "2.1.5")),
        (404, (550, "5.1.1")),
        (410, (550, "5.1.1")),
        (400, (554, "5.6.0")),
        (413, (552, "5.3.4")),
        (422, (554, "5.6.0")),
        (418, (554, "5.0.0")),
    ],
)
async def test_definite_answers_map_like_section_4(status: int, expected: tuple[int, str]) -> None:
    for on_error in ("accept", "defer"):
        verifier = verifier_for(answering(status, "no mailbox called bob"))
        reply = await verifier.verify(route(on_error=on_error), RCPT, SENDER)
        assert (reply.code, reply.status) == expected
        if not reply.is_success:
            assert f"HTTP {status}: no mailbox called bob" in str(reply.text)


@pytest.mark.parametrize(
    ("status", "deferred"),
    [
        (302, (451, "4.3.0")),
        (401, (451, "4.7.0")),
        (403, (451, "4.7.0")),
        (407, (451, "4.7.0")),
        (408, (451, "4.3.0")),
        (425, (451, "4.3.0")),
        (429, (451, "4.3.0")),
        (500, (451, "4.3.0")),
        (503, (451, "4.3.0")),
        (507, (452, "4.2.2")),
    ],
)
async def test_the_451_452_rows_follow_verify_on_error(
    status: int, deferred: tuple[int, str]
) -> None:
    mock = answering(status)
    accepted = await verifier_for(mock).verify(route(on_error="accept"), RCPT, SENDER)
    assert accepted == UNVERIFIED
    assert len(mock.requests) == 1  # never retried in the session (the route allows 2 retries)
    reply = await verifier_for(answering(status)).verify(route(on_error="defer"), RCPT, SENDER)
    assert (reply.code, reply.status) == deferred


async def test_transport_errors_and_timeouts_follow_verify_on_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    for handler, deferred in ((refuse, (451, "4.4.1")), (hang, (451, "4.4.2"))):
        accepted = await verifier_for(Mock(handler)).verify(
            route(on_error="accept", timeout=0.2), RCPT, SENDER
        )
        assert accepted == UNVERIFIED
        with trio.fail_after(5):  # verify_timeout bounds it, not the test
            reply = await verifier_for(Mock(handler)).verify(
                route(on_error="defer", timeout=0.2), RCPT, SENDER
            )
        assert (reply.code, reply.status) == deferred


async def test_a_bug_in_the_request_follows_verify_on_error() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise ZeroDivisionError

    reply = await verifier_for(Mock(broken)).verify(route(on_error="defer"), RCPT, SENDER)
    assert (reply.code, reply.status) == (451, "4.3.0")
    assert await verifier_for(Mock(broken)).verify(route(), RCPT, SENDER) == UNVERIFIED


async def test_x_lmtp_reply_chooses_the_exact_reply_when_classes_agree() -> None:
    cases = [
        (404, "550 5.1.1 no such mailbox here", Reply(550, "5.1.1", "no such mailbox here")),
        (200, "250 2.1.5 welcome, bob", Reply(250, "2.1.5", "welcome, bob")),
        (200, "550 5.1.1 a 2xx cannot refuse", VERIFIED),  # classes disagree: ignored
        (404, "250 2.1.5 a 4xx cannot accept", Reply(550, "5.1.1")),
        # chosen by the webhook, not an error: refused whatever verify_on_error says
        (404, "450 4.2.1 mailbox busy", Reply(450, "4.2.1", "mailbox busy")),
        (503, "550 5.7.1 not here", Reply(550, "5.7.1", "not here")),
    ]
    for status, header, expected in cases:
        verifier = verifier_for(answering(status, headers={"X-Lmtp-Reply": header}))
        reply = await verifier.verify(route(on_error="accept"), RCPT, SENDER)
        assert (reply.code, reply.status) == (expected.code, expected.status), header
        if expected.text:
            assert reply.text == expected.text


async def test_status_map_of_the_route_applies_at_rcpt() -> None:
    verifier = verifier_for(answering(404))
    reply = await verifier.verify(route(status_map={"404": "550 5.1.2"}), RCPT, SENDER)
    assert (reply.code, reply.status) == (550, "5.1.2")


# ---- the request -------------------------------------------------------------------------------


async def test_request_is_signed_like_deliveries_and_has_a_fresh_id_each_time(
    webhook_server: WebhookServer,
) -> None:
    webhook_server.behave("*", status=404)  # refusals are cached only 60 s: clock moves past
    clock = FakeClock()
    async with WebhookClient() as client:
        verifier = Verifier(client, clock=clock)
        hook = route(url=webhook_server.base_url + "/verify", secrets=(SECRET,))
        for _ in range(2):
            await verifier.verify(hook, "bøb@Example.NET", "")
            clock.now += 61
    first, second = webhook_server.requests
    for request in (first, second):
        assert request.method == "POST" and request.path == "/verify"
        assert request.headers["content-type"] == "application/json"
        payload = Webhook(SECRET).verify(request.body, dict(request.headers))
        assert payload == {
            "type": "recipient.verify",
            "rcpt": "bøb@Example.NET",
            "mail_from": "",
            "route": "verified",
        }
        assert request.headers["user-agent"].startswith("lmtp-bridge/")
    assert first.headers["webhook-id"] != second.headers["webhook-id"]
    assert first.headers["webhook-id"].startswith("vrfy_")


async def test_url_placeholders_and_route_headers() -> None:
    mock = answering(200)
    hook = Route(
        name="r",
        url="http://deliver.test/",
        headers={"Authorization": "Bearer t0ken"},
        verify_url="http://verify.test/users/{domain}/{user}",
    )
    await verifier_for(mock).verify(hook, "bob+news@Example.net", SENDER)
    (request,) = mock.requests
    assert request.url.path == "/users/example.net/bob"
    assert request.headers["authorization"] == "Bearer t0ken"
    assert "webhook-signature" not in request.headers  # no secret, no signature
    assert json.loads(request.content)["rcpt"] == "bob+news@Example.net"


# ---- the cache ---------------------------------------------------------------------------------


async def test_positive_answers_are_kept_for_verify_cache_ttl() -> None:
    clock, mock = FakeClock(), answering(200)
    verifier = verifier_for(mock, clock, cache_ttl=300)
    hook = route()
    assert await verifier.verify(hook, RCPT, SENDER) == VERIFIED
    clock.now += 299
    assert verifier.lookup(hook, RCPT) == VERIFIED
    assert verifier.lookup(hook, "Bob@example.net") is None  # local parts are exact ...
    assert verifier.lookup(hook, "bob@EXAMPLE.net") == VERIFIED  # ... domains are not
    assert verifier.lookup(route("other"), RCPT) is None  # per route
    clock.now += 1
    assert verifier.lookup(hook, RCPT) is None
    await verifier.verify(hook, RCPT, SENDER)
    assert len(mock.requests) == 2  # lookups never ask


async def test_refusals_are_kept_for_verify_negative_ttl() -> None:
    clock, mock = FakeClock(), answering(404)
    verifier = verifier_for(mock, clock, cache_ttl=300, negative_ttl=60)
    hook = route()
    refused = await verifier.verify(hook, RCPT, SENDER)
    assert refused.code == 550
    clock.now += 59
    assert await verifier.verify(hook, RCPT, SENDER) == refused
    assert len(mock.requests) == 1
    clock.now += 1
    assert verifier.lookup(hook, RCPT) is None


@pytest.mark.parametrize(
    ("status", "cache_control", "kept"),
    [
        (200, "max-age=10", 10),
        (200, "public, max-age=3600", 3600),
        (404, "max-age=5", 5),
        (404, 'private, max-age="120"', 120),
        (200, "max-age=0", 0),
        (200, "no-store", 0),
        (404, "no-cache, max-age=100", 0),
        (200, "max-age=999999999999", MAX_AGE_CAP),
        (200, "must-revalidate", 300),  # no max-age: the setting's TTL
    ],
)
async def test_cache_control_max_age_overrides_the_ttl(
    status: int, cache_control: str, kept: int
) -> None:
    clock = FakeClock()
    verifier = verifier_for(answering(status, headers={"Cache-Control": cache_control}), clock)
    hook = route()
    first = await verifier.verify(hook, RCPT, SENDER)
    if kept:
        clock.now += kept - 0.5
        assert verifier.lookup(hook, RCPT) == first
    clock.now += 1
    assert verifier.lookup(hook, RCPT) is None


def test_cache_seconds_parsing() -> None:
    assert cache_seconds(None, 7) == 7
    assert cache_seconds("", 7) == 7
    assert cache_seconds("s-maxage=5", 7) == 7  # shared caches only: not ours
    assert cache_seconds("MAX-AGE=42", 7) == 42
    assert cache_seconds("max-age=-1", 7) == 7  # not a number of seconds: ignored


@given(
    st.text(
        alphabet=st.sampled_from('max-age=0123456789 ,"\tno-storecahpiv\x00\u00e9'), max_size=60
    )
)
def test_any_cache_control_gives_a_bounded_ttl(value: str) -> None:
    seconds = cache_seconds(value, 7.0)
    assert seconds == 7.0 or 0 <= seconds <= MAX_AGE_CAP


async def test_what_follows_verify_on_error_is_never_cached() -> None:
    for on_error in ("accept", "defer"):
        clock = FakeClock()
        mock = answering(503, headers={"Cache-Control": "max-age=600"})
        verifier = verifier_for(mock, clock)
        hook = route(on_error=on_error)
        await verifier.verify(hook, RCPT, SENDER)
        assert verifier.lookup(hook, RCPT) is None
        await verifier.verify(hook, RCPT, SENDER)
        assert len(mock.requests) == 2
        assert len(verifier.cache) == 0


async def test_an_error_replaces_nothing_but_a_refresh_does() -> None:
    clock = FakeClock()
    answers = iter([response(200), response(404)])
    mock = Mock(lambda request: next(answers))
    verifier = verifier_for(mock, clock, cache_ttl=10)
    hook = route()
    assert (await verifier.verify(hook, RCPT, SENDER)).code == 250
    clock.now += 11
    assert (await verifier.verify(hook, RCPT, SENDER)).code == 550  # expired: asked again
    assert (await verifier.verify(hook, RCPT, SENDER)).code == 550  # from the cache
    assert len(mock.requests) == 2


def test_lru_bound() -> None:
    clock = FakeClock()
    cache = VerifyCache(3, clock)
    for name in "abc":
        cache.put(("r", name), VERIFIED, 100)
    assert cache.get(("r", "a")) == VERIFIED  # a is now the most recently used
    cache.put(("r", "d"), VERIFIED, 100)
    assert len(cache) == 3
    assert cache.get(("r", "b")) is None  # the least recently used went
    assert all(cache.get(("r", name)) == VERIFIED for name in "acd")
    empty = VerifyCache(0, clock)
    empty.put(("r", "a"), VERIFIED, 100)
    assert len(empty) == 0


async def test_cache_size_bounds_the_verifier() -> None:
    verifier = verifier_for(answering(200), cache_size=50)
    hook = route()
    for i in range(200):
        await verifier.verify(hook, f"user{i}@example.net", SENDER)
    assert len(verifier.cache) == 50
    assert verifier.lookup(hook, "user199@example.net") == VERIFIED
    assert verifier.lookup(hook, "user0@example.net") is None


# ---- single-flight -----------------------------------------------------------------------------


async def test_concurrent_rcpts_for_one_recipient_share_one_request() -> None:
    release = trio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return response(404, "gone")

    mock = Mock(slow)
    verifier = verifier_for(mock)
    hook = route()
    replies: list[Reply] = []

    async def rcpt(address: str) -> None:
        replies.append(await verifier.verify(hook, address, SENDER))

    async with trio.open_nursery() as nursery:
        for address in (RCPT, RCPT, "bob@EXAMPLE.NET", RCPT, "carol@example.net"):
            nursery.start_soon(rcpt, address)
        await trio.testing.wait_all_tasks_blocked()
        assert len(mock.requests) == 2  # bob (three spellings of one recipient) and carol
        release.set()
    assert len(replies) == 5 and all(r.code == 550 for r in replies)
    assert len(mock.requests) == 2


async def test_a_cancelled_leader_does_not_strand_the_others() -> None:
    calls = 0

    async def first_hangs(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()
        return response(200)

    verifier = verifier_for(Mock(first_hangs))
    hook = route()
    got: list[Reply] = []
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await verifier.verify(hook, RCPT, SENDER)

    async def follower() -> None:
        got.append(await verifier.verify(hook, RCPT, SENDER))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()  # the leader's session went away
    assert got == [VERIFIED]
    assert calls == 2


# ---- metrics -----------------------------------------------------------------------------------


async def test_metrics() -> None:
    hook = route("metered")
    init_verify_metrics([hook, Route(name="plain", url="http://x.test/")])
    assert (
        REGISTRY.get_sample_value(
            "lmtp_bridge_verify_requests_total", {"route": "metered", "result": "error"}
        )
        == 0.0
    )
    assert (
        REGISTRY.get_sample_value(
            "lmtp_bridge_verify_cache_total", {"route": "metered", "hit": "true"}
        )
        == 0.0
    )
    assert (
        REGISTRY.get_sample_value(
            "lmtp_bridge_verify_cache_total", {"route": "plain", "hit": "true"}
        )
        is None
    )  # a route that does not verify has no series

    def before(result: str) -> float:
        return counter("lmtp_bridge_verify_requests_total", route="metered", result=result)

    start = {r: before(r) for r in ("accepted", "refused", "error")}
    hits = counter("lmtp_bridge_verify_cache_total", route="metered", hit="true")
    misses = counter("lmtp_bridge_verify_cache_total", route="metered", hit="false")
    statuses = iter([200, 404, 503])
    verifier = verifier_for(Mock(lambda request: response(next(statuses))))
    for address in ("a@x.test", "b@x.test", "c@x.test", "a@x.test", "b@x.test"):
        await verifier.verify(hook, address, SENDER)
    assert {r: before(r) - start[r] for r in start} == {"accepted": 1, "refused": 1, "error": 1}
    assert counter("lmtp_bridge_verify_cache_total", route="metered", hit="true") - hits == 2
    assert counter("lmtp_bridge_verify_cache_total", route="metered", hit="false") - misses == 3


# ---- settings ----------------------------------------------------------------------------------


def test_settings_reach_the_routes_and_a_route_without_its_own_uses_the_global_ones() -> None:
    settings = load_settings(
        overrides={
            "webhook_url": "http://hooks.test/in",
            "routes": [
                {"name": "own", "match": "@own.test", "verify_url": "http://own.test/v",
                 "verify_timeout": 2, "verify_on_error": "DEFER"},
                {"name": "inherits", "match": "@example.org"},
            ],
        },
        environ={
            "LMTP_BRIDGE_VERIFY_URL": "http://verify.test/v/{domain}",
            "LMTP_BRIDGE_VERIFY_TIMEOUT": "3",
            "LMTP_BRIDGE_VERIFY_CACHE_TTL": "30",
            "LMTP_BRIDGE_VERIFY_NEGATIVE_TTL": "0",
            "LMTP_BRIDGE_VERIFY_CACHE_SIZE": "5",
        },
    )  # fmt: skip
    assert (settings.verify_cache_ttl, settings.verify_negative_ttl) == (30, 0)
    assert settings.verify_cache_size == 5 and settings.verify_on_error == "accept"
    own, inherits, default = build_router(settings).routes
    assert (own.verify_url, own.verify_timeout, own.verify_on_error) == (
        "http://own.test/v",
        2,
        "defer",
    )
    for route in (inherits, default):
        assert route.verify_url == "http://verify.test/v/{domain}"
        assert (route.verify_timeout, route.verify_on_error) == (3, "accept")


def test_defaults_ask_nobody() -> None:
    settings = load_settings(overrides={"webhook_url": "http://hooks.test/in"}, environ={})
    assert (settings.verify_timeout, settings.verify_cache_ttl) == (5, 300)
    assert (settings.verify_negative_ttl, settings.verify_cache_size) == (60, 10_000)
    assert all(route.verify_url is None for route in build_router(settings).routes)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"LMTP_BRIDGE_VERIFY_ON_ERROR": "bounce"}, "verify_on_error"),
        ({"LMTP_BRIDGE_VERIFY_TIMEOUT": "0"}, "verify_timeout"),
        ({"LMTP_BRIDGE_VERIFY_TIMEOUT": "61"}, "verify_timeout"),
        ({"LMTP_BRIDGE_VERIFY_URL": "ftp://x.test/"}, "verify_url"),
        ({"LMTP_BRIDGE_VERIFY_URL": "http://{domain}.test/"}, "verify_url"),
        ({"LMTP_BRIDGE_VERIFY_CACHE_SIZE": "-1"}, "verify_cache_size"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(overrides={"webhook_url": "http://hooks.test/in"}, environ=env)
    assert any(line.startswith(problem) for line in raised.value.problems), raised.value.problems


def test_check_config_redacts_credentials_in_verify_urls() -> None:
    settings = load_settings(
        overrides={
            "webhook_url": "http://hooks.test/in",
            "verify_url": "https://u:pa55word@verify.test/v?token=t0k3n",
            "routes": [{"name": "r", "match": "@x.test",
                        "verify_url": "https://verify.test/r?api_key=k3y&team=ops"}],
        },
        environ={},
    )  # fmt: skip
    text = json.dumps(redacted_dump(settings))
    for secret in ("pa55word", "t0k3n", "k3y"):
        assert secret not in text
    assert "verify.test/r?" in text
