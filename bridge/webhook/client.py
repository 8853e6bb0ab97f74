"""The webhook side of a delivery: one pooled httpx client, the HTTP outcome -> LMTP reply map
(SPEC section 4) and the short retries that happen while the LMTP session waits."""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx
import trio

from bridge import __version__
from bridge.base.route import Route
from bridge.lmtp.events import Reply
from bridge.ops.metrics import (
    RETRY_AFTER,
    WEBHOOK_DURATION,
    WEBHOOK_IN_FLIGHT,
    WEBHOOK_REQUESTS,
    WEBHOOK_RETRIES,
    child,
    status_class,
)

log = logging.getLogger("bridge.webhook.client")

DEFAULT_USER_AGENT = f"lmtp-bridge/{__version__}"
REPLY_HEADER = "X-Lmtp-Reply"
SMALL_BODY = 64 * 1024  # up to this size the body is sent as one bytes object
STREAM_PIECE = 256 * 1024  # bytes pulled from the body factory per worker-thread hop
MAX_RESPONSE_READ = 4096  # bytes of a response body we ever look at
MAX_TEXT = 200  # printable characters taken from the webhook's own words
MAX_REPLY_LINE = 512  # octets, CRLF included (RFC 5321 4.5.3.1.5)
BACKOFF_BASE = 0.2  # seconds before the first retry
BACKOFF_FACTOR = 2.5
BACKOFF_CAP = 2.0
CLOSE_GRACE = 5.0  # seconds to close pooled connections at shutdown
MIN_ATTEMPT = 1.0  # seconds: a retry is only started with at least this much budget left
REDIRECT_STATUSES = (307, 308)  # the only ones that keep the method and body of a POST
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Transport failure kinds (Outcome.error, the `error=` of the log) -> default reply. Each kind
# its own text, so the MTA's log tells them apart; the enhanced codes are SPEC section 4's.
_TRANSPORT_REPLIES: dict[str, Reply] = {
    "timeout": Reply(451, "4.4.2", "webhook timed out"),
    "dns": Reply(451, "4.4.1", "webhook host name not found (DNS)"),
    "refused": Reply(451, "4.4.1", "webhook connection refused"),
    "connect": Reply(451, "4.4.1", "webhook connection failed"),
    "reset": Reply(451, "4.4.1", "webhook connection reset"),
    "tls": Reply(451, "4.4.1", "webhook TLS error"),
    "protocol": Reply(451, "4.3.0", "webhook sent an invalid HTTP response"),
    "internal": Reply(451, "4.3.0", "internal error"),
}
# We own the framing of the request body.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})

_REPLY_RE = re.compile(
    r"([245][0-9][0-9])[ \t]+([245]\.[0-9]{1,3}\.[0-9]{1,3})(?:[ \t]+(.*))?", re.DOTALL
)
_LINE_BREAK = re.compile(r"[\r\n]+")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


@dataclass(frozen=True)
class WebhookRequest:
    """One recipient's copy, ready to POST."""

    url: str
    headers: list[tuple[str, str]]  # every header to send except the framing ones
    chunks: Callable[[], Iterable[bytes]]  # each call yields the whole body again (retries)
    length: int
    in_memory: bool = False  # True: making the chunks reads no file (no worker thread needed)
    delivery_id: str = ""  # named in the reply text, so the MTA's log line can be joined
    answer_limit: int = MAX_RESPONSE_READ  # bytes of the answer's body kept (per-message verdicts)
    # what the log lines of this request say to find the message: delivery_id, queue_id...
    log_fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient's copy, after all attempts."""

    reply: Reply  # the LMTP reply for this recipient
    http_status: int | None  # last HTTP status, None on transport error
    attempts: int
    duration: float  # seconds, all attempts and backoff
    # transport failure kind: timeout, dns, refused, connect, reset, tls, protocol, internal
    error: str | None
    answer: bytes = b""  # the last answer's body, up to the request's answer_limit
    answer_truncated: bool = False  # the body went on past answer_limit
    detail: str | None = None  # the failure underneath, for the log (never in a reply)


# --- the map ----------------------------------------------------------------------------------


