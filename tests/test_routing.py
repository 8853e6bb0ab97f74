"""Recipient -> route: each pattern kind, order, case rules, defaults and per-route settings."""

from __future__ import annotations

import base64
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.base.route import Route
from bridge.config import Settings
from bridge.config.routes import build_router
from bridge.delivery.routing import Router, compile_match

URL = "http://127.0.0.1:8080/default"
SECRET = "whsec_" + base64.b64encode(b"global-key-material-0123456789ab").decode()
ROUTE_SECRET = "whsec_" + base64.b64encode(b"route-key-material-0123456789abc").decode()


def route(name: str) -> Route:
    return Route(name=name, url=f"http://127.0.0.1:8080/{name}")


DEFAULT = route("default")


def name_for(router: Router, address: str) -> str | None:
    found = router.route_for(address)
    return None if found is None else found.name


def test_exact_address() -> None:
    router = Router([("bob@example.org", route("bob"))], None)
    assert name_for(router, "bob@example.org") == "bob"
    assert name_for(router, "bob@example.org.evil") is None
    assert name_for(router, "bobby@example.org") is None
    assert name_for(router, "alice@example.org") is None


def test_at_domain_means_exactly_that_domain() -> None:
    router = Router([("@example.org", route("org"))], None)
    assert name_for(router, "anyone@example.org") == "org"
    assert name_for(router, "x@sub.example.org") is None
    assert name_for(router, "x@notexample.org") is None


def test_glob_on_the_whole_address() -> None:
    router = Router(
        [("*@*.example.org", route("subs")), ("support-?@example.org", route("s"))], None
    )
    assert name_for(router, "a@mx.example.org") == "subs"
    assert name_for(router, "a@deep.mx.example.org") == "subs"
    assert name_for(router, "a@example.org") is None
    assert name_for(router, "support-1@example.org") == "s"
    assert name_for(router, "support-12@example.org") is None


def test_at_glob_matches_the_domain_only() -> None:
    router = Router([("@*.example.org", route("subs"))], None)
    assert name_for(router, "who@lists.example.org") == "subs"
    assert name_for(router, "who@example.org") is None


def test_regex_must_match_the_whole_address() -> None:
    router = Router([(r"re:(alice|bob)\+[a-z]+@example\.org", route("tagged"))], None)
    assert name_for(router, "bob+news@example.org") == "tagged"
    assert name_for(router, "bob+news@example.org.evil") is None
    assert name_for(router, "xbob+news@example.org") is None


def test_first_match_wins() -> None:
    router = Router(
        [
            ("bob@example.org", route("bob")),
            ("@example.org", route("domain")),
            ("re:.*", route("everything")),
        ],
        DEFAULT,
    )
    assert name_for(router, "bob@example.org") == "bob"
    assert name_for(router, "carol@example.org") == "domain"
    assert name_for(router, "carol@example.net") == "everything"


def test_domain_is_case_insensitive_local_part_is_not() -> None:
    router = Router(
        [
            ("Bob@Example.ORG", route("bob")),
            ("@LISTS.example.org", route("lists")),
            ("*@*.Example.Net", route("net")),
            (r"re:[a-z]+@example\.com", route("re")),
        ],
        None,
    )
    assert name_for(router, "Bob@example.org") == "bob"
    assert name_for(router, "Bob@EXAMPLE.org") == "bob"
    assert name_for(router, "bob@example.org") is None  # the local part may be case-sensitive
    assert name_for(router, "any@Lists.Example.Org") == "lists"
    assert name_for(router, "x@MX.EXAMPLE.NET") == "net"
    assert name_for(router, "abc@EXAMPLE.COM") == "re"  # a regex sees the domain lower-cased


def test_utf8_and_quoted_local_parts() -> None:
    router = Router(
        [
            ('"john@doe"@example.org', route("quoted")),
            ("@bücher.example", route("idn")),
            ("jörg@*", route("jorg")),
        ],
        None,
    )
    assert name_for(router, '"john@doe"@EXAMPLE.org') == "quoted"
    assert name_for(router, "käthe@BÜCHER.example") == "idn"
    assert name_for(router, "jörg@anywhere.example") == "jorg"


