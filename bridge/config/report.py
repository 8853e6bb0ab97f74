"""What the operator sees of the configuration: each problem as one line naming the setting and
where it came from, and the effective settings with every secret redacted."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bridge.config.settings import Settings

REDACTED = "**********"
_SENSITIVE_HEADER = re.compile(r"auth|token|secret|key|cookie|signature|password", re.I)
_SENSITIVE_FIELDS = frozenset({"webhook_secret", "secret", "webhook_headers", "headers"})


class ConfigError(Exception):
    """An invalid configuration; ``problems`` holds one line per problem, naming the setting."""

    def __init__(self, problems: list[str]) -> None:
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
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return one_line(f"{line} (got {shown} from {source})")


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- display ----


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, for `check-config`: secrets are "**********"."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    data["webhook_url"] = _redact_url(data["webhook_url"])
    data["webhook_headers"] = _redact_headers(data["webhook_headers"])
    for route in data["routes"]:
        route["url"] = _redact_url(route["url"])
        route["headers"] = _redact_headers(route["headers"])
    return data


def _redact_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    if headers is None:
        return None
    return {k: REDACTED if _SENSITIVE_HEADER.search(k) else v for k, v in headers.items()}


def _redact_url(url: str | None) -> str | None:
    # A URL may carry a password or a token in its query string.
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(_SENSITIVE_HEADER.search(k) for k, _ in query):
        hidden = [(k, REDACTED if _SENSITIVE_HEADER.search(k) else v) for k, v in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)
