"""Recipient -> route: which webhook, payload and policy carry a recipient's copy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved route, ready for delivery (built from the settings once at start-up)."""

    name: str  # the metric label
    url: str
    payload: str = "json"  # "json", "raw" or "multipart"
    secrets: tuple[str, ...] = ()  # "whsec_..." signing secrets; empty: no signature
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 30.0
    retries: int = 2
    include_raw: bool = False
    # overrides of the HTTP status map: keys "404", "4xx", "5xx", "timeout", "error";
    # values a reply such as "451 4.3.0"
    status_map: Mapping[str, str] = field(default_factory=dict)