def test_default_route_when_nothing_matches() -> None:
    router = Router([("@example.org", route("org"))], DEFAULT)
    assert router.route_for("x@example.net") is DEFAULT
    assert router.routes == (route("org"), DEFAULT)


def test_none_without_a_default() -> None:
    router = Router([("@example.org", route("org"))], None)
    assert router.route_for("x@example.net") is None
    assert Router([], None).route_for("x@example.org") is None


@pytest.mark.parametrize("pattern", ["", "  ", "re:", "re:(", "@", "bob@"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_match(pattern)
    with pytest.raises(ValueError):
        Router([(pattern, route("r"))], None)


ODD_ADDRESSES = [
    "",
    "@",
    "@@",
    "a@",
    "@example.org",
    "postmaster",
    "<bob@example.org>",
    '"quoted \\" and @"@example.org',
    "\udcff\udcfe@example.org",  # undecodable bytes kept by surrogateescape
    "a" * 10_000 + "@example.org",
    "x@[192.0.2.1]",
    "x@\x00",
]


@pytest.mark.parametrize("address", ODD_ADDRESSES)
def test_odd_addresses_do_not_raise(address: str) -> None:
    router = Router(
        [
            ("bob@example.org", route("a")),
            ("@example.org", route("b")),
            ("*@*.example.org", route("c")),
            ("@*.example.net", route("d")),
            (r"re:[^@]+@example\.com", route("e")),
        ],
        DEFAULT,
    )
    assert router.route_for(address) in (*router.routes, None)


@given(st.text())
def test_route_for_never_raises(address: str) -> None:
    router = Router(
        [("x@y", route("a")), ("@z", route("b")), ("*@?", route("c")), ("re:.+@w", route("d"))],
        None,
    )
    router.route_for(address)


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_build_router_resolves_routes_over_global_settings() -> None:
    s = settings(
        webhook_url=URL,
        payload="raw",
        webhook_secret=[SECRET],
        webhook_headers={"Authorization": "Bearer global", "X-Env": "prod"},
        http_timeout=12,
        http_retries=4,
        include_raw=True,
        status_map={"404": "451 4.1.1", "5xx": "452 4.3.0"},
        routes=[
            {
                "name": "own",
                "match": "@own.example",
                "url": "https://own.example/hook",
                "payload": "multipart",
                "secret": ROUTE_SECRET,
                "headers": {"authorization": "Bearer route", "X-Route": "own"},
                "timeout": 2,
                "retries": 0,
                "include_raw": False,
                "status_map": {"404": "550 5.1.1"},
            },
            {"name": "inherit", "match": "@inherit.example"},
            {"name": "unsigned", "match": "@unsigned.example", "secret": ""},
        ],
    )
    router = build_router(s)

    own = router.route_for("a@own.example")
    assert own == Route(
        name="own",
        url="https://own.example/hook",
        payload="multipart",
        secrets=(ROUTE_SECRET,),
        headers={"X-Env": "prod", "authorization": "Bearer route", "X-Route": "own"},
        timeout=2,
        retries=0,
        include_raw=False,
        status_map={"404": "550 5.1.1", "5xx": "452 4.3.0"},
    )

    inherit = router.route_for("a@inherit.example")
    assert inherit == Route(
        name="inherit",
        url=URL,
        payload="raw",
        secrets=(SECRET,),
        headers={"Authorization": "Bearer global", "X-Env": "prod"},
        timeout=12,
        retries=4,
        include_raw=True,
        status_map={"404": "451 4.1.1", "5xx": "452 4.3.0"},
    )

    unsigned = router.route_for("a@unsigned.example")
    assert unsigned is not None and unsigned.secrets == ()

    default = router.route_for("a@elsewhere.example")
    assert default is not None
    assert default.name == "default"
    assert default.url == URL
    assert default.secrets == (SECRET,)
    assert default.timeout == 12


def test_build_router_without_webhook_url_has_no_default() -> None:
    s = settings(routes=[{"name": "only", "match": "@example.org", "url": URL}])
    router = build_router(s)
    assert router.route_for("x@example.org") is not None
    assert router.route_for("x@example.net") is None
    assert [r.name for r in router.routes] == ["only"]


def test_build_router_with_defaults_only() -> None:
    router = build_router(settings(webhook_url=URL))
    found = router.route_for("anyone@anywhere.example")
    assert found == Route(name="default", url=URL)


# --- URL templates and plus-addressing ------------------------------------------------------


def test_url_template_fills_escaped_values() -> None:
    templated = Route(name="t", url="https://hooks.example/in/{domain}/{local}?to={rcpt}&t={tag}")
    assert templated.url_for("Bob+a/b?c@Example.ORG") == (
        "https://hooks.example/in/example.org/Bob%2Ba%2Fb%3Fc?to=Bob%2Ba%2Fb%3Fc%40example.org&t=a%2Fb%3Fc"
    )
    assert templated.url_for("bob@example.org").endswith("&t=")
    assert Route(name="u", url="http://h/{user}").url_for("jörg+x@example.org") == (
        "http://h/j%C3%B6rg"
    )
    plain = Route(name="p", url="http://h/hook?a=1")
    assert plain.url_for("x@example.org") == "http://h/hook?a=1"


TENANT = Route(name="t", url="https://h.example/tenant/{domain}/user/{local}/inbox?tag={tag}")


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("..@example.org", "{local} would be '..'"),  # was POSTed to /tenant/example.org/inbox
        (".@example.org", "{local} would be '.'"),
        ("bob@..", "{domain} would be '..'"),  # was /user/bob/inbox
        ("..@..", "{domain} would be '..'"),  # was /inbox
        ("bob@.", "{domain} would be '.'"),
        ("postmaster", "{domain} would be empty"),  # //: merged by proxies, the rest moves up
        # sent as %2F, split by receivers that decode before routing (Go, nginx locations)
        ("bob@example.org/user/victim", "{domain} would hold a '/' or '\\'"),
        ("a/../../admin@example.org", "{local} would hold a '/' or '\\'"),
        ("a\\b@example.org", "{local} would hold a '/' or '\\'"),
    ],
)
def test_addresses_that_would_move_the_request_are_named(address: str, why: str) -> None:
    assert TENANT.steering_segment(address) == why


