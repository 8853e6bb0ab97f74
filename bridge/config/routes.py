"""The configured routes resolved against the global settings: the Router that delivery uses."""

from __future__ import annotations

from collections.abc import Mapping

from bridge.base.route import Route
from bridge.config.settings import RouteConfig, Settings
from bridge.delivery.routing import Router


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
            verify_url=settings.verify_url,
            verify_timeout=settings.verify_timeout,
            verify_on_error=settings.verify_on_error,
            delivery=settings.delivery,
            on_parse_limit=settings.on_parse_limit,
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
        verify_url=rc.verify_url or settings.verify_url,
        verify_timeout=settings.verify_timeout if rc.verify_timeout is None else rc.verify_timeout,
        verify_on_error=rc.verify_on_error or settings.verify_on_error,
        delivery=rc.delivery or settings.delivery,
        on_parse_limit=rc.on_parse_limit or settings.on_parse_limit,
    )


def _merge_headers(base: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    # Header names are case-insensitive: a route's "authorization" replaces "Authorization".
    mine = {name.lower() for name in own}
    merged = {name: value for name, value in base.items() if name.lower() not in mine}
    merged.update(own)
    return merged
