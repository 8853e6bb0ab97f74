"""A route as delivery uses it, and the recipient address helpers every room shares: splitting
an address, plus-addressing, and the values a route URL's placeholders take."""

from __future__ import annotations

import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field


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
    # recipient verification at RCPT (SPEC 7): None asks nobody
    verify_url: str | None = None  # may hold the same placeholders as url
    verify_timeout: float = 5.0
    verify_on_error: str = "accept"  # "accept" or "defer": no usable answer from verify_url
    # "recipient": one request per recipient; "message": one request for all of this route's
    # recipients of a message, answered with per-recipient verdicts (SPEC section 8)
    delivery: str = "recipient"
    # A message past a parse limit (bridge.mail.limits): "deliver" what was parsed within the
    # limits (defects name them), or "reject" it with 554 5.6.0. Raw payloads are not parsed.
    on_parse_limit: str = "deliver"

    def url_for(self, address: str, delimiter: str = "+") -> str:
        """The URL for one recipient: placeholders filled in, each value percent-encoded."""
        if "{" not in self.url:
            return self.url
        return self.url.format_map(template_values(address, delimiter))

    def steering_segment(self, address: str, delimiter: str = "+") -> str | None:
        """Why ``address`` must not be posted through this route, or None when it may: a
        placeholder would make a path segment of ``url`` (or ``verify_url``) "." or "..", or
        empty with more path after it, which an HTTP stack or the receiver's proxy removes or
        merges (nginx: merge_slashes), or would put a "/" or "\\" in it, which receivers that
        decode %2F before routing split; so the request would land on another path
        (``/tenant/{domain}/user/{local}/inbox`` with ``..@example.org`` is
        ``/tenant/example.org/inbox``). An empty last segment (``/in/{user}/{tag}`` without a
        tag) moves nothing and is fine."""
        for template in (self.url, self.verify_url):
            if template is None or "{" not in template:
                continue
            values = template_values(address, delimiter)
            segments = urllib.parse.urlsplit(template).path.split("/")
            filled = [urllib.parse.unquote(s.format_map(values)) for s in segments]
            for i, segment in enumerate(segments):
                if "{" not in segment:
                    continue
                if filled[i] in (".", ".."):
                    return f"{segment} would be {filled[i]!r}"
                if not filled[i] and any(filled[i + 1 :]):
                    return f"{segment} would be empty"
                # sent as %2F, but Go's net/http, nginx's location matching and others
                # decode it before routing: "example.org/user/victim" would be a path
                if "/" in filled[i] or "\\" in filled[i]:
                    return f"{segment} would hold a '/' or '\\'"
        return None


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
        "rcpt": join_address(local, domain),
        "local": local,
        "domain": domain or "",
        "user": user,
        "tag": tag or "",
    }
    # safe="": "/", "?", "#", "@" and "%" are encoded too, so a value stays one path segment;
    # "." and ".." as %2E: no HTTP stack of ours removes them as dot segments (recipients that
    # would make one are refused at RCPT anyway: Route.steering_segment)
    return {
        k: _DOT_SEGMENTS.get(v) or urllib.parse.quote(v.encode("utf-8", "surrogateescape"), safe="")
        for k, v in raw.items()
    }


_DOT_SEGMENTS = {".": "%2E", "..": "%2E%2E"}


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


def split_address(address: str) -> tuple[str, str | None]:
    """(local part, lower-cased domain); the domain is None for an address without '@'.

    The last '@' separates them, since a quoted local part may contain '@' itself.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address, None
    return local, domain.lower()


def join_address(local: str, domain: str | None) -> str:
    return local if domain is None else f"{local}@{domain}"
