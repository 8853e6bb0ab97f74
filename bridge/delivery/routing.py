"""Recipient -> route: which webhook, payload and policy carry a recipient's copy."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence

from bridge.base.route import Route, join_address, split_address, split_extension

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
    normalized = join_address(local, domain)
    if is_glob:
        return lambda address, a_local, a_domain: fnmatch.fnmatchcase(address, normalized)
    return lambda address, a_local, a_domain: address == normalized


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
        normalized = join_address(local, domain)
        user, tag = split_extension(local, self._delimiter)
        base = join_address(user, domain) if tag is not None else None
        for fits, exact, route in self._routes:
            if fits(normalized, local, domain):
                return route
            if exact and base is not None and fits(base, user, domain):
                return route
        return self._default