@pytest.mark.parametrize(
    "address",
    ["bob@example.org", "a..b@example.org", "bob.@example.org", '".."@example.org',
     "bob+..@example.org", "bob+@example.org", "x@example.org."],
)  # fmt: skip
def test_addresses_that_stay_in_their_segment_pass(address: str) -> None:
    assert TENANT.steering_segment(address) is None


def test_steering_looks_at_whole_segments_and_at_verify_url() -> None:
    # a literal next to the placeholder can make a dot segment too
    assert Route(name="d", url="http://h/in/{local}./x").steering_segment(".@x") == (
        "{local}. would be '..'"
    )
    # an empty last segment moves nothing: /in/example.org/bob/ for an address without a tag
    tagged = Route(name="t", url="http://h/in/{domain}/{user}/{tag}")
    assert tagged.steering_segment("bob@example.org") is None
    assert Route(name="e", url="http://h/in/{tag}/x").steering_segment("bob@x") == (
        "{tag} would be empty"
    )
    verified = Route(name="v", url="http://h/in", verify_url="http://h/users/{user}/x")
    assert verified.steering_segment("..@x") == "{user} would be '..'"
    assert Route(name="q", url="http://h/in?to={local}").steering_segment("..@x") is None


TEMPLATES = (
    "https://h.example/tenant/{domain}/user/{local}/inbox?tag={tag}",
    "https://h.example/in/{user}.{tag}/x",
    "https://h.example/in/{rcpt}",
    "https://h.example/in/{domain}/{user}/{tag}",
)


