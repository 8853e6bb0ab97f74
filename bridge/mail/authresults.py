"""``Authentication-Results`` (RFC 8601) -> ``message.auth``: the SPF, DKIM, DMARC and ARC
verdicts of the authserv-ids the operator trusts; every other such header is ignored."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

METHODS = ("spf", "dkim", "dmarc", "arc")

_METHOD = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:/\s*[0-9]+\s*)?=\s*([A-Za-z0-9_-]+)")
_PROPERTY = re.compile(
    r"(reason|[A-Za-z0-9_-]+\s*\.\s*[A-Za-z0-9_.-]+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^\s;\"]+)"
)


def strip_comments(text: str) -> str:
    """The header value without its (comments), which may nest; quoted strings are kept."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for c in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(c)
            continue
        if c == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                out.append(c)
            continue
        if quoted:
            out.append(c)
            if c == '"':
                quoted = False
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            if depth == 0:
                out.append(" ")
        elif depth == 0:
            out.append(c)
            if c == '"':
                quoted = True
    return "".join(out)


def _split_semicolons(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ";" and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(c)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_authentication_results(value: str) -> tuple[str, list[dict[str, Any]]] | None:
    """(authserv-id, results) of one header value; None when it does not parse.

    Each result is ``{"method": "dkim", "result": "pass", "reason": str | None,
    "properties": {"header.d": "example.org", ...}}`` with method, result and property
    names in lower case.
    """
    parts = _split_semicolons(strip_comments(value))
    head = parts[0].split()
    if not head:
        return None
    authserv_id = _unquote(head[0]).lower()
    results: list[dict[str, Any]] = []
    for resinfo in parts[1:]:
        match = _METHOD.match(resinfo)
        if match is None:
            continue  # "none", or something we cannot read
        props: dict[str, str] = {}
        reason: str | None = None
        for name, raw in _PROPERTY.findall(resinfo[match.end() :]):
            key = "".join(name.split()).lower()
            if key == "reason":
                reason = _unquote(raw)
            else:
                props.setdefault(key, _unquote(raw))
        results.append(
            {
                "method": match.group(1).lower(),
                "result": match.group(2).lower(),
                "reason": reason,
                "properties": props,
            }
        )
    return authserv_id, results


def auth_verdicts(values: Iterable[str], trusted_ids: Iterable[str]) -> dict[str, Any] | None:
    """``message.auth`` from the message's Authentication-Results values, top (newest) first.

    Only headers whose authserv-id is trusted count; None when there is none. ``spf``,
    ``dmarc`` and ``arc`` are the first verdict found (or null), ``dkim`` lists every DKIM
    verdict (one per signature). The border MTA must remove such headers that arrive from
    outside with a trusted id (RFC 8601 section 5), or a sender could forge them.
    """
    trusted = {t.strip().lower() for t in trusted_ids if t.strip()}
    if not trusted:
        return None
    auth: dict[str, Any] = {
        "authserv_id": None,
        "spf": None,
        "dkim": [],
        "dmarc": None,
        "arc": None,
    }
    found = False
    for value in values:
        try:
            parsed = parse_authentication_results(value)
        except Exception:  # hostile input must not cost the message
            continue
        if parsed is None or parsed[0] not in trusted:
            continue
        authserv_id, results = parsed
        if not found:
            auth["authserv_id"] = authserv_id
            found = True
        for result in results:
            method = result.pop("method")
            if method == "dkim":
                auth["dkim"].append(result)
            elif method in METHODS and auth[method] is None:
                auth[method] = result
    return auth if found else None
