"""Recipient -> route: which webhook, payload and policy carry a recipient's copy."""

from __future__ import annotations

import fnmatch
import re
import string
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.config import RouteConfig, Settings


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved route, ready for delivery (built from the settings once at start-up)."""

    name: str  # the metric label
    url: str  # may hold {rcpt}, {local}, {domain}, {user}, {tag}: see url_for()
    payload: str = "json"  # "json", "raw" or "multipart"
    # "whsec_..." signing secrets; empty: no signature. Never in a repr (logs, tracebacks).
    secrets: tuple[str, ...] = field(default=(), repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    timeout: float = 30.0
    retries: int = 2
    include_raw: bool = False
    # overrides of the HTTP status map: keys "404", "4xx", "5xx", "timeout", "error";
    # values a reply such as "451 4.3.0"
    status_map: Mapping[str, str] = field(default_factory=dict)
    trace_headers: bool = True  # raw payload: prepend Return-Path, Delivered-To, Received
    retry_budget: float = 120.0  # seconds for all attempts and backoff of one recipient

    def url_for(self, address: str, delimiter: str = "+") -> str:
        """The URL for one recipient: placeholders filled in, each value percent-encoded."""
        if "{" not in self.url:
            return self.url
        return self.url.format_map(template_values(address, delimiter))


# Placeholders a route URL may use (in its path or query only).
URL_PLACEHOLDERS = ("rcpt", "local", "domain", "user", "tag")


def split_extension(local: str, delimiter: str = "+") -> tuple[str, str | None]:
    """Plus-addressing: ``"bob+news"`` -> ``("bob", "news")``; ``("bob", None)`` without one.

    As Postfix's ``recipient_delimiter``: each character of ``delimiter`` is a delimiter, the
    first one found splits, and a local part that starts with one is not split.
    """
    for i, c in enumerate(local):
        if c in delimiter and i > 0:
            return local[:i], local[i + 1 :]
    return local, None


def template_values(address: str, delimiter: str = "+") -> dict[str, str]:
    local, domain = split_address(address)
    user, tag = split_extension(local, delimiter)
    raw = {
        "rcpt": _join(local, domain),
        "local": local,
        "domain": domain or "",
        "user": user,
        "tag": tag or "",
    }
    # safe="": "/", "?", "#", "@" and "%" are encoded too, so a value stays one path segment.
    return {
        k: urllib.parse.quote(v.encode("utf-8", "surrogateescape"), safe="") for k, v in raw.items()
    }


def check_url_template(url: str) -> None:
    """Raise ValueError unless every ``{placeholder}`` is known and after the host."""
    try:
        parsed = list(string.Formatter().parse(url))
    except ValueError:
        parsed = [("{", None, None, None)]
    names = []
    for literal, name, spec, conv in parsed:
        if "{" in literal or "}" in literal:
            raise ValueError("a '{' or '}' that is not a placeholder (write it as %7B / %7D)")
        if name is None:
            continue
        if name not in URL_PLACEHOLDERS or spec or conv:
            raise ValueError(
                f"unknown placeholder {{{name}}} in the URL; expected "
                + ", ".join(f"{{{p}}}" for p in URL_PLACEHOLDERS)
            )
        names.append(name)
    parts = urllib.parse.urlsplit(url)
    if names and ("{" in parts.scheme or "{" in parts.netloc):
        raise ValueError("placeholders are allowed in the URL's path and query only")


# (normalized address, local part, lower-cased domain or None) -> does the pattern fit?
Matcher = Callable[[str, str, "str | None"], bool]
_GLOB_CHARS = ("*", "?")


def compile_match(pattern: str) -> Matcher:
    """Turn a route's ``match`` into a test; raises ValueError for a pattern that can never work.

    Kinds: ``re:REGEX`` (fullmatch), ``@domain`` (exactly that domain), a glob with ``*`` or
    ``?`` (fnmatch on the whole address; ``@*.example.org`` globs the domain alone), else an
    exact address. Domains compare case-insensitively, local parts exactly; a regex sees the
    address with its domain lower-cased.
    """
    text = pattern.strip()
    if not text:
        raise ValueError("empty pattern")
    if text.startswith("re:"):
        if not text[3:]:
            raise ValueError("empty regular expression after 're:'")
        try:
            regex = re.compile(text[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return lambda address, local, domain: regex.fullmatch(address) is not None
    is_glob = any(c in text for c in _GLOB_CHARS)
    local, domain = split_address(text)
    if domain == "":
        raise ValueError(f"{text!r}: nothing after '@'")
    if local == "" and domain is not None:
        if is_glob:
            return lambda address, a_local, a_domain: (
                a_domain is not None and fnmatch.fnmatchcase(a_domain, domain)
            )
        return lambda address, a_local, a_domain: a_domain == domain
    normalized = _join(local, domain)
    if is_glob:
        return lambda address, a_local, a_domain: fnmatch.fnmatchcase(address, normalized)
    return lambda address, a_local, a_domain: address == normalized


def split_address(address: str) -> tuple[str, str | None]:
    """(local part, lower-cased domain); the domain is None for an address without '@'.

    The last '@' separates them, since a quoted local part may contain '@' itself.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address, None
    return local, domain.lower()