def sanitize_text(text: str, limit: int = MAX_TEXT) -> str:
    """The first non-blank line of ``text``, printable ASCII only, cut to ``limit`` characters.

    Whatever a webhook sends, the result can never start a second reply line.
    """
    for line in _LINE_BREAK.split(text):
        clean = " ".join(_NOT_PRINTABLE.sub("", line).split())
        if clean:
            return clean[:limit].rstrip()
    return ""


def parse_reply(value: str) -> Reply | None:
    """Parse ``"451 4.3.0 [text]"`` (a status_map value or an X-Lmtp-Reply header).

    None when it is not a well-formed reply: the code must be 2xx/4xx/5xx (421 is refused,
    it means the session closes), and the enhanced code's class must match the code.
    """
    match = _REPLY_RE.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    code, status, text = match.groups()
    if code[0] != status[0] or code == "421":
        return None
    return Reply(int(code), status, sanitize_text(text or ""))


def _default_reply(status: int) -> Reply:
    if 200 <= status < 300:
        return Reply(250, "2.0.0")
    if status in (404, 410):
        return Reply(550, "5.1.1")
    if status == 413:
        return Reply(552, "5.3.4")
    if status in (400, 415, 422):
        return Reply(554, "5.6.0")
    if status in (401, 403, 407):
        return Reply(451, "4.7.0")
    if status in (408, 425, 429):
        return Reply(451, "4.3.0")
    if 400 <= status < 500:
        return Reply(554, "5.0.0")
    if status == 507:
        return Reply(452, "4.2.2")
    return Reply(451, "4.3.0")  # 5xx, 3xx and anything stranger


def _override(keys: Iterable[str], overrides: Mapping[str, str], success: bool) -> Reply | None:
    """The first usable override among ``keys``; it may say 2xx only when the webhook did."""
    lowered = {key.strip().lower(): value for key, value in overrides.items()}
    for key in keys:
        value = lowered.get(key)
        if value is None:
            continue
        reply = parse_reply(value)
        if reply is None or reply.is_success != success:
            log.warning("ignoring invalid status_map entry %r: %r", key, value)
            continue
        return reply
    return None


def _fit(reply: Reply, delivery_id: str = "") -> Reply:
    """Cut the text so the whole reply line stays within MAX_REPLY_LINE octets; a
    ``delivery_id`` not in the text yet is added at its end, never cut off."""
    text = reply.text if isinstance(reply.text, str) else " ".join(reply.text)
    suffix = f" ({delivery_id})" if delivery_id and delivery_id not in text else ""
    room = MAX_REPLY_LINE - len(f"{reply.code} {reply.status} \r\n") - len(suffix)
    return Reply(reply.code, reply.status, text[:room].rstrip() + suffix)


def with_delivery_id(reply: Reply, delivery_id: str) -> Reply:
    """``reply`` naming ``delivery_id`` at the end of its text (a per-message request's replies:
    one request, each recipient its own id)."""
    return _fit(reply, delivery_id)


def map_response(
    status: int,
    body_first_line: str,
    lmtp_reply_header: str | None,
    overrides: Mapping[str, str],
    delivery_id: str = "",
) -> Reply:
    """The LMTP reply for an HTTP answer (SPEC section 4).

    A valid ``X-Lmtp-Reply`` header wins, then ``overrides`` (exact code before class), then the
    default map. Only a 2xx HTTP status can ever give a 2xx reply. With a ``delivery_id`` the
    text names it (SPEC 6): ``delivered msg_… (HTTP 200)``, ``refused msg_… (HTTP 404): why``,
    ``deferred msg_… (HTTP 503): why``; a text the webhook or an override chose is kept as
    written and the id follows it in parentheses.
    """
    success = 200 <= status < 300
    line = "" if success else sanitize_text(body_first_line)

    def text_for(code: int) -> str:
        if not delivery_id:
            if success:
                return f"delivered (HTTP {status})"
            return f"webhook answered HTTP {status}" + (f": {line}" if line else "")
        verb = "delivered" if success else "deferred" if code < 500 else "refused"
        return f"{verb} {delivery_id} (HTTP {status})" + (f": {line}" if line else "")

    if lmtp_reply_header is not None:
        chosen = parse_reply(lmtp_reply_header)
        if chosen is not None and chosen.is_success == success:
            text = chosen.text or text_for(chosen.code)
            return _fit(Reply(chosen.code, chosen.status, text), delivery_id)

    reply = _override((str(status), f"{status // 100}xx"), overrides, success)
    if reply is None:
        reply = _default_reply(status)
    return _fit(Reply(reply.code, reply.status, reply.text or text_for(reply.code)), delivery_id)


