"""The bounds on parsing one message (``ParseLimits``) and the record of the ones a message hit.

A limit hit never costs the message: what was parsed inside the limits is delivered, with a
``defects`` entry naming the setting; a route may choose to reject such a message instead.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Per-message parse limits; each field is the setting of the same name (README)."""

    max_header_block_bytes: int = 1 << 20  # one header block (the message's or a part's)
    max_header_count: int = 1000  # header fields of one header block
    max_header_bytes: int = 100 * 1024  # one header field, unfolded (Postfix header_size_limit)
    max_encoded_words: int = 1000  # RFC 2047 encoded-words decoded in one header field
    max_addresses_per_header: int = 1000  # mailboxes read from one address header
    max_mime_parts: int = 1000  # MIME parts of the message, multiparts included
    max_mime_depth: int = 50  # multipart and message/* nesting
    parse_cpu_budget: float = 2.0  # CPU seconds for parsing one message


DEFAULT_LIMITS = ParseLimits()


@dataclass(slots=True)
class ParseState:
    """One message's parse under way: its limits, its CPU deadline, the limits it hit."""

    limits: ParseLimits = DEFAULT_LIMITS
    deadline: float = float("inf")  # time.thread_time() value
    hits: list[str] = field(default_factory=list)  # defect lines, in order
    names: set[str] = field(default_factory=set)  # the settings hit
    # Header objects the stdlib parsed in this message, by (name, value): the feed parser and
    # Message's getters fetch each part's Content-Type half a dozen times, ~0.3 ms each.
    headers: dict[tuple[str, str], object] = field(default_factory=dict)

    @classmethod
    def start(cls, limits: ParseLimits) -> ParseState:
        return cls(limits, time.thread_time() + limits.parse_cpu_budget)

    def hit(self, where: str, setting: str, what: str) -> None:
        """Record that ``setting`` was reached at ``where``; ``what`` says what it cost."""
        value = getattr(self.limits, setting)
        self.note(where, f"parse limit {setting} = {value} reached; {what}")
        self.names.add(setting)

    def note(self, where: str, what: str) -> None:
        """A defect of the parse that is no limit of the settings."""
        line = f"{where}: {what}"
        if line not in self.hits:
            self.hits.append(line)

    def out_of_time(self, where: str) -> bool:
        """True (and recorded) once the message's CPU budget is spent."""
        if time.thread_time() < self.deadline:
            return False
        self.hit(where, "parse_cpu_budget", "the rest of the message is not parsed")
        return True


# The parse under way in this thread (or task): the email policy's header parse reads its limits.
# Outside a parse: the default limits, hits recorded nowhere that matters.
_CURRENT: contextvars.ContextVar[ParseState | None] = contextvars.ContextVar(
    "bridge_parse_state", default=None
)


def current() -> ParseState:
    state = _CURRENT.get()
    return state if state is not None else ParseState()


def begin(state: ParseState) -> contextvars.Token[ParseState | None]:
    return _CURRENT.set(state)


def end(token: contextvars.Token[ParseState | None]) -> None:
    _CURRENT.reset(token)