@given(
    local=st.text(alphabet='ab./\\%+-@"é', max_size=8),
    domain=st.text(alphabet="ab./\\%-", max_size=6),
    bare=st.booleans(),
)
def test_an_accepted_address_keeps_the_shape_of_every_path(
    local: str, domain: str, bare: bool
) -> None:
    """Whatever a receiver does to the path (decode %XX, remove dot segments, merge slashes),
    an address that is not refused leaves each placeholder in its own segment."""
    address = local if bare else f"{local}@{domain}"
    for template in TEMPLATES:
        route = Route(name="p", url=template)
        if route.steering_segment(address) is not None:
            continue
        decoded = urllib.parse.unquote(urllib.parse.urlsplit(route.url_for(address)).path)
        segments = decoded.split("/")
        assert len(segments) == len(urllib.parse.urlsplit(template).path.split("/"))
        assert not {".", ".."} & set(segments), decoded
        # an empty segment only where nothing follows it: merging slashes moves nothing
        assert all(not any(segments[i:]) for i in range(1, len(segments)) if not segments[i])
        assert "\\" not in decoded, decoded


def test_dot_values_are_percent_encoded() -> None:
    # belt and braces: even if such a URL were built, no HTTP stack of ours drops %2E%2E
    assert TENANT.url_for("..@..") == ("https://h.example/tenant/%2E%2E/user/%2E%2E/inbox?tag=")
    assert TENANT.url_for("bob+.@x") == "https://h.example/tenant/x/user/bob%2B./inbox?tag=%2E"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h/{nope}", "unknown placeholder {nope}"),
        ("http://h/{rcpt!r}", "unknown placeholder"),
        ("http://h/{rcpt:>10}", "unknown placeholder"),
        ("http://{domain}/in", "path and query only"),
        ("http://h/a{", "not a placeholder"),
        ("http://h/a}", "not a placeholder"),
    ],
)
def test_bad_url_templates_are_refused_at_start(url: str, problem: str) -> None:
    from bridge.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as raised:
        load_settings(overrides={"webhook_url": url}, environ={})
    assert problem in raised.value.problems[0]
    assert raised.value.problems[0].startswith("webhook_url:")


def test_exact_route_fits_the_address_with_an_extension() -> None:
    router = Router(
        [("bob@example.org", route("bob")), ("re:bob@example\\.org", route("re"))], DEFAULT
    )
    assert name_for(router, "bob+news@example.org") == "bob"
    assert name_for(router, "bob+@example.org") == "bob"
    assert name_for(router, "bobby+news@example.org") == "default"
    assert name_for(router, "+bob@example.org") == "default"  # a leading "+" is no extension
    only_regex = Router([("re:bob@example\\.org", route("re"))], None)
    assert name_for(only_regex, "bob+news@example.org") is None  # a regex sees it all


def test_recipient_delimiter_setting() -> None:
    settings = Settings(
        webhook_url=URL,
        recipient_delimiter="-+",
        routes=[{"name": "bob", "match": "bob@example.org"}],  # type: ignore[list-item]
    )
    router = build_router(settings)
    assert name_for(router, "bob-lists@example.org") == "bob"
    assert name_for(router, "bob+x@example.org") == "bob"
    no_ext = build_router(Settings(webhook_url=URL, recipient_delimiter="", routes=settings.routes))
    assert name_for(no_ext, "bob+x@example.org") == "default"


def test_route_settings_for_policy_and_trace_headers() -> None:
    settings = Settings(
        webhook_url=URL,
        trace_headers=False,
        http_retry_budget=60,
        routes=[
            {"name": "a", "match": "a@example.org", "trace_headers": True},  # type: ignore[list-item]
            {"name": "b", "match": "b@example.org"},  # type: ignore[list-item]
        ],
    )
    router = build_router(settings)
    a, b, default = router.routes
    assert (a.trace_headers, b.trace_headers, default.trace_headers) == (True, False, False)
    assert {r.retry_budget for r in router.routes} == {60}


def test_secrets_and_headers_stay_out_of_route_reprs() -> None:
    secret_route = Route(
        name="s", url=URL, secrets=(SECRET,), headers={"Authorization": "Bearer hunter2"}
    )
    assert SECRET not in repr(secret_route) and "hunter2" not in repr(secret_route)
    assert "name='s'" in repr(secret_route)