def classify_transport_error(exc: Exception) -> str:
    """The failure kind of an exception raised while talking to the webhook.

    The same for both transports (ours and httpx's): the kind comes from the OS or TLS error
    underneath, found on the exception's cause chain (and in trio's exception groups).
    """
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    causes = list(_causes(exc))
    if isinstance(exc, httpx.NetworkError):
        if any(isinstance(c, ssl.SSLError | ssl.CertificateError) for c in causes):
            return "tls"
        if any(isinstance(c, socket.gaierror) for c in causes):
            return "dns"
    if isinstance(exc, httpx.ConnectError):
        oserrors = [c for c in causes if isinstance(c, OSError) and c.errno is not None]
        if oserrors and all(isinstance(c, ConnectionRefusedError) for c in oserrors):
            return "refused"  # every address of the host refused
        if any(isinstance(c, ConnectionResetError) for c in causes):
            return "reset"
        return "connect"
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return "reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        # A peer that hangs up before answering is a lost connection, not a bad answer.
        if "disconnected" in str(exc).lower():
            return "reset"
        return "protocol"
    return "internal"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, what caused it, and the members of any exception group on the way (bounded)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 64:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def transport_error_detail(exc: Exception) -> str:
    """A short, printable account of the failure underneath ``exc`` for the log: the TLS
    verification message, the OS error text or the exception's own words."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLError):
            why = getattr(cause, "verify_message", None)  # set by a real handshake only
            if why:
                return sanitize_text(f"certificate verify failed: {why}", 120)
            return sanitize_text(str(getattr(cause, "reason", None) or cause), 120)
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return sanitize_text(cause.strerror, 120)
        if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError) and cause.errno:
            return sanitize_text(os.strerror(cause.errno), 120)  # the same words on every path
    return sanitize_text(str(exc), 120) or type(exc).__name__


def map_transport_error(
    exc: Exception, overrides: Mapping[str, str], delivery_id: str = ""
) -> Reply:
    """The LMTP reply when no HTTP answer came (SPEC section 4: always a 4xx by default).

    Overrides: ``"timeout"`` for timeouts, then ``"error"`` for any transport failure.
    Our own bugs are never overridable: they stay ``451 4.3.0``. A ``delivery_id`` follows
    the text in parentheses.
    """
    kind = classify_transport_error(exc)
    default = _TRANSPORT_REPLIES[kind]
    if kind == "tls":  # which TLS problem: an expired or self-signed certificate, a bad name...
        detail = transport_error_detail(exc)
        default = _fit(Reply(default.code, default.status, f"{default.text}: {detail}"))
    reply = None if kind == "internal" else _override((kind, "error"), overrides, success=False)
    if reply is None:
        return _fit(default, delivery_id) if delivery_id else default
    return _fit(Reply(reply.code, reply.status, reply.text or str(default.text)), delivery_id)


class RedirectRefused(Exception):
    """A redirect the bridge will not follow (to another origin, to plain http, too many, no
    Location); ``target`` is where it pointed, for the log line (never for the reply)."""

    def __init__(self, reason: str, target: str | None = None) -> None:
        super().__init__(reason)
        self.target = target


def _origin(url: SplitResult) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    return scheme, (url.hostname or "").lower(), url.port or _DEFAULT_PORTS.get(scheme)


def same_origin_or_upgrade(old: str, new: str) -> bool:
    """May a redirect from ``old`` to ``new`` carry the route's headers and signature? Only
    within one origin (scheme, host, port), or from http to https on the same host with the
    default ports (what httpx allows too): the message and its credentials stay with the host
    the operator configured."""
    try:
        a, b = _origin(urlsplit(old)), _origin(urlsplit(new))
    except ValueError:  # a port that is not a number
        return False
    return a == b or (a[1] == b[1] and (a[0], a[2], b[0], b[2]) == ("http", 80, "https", 443))


def url_for_log(url: str) -> str:
    """``url`` without its user info and query (either may hold a credential)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return sanitize_text(urlunsplit((parts.scheme, host, parts.path, "", "")), MAX_TEXT)