def _join(local: str, domain: str | None) -> str:
    return local if domain is None else f"{local}@{domain}"


def _is_exact(pattern: str) -> bool:
    text = pattern.strip()
    return not (text.startswith(("re:", "@")) or any(c in text for c in _GLOB_CHARS))


class Router:
    """Finds a recipient's route: the first pattern that fits, else the default route.

    An exact-address pattern also fits that address with an extension: with ``delimiter``
    "+", ``bob@example.org`` fits ``bob+news@example.org`` (as Postfix's table lookups do).
    """

    __slots__ = ("_default", "_delimiter", "_routes")

    def __init__(
        self, routes: Sequence[tuple[str, Route]], default: Route | None, *, delimiter: str = "+"
    ) -> None:
        self._routes = tuple(
            (compile_match(pattern), _is_exact(pattern), route) for pattern, route in routes
        )
        self._default = default
        self._delimiter = delimiter

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route in matching order, the default last: the values of the route label."""
        listed = tuple(route for _, _, route in self._routes)
        return listed if self._default is None else (*listed, self._default)

    def route_for(self, address: str) -> Route | None:
        """The route of `address`, or None when nothing covers it (answer 550 5.1.1)."""
        local, domain = split_address(address)
        normalized = _join(local, domain)
        user, tag = split_extension(local, self._delimiter)
        base = _join(user, domain) if tag is not None else None
        for fits, exact, route in self._routes:
            if fits(normalized, local, domain):
                return route
            if exact and base is not None and fits(base, user, domain):
                return route
        return self._default


def build_router(settings: Settings) -> Router:
    """Resolve the configured routes against the global settings into a Router."""
    routes = [(rc.match, _resolve(settings, rc)) for rc in settings.routes]
    default = None
    if settings.webhook_url is not None:
        default = Route(
            name="default",
            url=settings.webhook_url,
            payload=settings.payload,
            secrets=tuple(s.get_secret_value() for s in settings.webhook_secret),
            headers=dict(settings.webhook_headers),
            timeout=settings.http_timeout,
            retries=settings.http_retries,
            include_raw=settings.include_raw,
            status_map=dict(settings.status_map),
            trace_headers=settings.trace_headers,
            retry_budget=settings.http_retry_budget,
        )
    return Router(routes, default, delimiter=settings.recipient_delimiter)


def _resolve(settings: Settings, rc: RouteConfig) -> Route:
    url = rc.url or settings.webhook_url
    if url is None:
        raise ValueError(f"route {rc.name!r} has no url and webhook_url is not set")
    secrets = settings.webhook_secret if rc.secret is None else rc.secret
    return Route(
        name=rc.name,
        url=url,
        payload=rc.payload or settings.payload,
        secrets=tuple(s.get_secret_value() for s in secrets),
        headers=_merge_headers(settings.webhook_headers, rc.headers or {}),
        timeout=settings.http_timeout if rc.timeout is None else rc.timeout,
        retries=settings.http_retries if rc.retries is None else rc.retries,
        include_raw=settings.include_raw if rc.include_raw is None else rc.include_raw,
        status_map={**settings.status_map, **(rc.status_map or {})},
        trace_headers=settings.trace_headers if rc.trace_headers is None else rc.trace_headers,
        retry_budget=settings.http_retry_budget,
    )


def _merge_headers(base: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    # Header names are case-insensitive: a route's "authorization" replaces "Authorization".
    mine = {name.lower() for name in own}
    merged = {name: value for name, value in base.items() if name.lower() not in mine}
    merged.update(own)
    return merged
