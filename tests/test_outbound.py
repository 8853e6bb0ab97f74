"""Outbound HTTP against real servers on 127.0.0.1: Retry-After, redirects, TLS verification,
client certificates (mTLS, with trustme's throwaway CA), proxies from the environment, and
secrets kept out of reprs and logs."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from prometheus_client import REGISTRY
from webhook_server import Step, WebhookServer

from bridge.base.route import Route
from bridge.webhook import client as webhook
from bridge.webhook.client import WebhookClient, WebhookRequest

RCPT = "bob@example.org"
SECRET_HEADER = "Bearer s3cr3t-t0ken"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_BASE", 0.01)


def route(url: str, **kwargs: object) -> Route:
    return Route(name=str(kwargs.pop("name", "out")), url=url, timeout=5.0, **kwargs)  # type: ignore[arg-type]


def request(url: str, body: bytes = b'{"hello": "world"}') -> WebhookRequest:
    return WebhookRequest(
        url=url,
        headers=[
            ("Content-Type", "application/json"),
            ("X-Lmtp-Rcpt-To", RCPT),
            ("webhook-id", "msg_test"),
            ("Authorization", SECRET_HEADER),
        ],
        chunks=lambda: iter([body]),
        length=len(body),
        delivery_id="msg_test",
    )


@pytest.fixture
async def client() -> AsyncIterator[WebhookClient]:
    async with WebhookClient() as opened:
        yield opened


@pytest.fixture
async def redirecting_client() -> AsyncIterator[WebhookClient]:
    async with WebhookClient(follow_redirects=True, max_redirects=2) as opened:
        yield opened


@pytest.fixture
def other_server() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server


def sample(name: str, route_name: str) -> float:
    return REGISTRY.get_sample_value(name, {"route": route_name}) or 0.0


# --- Retry-After --------------------------------------------------------------------------


async def test_retry_after_is_logged_and_counted_not_obeyed(
    client: WebhookClient, webhook_server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    webhook_server.behave(RCPT, status=429, body="slow down", headers={"Retry-After": "3600"})
    before = sample("lmtp_bridge_webhook_retry_after_total", "ra")
    with caplog.at_level(logging.INFO, logger="bridge.webhook.client"):
        outcome = await client.deliver(
            route(webhook_server.url, name="ra", retries=1), request(webhook_server.url)
        )
    # the hour is not waited for: the MTA's queue decides when to try again
    assert outcome.attempts == 2 and outcome.duration < 60
    assert str(outcome.reply) == "451 4.3.0 deferred msg_test (HTTP 429): slow down"
    assert sample("lmtp_bridge_webhook_retry_after_total", "ra") - before == 2
    logged = [r for r in caplog.records if "Retry-After" in r.getMessage()]
    assert len(logged) == 2 and logged[0].retry_after == "3600"  # type: ignore[attr-defined]


# --- redirects ------------------------------------------------------------------------------


async def test_redirects_are_not_followed_by_default(
    client: WebhookClient, webhook_server: WebhookServer, other_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, status=307, headers={"Location": other_server.url})
    outcome = await client.deliver(route(webhook_server.url), request(webhook_server.url))
    assert (outcome.reply.code, outcome.reply.status, outcome.http_status) == (451, "4.3.0", 307)
    assert other_server.requests == []


@pytest.mark.parametrize("status", [307, 308])
async def test_307_and_308_are_followed_when_configured_with_the_same_body(
    redirecting_client: WebhookClient, webhook_server: WebhookServer, status: int
) -> None:
    webhook_server.behave(RCPT, [Step(status, headers={"Location": "/moved?x=1"}), Step(200)])
    body = b'{"big": "' + b"x" * 200_000 + b'"}'  # streamed, so re-sent from the factory
    outcome = await redirecting_client.deliver(
        route(webhook_server.url), request(webhook_server.url, body)
    )
    assert outcome.reply.code == 250 and outcome.http_status == 200
    assert [r.path for r in webhook_server.requests] == ["/hook", "/moved?x=1"]
    moved = webhook_server.requests[1]
    assert moved.method == "POST" and moved.body == body and moved.path == "/moved?x=1"
    assert moved.headers["webhook-id"] == "msg_test"


@pytest.mark.parametrize(
    "target",
    [
        "{other}/hook?sig=t0p",  # another port
        "http://localhost:{port}/hook",  # another host name for the same server
        "http://user:pw@127.0.0.2:{port}/hook",
    ],
)
async def test_a_redirect_to_another_origin_is_refused_and_logged(
    redirecting_client: WebhookClient,
    webhook_server: WebhookServer,
    other_server: WebhookServer,
    caplog: pytest.LogCaptureFixture,
    target: str,
) -> None:
    """The message, the route's headers (an X-Api-Token as much as Authorization) and the
    signature never go to an origin the operator did not configure: 451, the MTA keeps it."""
    location = target.format(other=other_server.base_url, port=webhook_server.port)
    webhook_server.behave(RCPT, status=307, headers={"Location": location})
    req = request(webhook_server.url)
    req.headers.append(("X-Api-Token", "t0ken"))
    with caplog.at_level(logging.WARNING, logger="bridge.webhook.client"):
        outcome = await redirecting_client.deliver(route(webhook_server.url, retries=0), req)
    assert (
        str(outcome.reply)
        == "451 4.3.0 webhook redirect not followed: to another origin (msg_test)"
    )
    assert len(webhook_server.requests) == 1 and other_server.requests == []
    (line,) = [r.getMessage() for r in caplog.records if "redirect" in r.getMessage()]
    shown = location.split("?")[0].replace("user:pw@", "")
    assert line == f"webhook redirect not followed: to another origin ({shown})"
    assert "pw" not in line and "t0p" not in line


@pytest.mark.parametrize("transport", ["h11", "httpx"])
async def test_percent_encoded_dot_segments_reach_the_webhook_as_sent(
    webhook_server: WebhookServer, transport: str
) -> None:
    """httpx and the h11 transport keep %2E%2E (and //) as sent: only a literal ".." would be
    removed, and route.py never puts one in a URL."""
    from bridge.webhook.transport import H11Transport

    url = webhook_server.base_url + "/tenant/%2E%2E/user/%2E//inbox"
    chosen = H11Transport() if transport == "h11" else None
    async with WebhookClient(transport=chosen) as opened:
        outcome = await opened.deliver(route(url), request(url))
    assert outcome.reply.code == 250
    assert [r.path for r in webhook_server.requests] == ["/tenant/%2E%2E/user/%2E//inbox"]


def test_only_the_same_origin_or_an_https_upgrade_keeps_credentials() -> None:
    same = webhook.same_origin_or_upgrade
    assert same("https://h.example/a", "https://H.example:443/b?c")
    assert same("http://h.example/a", "https://h.example/a")  # the upgrade httpx allows too
    assert not same("http://h.example:8080/a", "https://h.example:8443/a")
    assert not same("https://h.example/a", "https://h.example:8443/a")
    assert not same("https://h.example/a", "https://evil.example/a")
    assert not same("https://h.example/a", "https://h.example.evil.example/a")
    assert not same("https://h.example/a", "https://h.example:99999/a")


async def test_same_origin_redirect_keeps_credentials(
    redirecting_client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, [Step(308, headers={"Location": "/moved"}), Step(200)])
    url = webhook_server.base_url + "/start"
    outcome = await redirecting_client.deliver(route(url), request(url))
    assert outcome.reply.code == 250
    assert [r.path for r in webhook_server.requests] == ["/start", "/moved"]
    assert webhook_server.requests[1].headers["authorization"] == SECRET_HEADER


@pytest.mark.parametrize("status", [301, 302, 303])
async def test_redirects_that_turn_post_into_get_are_never_followed(
    redirecting_client: WebhookClient,
    webhook_server: WebhookServer,
    other_server: WebhookServer,
    status: int,
) -> None:
    webhook_server.behave(RCPT, status=status, headers={"Location": other_server.url})
    outcome = await redirecting_client.deliver(
        route(webhook_server.url), request(webhook_server.url)
    )
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.3.0")
    assert other_server.requests == []


async def test_redirect_loops_and_downgrades_are_refused(
    redirecting_client: WebhookClient, webhook_server: WebhookServer
) -> None:
    webhook_server.behave(RCPT, status=307, headers={"Location": webhook_server.url})
    outcome = await redirecting_client.deliver(
        route(webhook_server.url, retries=0), request(webhook_server.url)
    )
    assert str(outcome.reply) == (
        "451 4.3.0 webhook redirect not followed: more than 2 redirects (msg_test)"
    )
    assert len(webhook_server.requests) == 3


async def test_redirect_from_https_to_http_is_refused(
    tls_server: WebhookServer, ca_file: str
) -> None:
    tls_server.behave(RCPT, status=307, headers={"Location": "http://127.0.0.1:9/hook"})
    async with WebhookClient(verify=ca_file, follow_redirects=True) as opened:
        outcome = await opened.deliver(route(tls_server.url, retries=0), request(tls_server.url))
    assert str(outcome.reply) == (
        "451 4.3.0 webhook redirect not followed: to a http URL (msg_test)"
    )


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[WebhookServer]:
    with WebhookServer(tls=server_context(ca, require_client_cert=False)) as server:
        yield server


@pytest.fixture
def mtls_server(ca: trustme.CA) -> Iterator[WebhookServer]:
    with WebhookServer(tls=server_context(ca, require_client_cert=True)) as server:
        yield server


async def test_tls_is_verified_by_default(client: WebhookClient, tls_server: WebhookServer) -> None:
    # trustme's CA is in no system bundle: the default client must refuse the certificate
    outcome = await client.deliver(route(tls_server.url), request(tls_server.url))
    assert (outcome.reply.code, outcome.reply.status, outcome.error) == (451, "4.4.1", "tls")
    assert tls_server.requests == []


async def test_custom_ca_bundle(tls_server: WebhookServer, ca_file: str) -> None:
    async with WebhookClient(verify=ca_file) as opened:
        outcome = await opened.deliver(route(tls_server.url), request(tls_server.url))
    assert outcome.reply.code == 250


async def test_client_certificate_mtls(
    ca: trustme.CA, mtls_server: WebhookServer, ca_file: str, tmp_path: Path
) -> None:
    cert = ca.issue_cert("bridge.example.org")
    combined = tmp_path / "client.pem"  # key and chain in one file
    cert.private_key_and_cert_chain_pem.write_to_path(str(combined))
    async with WebhookClient(verify=ca_file, client_cert=str(combined)) as opened:
        outcome = await opened.deliver(route(mtls_server.url), request(mtls_server.url))
    assert outcome.reply.code == 250
    subject_alt_names = mtls_server.peer_certs[-1]["subjectAltName"]
    assert ("DNS", "bridge.example.org") in subject_alt_names

    # the same with the key in a file of its own
    key, chain = tmp_path / "client.key", tmp_path / "client.crt"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    async with WebhookClient(verify=ca_file, client_cert=str(chain), client_key=str(key)) as opened:
        outcome = await opened.deliver(route(mtls_server.url), request(mtls_server.url))
    assert outcome.reply.code == 250


async def test_client_certificate_through_the_default_h11_transport(
    ca: trustme.CA, mtls_server: WebhookServer, ca_file: str, tmp_path: Path
) -> None:
    # the bridge's default transport is bridge/webhook/transport.py, built from the settings
    from bridge.app import webhook_transport
    from bridge.config import load_settings
    from bridge.webhook.transport import H11Transport

    cert = ca.issue_cert("bridge.example.org")
    key, chain = tmp_path / "client.key", tmp_path / "client.crt"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    settings = load_settings(
        overrides={
            "webhook_url": mtls_server.url,
            "http_verify": ca_file,
            "http_client_cert": str(chain),
            "http_client_key": str(key),
        },
        environ={},
    )
    transport = webhook_transport(settings)
    assert isinstance(transport, H11Transport)
    async with WebhookClient(transport=transport) as opened:
        outcome = await opened.deliver(route(mtls_server.url), request(mtls_server.url))
    assert outcome.reply.code == 250
    assert ("DNS", "bridge.example.org") in mtls_server.peer_certs[-1]["subjectAltName"]


async def test_without_a_client_certificate_mtls_fails_retryably(
    mtls_server: WebhookServer, ca_file: str
) -> None:
    async with WebhookClient(verify=ca_file) as opened:
        outcome = await opened.deliver(route(mtls_server.url), request(mtls_server.url))
    assert outcome.reply.code == 451 and outcome.error in ("tls", "reset")
    assert mtls_server.requests == []


# --- proxies from the environment -------------------------------------------------------------


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch, other_server: WebhookServer) -> WebhookServer:
    """HTTP_PROXY points at ``other_server``, which records what a proxy would be asked."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", other_server.base_url)
    monkeypatch.setenv("http_proxy", other_server.base_url)
    return other_server


