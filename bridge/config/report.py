"""What the operator sees of the configuration: each problem as one line naming the setting and
where it came from, and the effective settings with every secret redacted."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bridge.config.settings import Settings

REDACTED = "**********"
# Fields whose values are never echoed in a problem line (secrets, header values).
_SENSITIVE_FIELDS = frozenset({"webhook_secret", "secret", "webhook_headers", "headers"})
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
_PLACEHOLDER = re.compile(r"(\{[a-z]+\})+")  # a route URL's {rcpt}, {domain}...: not a value


class ConfigError(Exception):
    """An invalid configuration; ``problems`` holds one line per problem, naming the setting."""

    def __init__(self, problems: list[str]) -> None:
        problems = [redact_urls(p) for p in problems]  # never echo a URL's credentials
        super().__init__("\n".join(problems))
        self.problems = problems


def describe(err: Any, origin: Mapping[str, str]) -> str:
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    msg = err["msg"].removeprefix("Value error, ")
    line = f"{loc[0]}{where}: {msg}" if loc else msg
    source = origin.get(str(loc[0])) if loc else None
    if source is None:
        return one_line(line)
    value = err.get("input")
    shown = repr(value)
    # Never echo what may hold a secret: secrets, headers, or a whole route.
    hidden = (
        _SENSITIVE_FIELDS.intersection(str(p) for p in loc)
        or (loc[0] == "routes" and len(loc) < 3)
        or isinstance(value, dict | list)
    )
    if err["type"] == "missing" or hidden or shown in msg:
        return one_line(f"{line} (from {source})")
    shown = redact_urls(shown)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return one_line(f"{line} (got {shown} from {source})")


def one_line(text: str) -> str:
    """``text`` on one line, every URL in it redacted (a problem line may quote a value)."""
    return redact_urls(" ".join(text.split()))


def redact_urls(text: str) -> str:
    """``text`` with every ``scheme://...`` in it passed through ``redact_url``."""
    return _URL.sub(lambda m: redact_url(m.group()), text)


def redact_url(url: str) -> str:
    """``url`` for display: user info (user and password), every query value and any fragment
    replaced by "**********"; a route URL's placeholders are kept."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[": nothing of it is shown
        return f"{url.partition('://')[0]}://{REDACTED}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = "&".join(_redact_query_item(item) for item in parts.query.split("&") if item)
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_query_item(item: str) -> str:
    name, eq, value = item.partition("=")
    if not eq:  # a bare item may be a token itself
        return item if _PLACEHOLDER.fullmatch(name) else REDACTED
    return item if not value or _PLACEHOLDER.fullmatch(value) else f"{name}={REDACTED}"


# ---- display ----


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, for `check-config`: secrets, every header value,
    URL user info and query values are "**********"."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    data["webhook_url"] = _redact_optional_url(data["webhook_url"])
    data["verify_url"] = _redact_optional_url(data["verify_url"])
    data["webhook_headers"] = _redact_headers(data["webhook_headers"])
    for route in data["routes"]:
        route["url"] = _redact_optional_url(route["url"])
        route["verify_url"] = _redact_optional_url(route["verify_url"])
        route["headers"] = _redact_headers(route["headers"])
    return data


def _redact_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    # Any header may carry a credential (X-Hook-Pass, X-Tenant-Key...): names only.
    if headers is None:
        return None
    return dict.fromkeys(headers, REDACTED)


def _redact_optional_url(url: str | None) -> str | None:
    return None if url is None else redact_url(url)