def backoff_delay(retry: int) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): short, growing, jittered."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * BACKOFF_FACTOR ** (retry - 1))
    return delay * random.uniform(0.5, 1.0)


# --- the client -------------------------------------------------------------------------------


def _take(chunks: Iterator[bytes], limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    for piece in chunks:
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return b"".join(parts)


def _with_defaults(
    defaults: list[tuple[str, str]], headers: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``headers`` after the defaults they do not name themselves (a route may set its own
    User-Agent), as the client's default headers would merge."""
    named = {name.lower() for name, _ in headers}
    return [(k, v) for k, v in defaults if k.lower() not in named] + headers


class _BodyStream:
    """The request body as an async iterator; reading the factory (maybe a spool file) happens
    in a worker thread so a slow disk never stalls the event loop. A body made from memory
    alone skips the thread: two thread hops per 256 KiB cost more than the copying."""

    def __init__(self, factory: Callable[[], Iterable[bytes]], in_memory: bool = False) -> None:
        self._factory = factory
        self._chunks: Iterator[bytes] | None = None
        self._in_memory = in_memory

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            self._chunks = iter(self._factory())
        if self._in_memory:
            piece = _take(self._chunks, STREAM_PIECE)
        else:
            piece = await trio.to_thread.run_sync(_take, self._chunks, STREAM_PIECE)
        if not piece:
            raise StopAsyncIteration
        return piece


def tls_setting(
    verify: bool | str,
    client_cert: str | None = None,
    client_key: str | None = None,
    trust_env: bool = False,
) -> bool | ssl.SSLContext:
    """httpx's ``verify``: True/False, or a context for a CA bundle and/or a client certificate
    (mTLS). With ``trust_env``, SSL_CERT_FILE / SSL_CERT_DIR name the CA bundle, as in httpx."""
    if isinstance(verify, bool) and client_cert is None:
        return verify
    if isinstance(verify, bool):
        context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
    elif os.path.isdir(verify):
        context = ssl.create_default_context(capath=verify)
    else:
        context = ssl.create_default_context(cafile=verify)
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    return context


@dataclass(frozen=True)
class _Attempt:
    reply: Reply
    http_status: int | None
    error: str | None
    answer: bytes = b""
    answer_truncated: bool = False
    detail: str | None = None


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, as far as the bridge looks at it."""

    status: int
    reply_header: str | None  # X-Lmtp-Reply
    body_start: str  # the first MAX_RESPONSE_READ bytes of the body, as ASCII
    retry_after: str | None
    cache_control: str | None = None
    body: bytes = b""
    truncated: bool = False


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: the bridge holds no state between deliveries, so a
    webhook's Set-Cookie is never sent back with another recipient's copy. (httpx's own jar
    also cost ~7 % of a small delivery's CPU, wrapping every response for urllib.)"""

    def extract_cookies(self, response: httpx.Response) -> None:
        return


URL_CACHE_SIZE = 256  # parsed webhook URLs kept (one per route, or per recipient if templated)


class WebhookClient:
    """One long-lived, pooled HTTP client shared by every delivery."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        max_keepalive_connections: int = 100,
        verify: bool | str = True,
        user_agent: str = DEFAULT_USER_AGENT,
        transport: httpx.AsyncBaseTransport | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        trust_env: bool = False,
        follow_redirects: bool = False,
        max_redirects: int = 3,
    ) -> None:
        self._max_redirects = max_redirects if follow_redirects else 0
        # Sent with every request; requests are built here, not by client.build_request(),
        # which merges the client's defaults, cookies and query on each call (≈ 10 µs).
        # identity: we read raw bytes of error bodies and never want to inflate them.
        self._base_headers = [("User-Agent", user_agent), ("Accept-Encoding", "identity")]
        self._client = httpx.AsyncClient(
            transport=transport,  # e.g. the h11 transport, or httpx.MockTransport in tests
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(max_keepalive_connections, max_connections),
            ),
            verify=tls_setting(verify, client_cert, client_key, trust_env),
            # Redirects are ours to follow (only 307/308, which keep the POST and its body):
            # httpx would turn a POST answered 301/302/303 into a GET and lose the message.
            follow_redirects=False,
            # Proxies from HTTP(S)_PROXY / NO_PROXY only when the operator asked for it.
            trust_env=trust_env,
            headers=dict(self._base_headers),
        )
        self._client._cookies = _NoCookies()  # httpx has no public switch to keep no cookies
        # A transport of our choosing, without proxies from the environment, is asked directly:
        # with no auth, redirects, hooks or cookies, AsyncClient.send() only wraps it (its
        # layers were ≈ 3-5 % of a per-message delivery's CPU in a py-spy profile). httpx's own
        # transport keeps the client's path.
        self._direct = transport if transport is not None and not trust_env else None
        self._urls: dict[str, httpx.URL] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> WebhookClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # the pooled connections are closed on the way out, even when cancelled
        with trio.move_on_after(CLOSE_GRACE, shield=True):
            await self.aclose()

    async def deliver(self, route: Route, request: WebhookRequest) -> Outcome:
        """POST one recipient's copy, retrying 4xx outcomes up to ``route.retries`` times.

        Never raises except ``trio.Cancelled`` (the caller's deadline), which it lets through.
        """
        started = time.perf_counter()
        # The retry budget bounds every try and every pause: the MTA must hear from us in time.
        deadline = trio.current_time() + route.retry_budget
        attempts = 0
        while True:
            attempts += 1
            limit = min(route.timeout, max(0.0, deadline - trio.current_time()))
            result = await self._attempt(route, request, limit, attempts)
            if not result.reply.is_transient or attempts > route.retries:
                break
            delay = backoff_delay(attempts)
            if deadline - trio.current_time() - delay < MIN_ATTEMPT:
                log.debug("retry budget spent", extra={"route": route.name, **request.log_fields})
                break
            WEBHOOK_RETRIES.labels(route.name).inc()
            log.info(
                "webhook attempt failed; retrying",
                extra={
                    **request.log_fields,
                    "route": route.name,
                    "attempt": attempts,
                    "http_status": result.http_status,
                    "error": result.error,
                    **({"detail": result.detail} if result.detail else {}),
                    "retry_in": round(delay, 3),
                },
            )
            await trio.sleep(delay)
        return Outcome(
            reply=result.reply,
            http_status=result.http_status,
            attempts=attempts,
            duration=time.perf_counter() - started,
            error=result.error,
            answer=result.answer,
            answer_truncated=result.answer_truncated,
            detail=result.detail,
        )

    async def _attempt(
        self, route: Route, request: WebhookRequest, limit: float, number: int = 1
    ) -> _Attempt:
        in_flight = child(WEBHOOK_IN_FLIGHT, route.name)
        in_flight.inc()
        started = time.perf_counter()
        try:
            result = await self._attempt_unmetered(route, request, limit)
        finally:
            in_flight.dec()
        child(WEBHOOK_DURATION, route.name).observe(time.perf_counter() - started)
        child(WEBHOOK_REQUESTS, route.name, status_class(result.http_status)).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "webhook attempt",
                extra={
                    **request.log_fields,
                    "route": route.name,
                    "attempt": number,
                    "http_status": result.http_status,
                    "error": result.error,
                    "detail": result.detail,
                },
            )
        return result

    async def _attempt_unmetered(
        self, route: Route, request: WebhookRequest, limit: float
    ) -> _Attempt:
        try:
            # httpx's Timeout bounds each phase; this scope bounds connect-to-last-byte.
            with trio.move_on_after(limit):
                answer = await self._exchange(route, request, max(limit, 0.001))
                if answer.retry_after is not None:
                    RETRY_AFTER.labels(route.name).inc()
                    log.info(
                        "webhook sent Retry-After (not obeyed: the MTA's queue decides)",
                        extra={
                            "route": route.name,
                            "http_status": answer.status,
                            "retry_after": sanitize_text(answer.retry_after, 64),
                        },
                    )
                reply = map_response(
                    answer.status,
                    answer.body_start,
                    answer.reply_header,
                    route.status_map,
                    request.delivery_id,
                )
                return _Attempt(reply, answer.status, None, answer.body, answer.truncated)
            failure: Exception = httpx.TimeoutException("no answer within the route's timeout")
        except RedirectRefused as exc:
            target = f" ({exc.target})" if exc.target else ""
            log.warning(
                "webhook redirect not followed: %s%s", exc, target, extra={"route": route.name}
            )
            reply = Reply(451, "4.3.0", f"webhook redirect not followed: {exc}")
            return _Attempt(_fit(reply, request.delivery_id), None, "protocol")
        except Exception as exc:
            failure = exc
            if classify_transport_error(exc) == "internal":
                log.exception("webhook request failed unexpectedly", extra={"route": route.name})
        kind = classify_transport_error(failure)
        reply = map_transport_error(failure, route.status_map, request.delivery_id)
        return _Attempt(reply, None, kind, detail=transport_error_detail(failure))

    async def post_once(self, route: Route, request: WebhookRequest, limit: float) -> Answer:
        """One POST (307/308 followed when configured), no retries, no delivery metrics: for
        requests other than deliveries, such as recipient verification. Raises what httpx
        raises (see ``classify_transport_error``) and ``RedirectRefused``; the caller bounds
        the whole exchange with its own deadline, ``limit`` bounds each phase."""
        return await self._exchange(route, request, limit)

    async def _exchange(self, route: Route, request: WebhookRequest, limit: float) -> Answer:
        """Send the request, following 307/308 redirects when configured."""
        url = request.url
        headers = [(k, v) for k, v in request.headers if k.lower() not in _FRAMING_HEADERS]
        headers.append(("Content-Length", str(request.length)))
        hops = 0
        while True:
            answer, location = await self._post_once(url, headers, request, limit)
            if answer.status not in REDIRECT_STATUSES or not self._max_redirects:
                return answer
            hops += 1
            if hops > self._max_redirects:
                raise RedirectRefused(f"more than {self._max_redirects} redirects")
            if not location:
                raise RedirectRefused(f"HTTP {answer.status} without a Location")
            target = urljoin(url, location)
            old, new = urlsplit(url), urlsplit(target)
            if new.scheme not in ("http", "https") or (old.scheme, new.scheme) == ("https", "http"):
                raise RedirectRefused(f"to a {new.scheme or 'relative'} URL", url_for_log(target))
            if not same_origin_or_upgrade(url, target):
                # Never re-post the message, the route's headers or the signature elsewhere:
                # 451 keeps the mail queued while the operator updates the URL.
                raise RedirectRefused("to another origin", url_for_log(target))
            log.info(
                "following webhook redirect",
                extra={"route": route.name, "http_status": answer.status},
            )
            url = target

    async def _post_once(
        self,
        url: str,
        headers: list[tuple[str, str]],
        request: WebhookRequest,
        limit: float,
    ) -> tuple[Answer, str | None]:
        """One POST; the answer and the Location header."""
        content: bytes | _BodyStream
        if request.length <= SMALL_BODY:
            content = b"".join(request.chunks())
        else:
            content = _BodyStream(request.chunks, request.in_memory)
        parsed_url = self._urls.get(url)
        if parsed_url is None:
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()
            parsed_url = self._urls[url] = httpx.URL(url)
        outgoing = httpx.Request(
            "POST",
            parsed_url,
            headers=_with_defaults(self._base_headers, headers),
            content=content,
            extensions={"timeout": httpx.Timeout(limit).as_dict()},
        )
        if self._direct is not None:
            response = await self._direct.handle_async_request(outgoing)
        else:
            response = await self._client.send(outgoing, stream=True)
        try:
            # Reading a short body to its end lets the connection go back to the pool.
            body = b""
            limit = max(request.answer_limit, MAX_RESPONSE_READ)
            raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
            async with aclosing(raw) as pieces:
                async for piece in pieces:
                    body += piece
                    if len(body) > limit:
                        break
        finally:
            await response.aclose()
        text = body[:MAX_RESPONSE_READ].decode("ascii", "ignore")
        keep = request.answer_limit > MAX_RESPONSE_READ and 200 <= response.status_code < 300
        answer = Answer(
            status=response.status_code,
            reply_header=response.headers.get(REPLY_HEADER),
            body_start=text,
            retry_after=response.headers.get("Retry-After"),
            cache_control=response.headers.get("Cache-Control"),
            # kept only where someone reads it: a per-message request's 2xx (its verdicts)
            body=body[: request.answer_limit] if keep else b"",
            truncated=keep and len(body) > request.answer_limit,
        )
        return answer, response.headers.get("Location")