async def test_proxy_environment_ignored_unless_enabled(
    proxy_env: WebhookServer, webhook_server: WebhookServer
) -> None:
    async with WebhookClient() as opened:
        outcome = await opened.deliver(route(webhook_server.url), request(webhook_server.url))
    assert outcome.reply.code == 250
    assert len(webhook_server.requests) == 1 and proxy_env.requests == []


async def test_proxy_environment_used_when_enabled(
    proxy_env: WebhookServer, webhook_server: WebhookServer
) -> None:
    async with WebhookClient(trust_env=True) as opened:
        outcome = await opened.deliver(route(webhook_server.url), request(webhook_server.url))
    assert outcome.reply.code == 250
    assert webhook_server.requests == []
    (proxied,) = proxy_env.requests
    assert proxied.path == webhook_server.url  # the absolute form a proxy is asked for


# --- secrets ------------------------------------------------------------------------------


async def test_secrets_never_in_reprs_or_logs(
    webhook_server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    routed = Route(
        name="s",
        url=webhook_server.url,
        secrets=(secret,),
        headers={"Authorization": SECRET_HEADER},
        retries=1,
    )
    assert secret not in repr(routed) and SECRET_HEADER not in repr(routed)
    webhook_server.behave(RCPT, [Step(503), Step(200)])
    with caplog.at_level(logging.DEBUG):
        async with WebhookClient() as opened:
            outcome = await opened.deliver(routed, request(webhook_server.url))
    assert outcome.reply.code == 250
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert caplog.records and secret not in text and "s3cr3t" not in text


# --- default headers ----------------------------------------------------------------------


async def test_requests_name_the_bridge_and_refuse_compressed_answers(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    await client.deliver(route(webhook_server.url), request(webhook_server.url))
    (seen,) = webhook_server.requests
    assert seen.headers["user-agent"] == f"lmtp-bridge/{webhook.__version__}"
    assert seen.headers["accept-encoding"] == "identity"  # error bodies are read raw


async def test_a_header_of_the_request_replaces_the_default_of_the_same_name(
    client: WebhookClient, webhook_server: WebhookServer
) -> None:
    sent = request(webhook_server.url)
    own = WebhookRequest(
        url=sent.url,
        headers=[*sent.headers, ("user-agent", "acme-mail/2")],
        chunks=sent.chunks,
        length=sent.length,
    )
    await client.deliver(route(webhook_server.url), own)
    (seen,) = webhook_server.requests
    assert seen.headers["user-agent"] == "acme-mail/2"  # one field: repeats would be joined
