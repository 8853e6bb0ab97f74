"""The bridge's settings: defaults < config file (TOML/YAML) < environment < command line.
`load_settings()` loads and checks them once, before trio starts, and reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bridge.base.listen import ListenAddress, parse_listen
from bridge.base.route import check_url_template
from bridge.delivery.routing import compile_match
from bridge.mail.limits import DEFAULT_LIMITS, ParseLimits
from bridge.server.cpus import available_cpus
from bridge.webhook.signing import parse_secret

ENV_PREFIX = "LMTP_BRIDGE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# RFC 2033: LMTP must not be offered on the SMTP port.
SMTP_PORT = 25
# Postfix waits lmtp_data_done_timeout (600 s) for each reply after the data; a recipient's
# tries must end well inside it, whatever the settings say.
MAX_RETRY_BUDGET = 300.0
# RCPT must stay fast: Postfix's smtpd waits for a verify probe 3 x 3 s by default.
MAX_VERIFY_TIMEOUT = 60.0

_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS_KEY = re.compile(r"([2-5][0-9][0-9]|[2-5]xx|timeout|error)")
_STATUS_VALUE = re.compile(r"([245])[0-9][0-9] ([245])\.[0-9]{1,3}\.[0-9]{1,3}")
_FILE_MODE = re.compile(r"0?[0-7]{3,4}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# ---- field checks (each raises ValueError with a message that never repeats a secret) ----


def _split_commas(value: object) -> object:
    # Env vars and flags give lists as "a,b"; files may give a list or the same string.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _workers(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return available_cpus()
    return value


def _json_text(value: object) -> object:
    # Dicts and lists arrive from env vars as JSON text.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    return value


def _none_if_blank(value: object) -> object:
    # An empty env var (VAR=) means "not set" for optional settings.
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _blank_or_lower(value: object) -> object:
    return _lower(_none_if_blank(value))


def _check_listen(addr: str) -> str:
    parsed = parse_listen(addr)
    if parsed.kind == "tcp" and parsed.port == SMTP_PORT:
        raise ValueError(f"{addr!r}: port 25 is refused (RFC 2033 forbids LMTP on the SMTP port)")
    return addr.strip()


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        raise ValueError("not a valid URL (host or port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    check_url_template(url.strip())
    return url.strip()


def _check_secret(secret: SecretStr) -> SecretStr:
    parse_secret(secret.get_secret_value())
    return secret


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"the value of header {name!r} contains CR, LF or NUL")
    return headers


def _check_status_map(mapping: dict[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for raw_key, raw_value in mapping.items():
        key, value = raw_key.strip().lower(), " ".join(raw_value.split())
        if not _STATUS_KEY.fullmatch(key):
            raise ValueError(
                f"key {raw_key!r}: expected a status such as '404', a class such as '5xx', "
                "'timeout' or 'error'"
            )
        match = _STATUS_VALUE.fullmatch(value)
        if not match or match.group(1) != match.group(2):
            raise ValueError(
                f"{raw_key}: {raw_value!r} is not '<code> <x.y.z>' with matching classes, "
                "such as '451 4.3.0'"
            )
        # The one promise: a 2xx reply only for an HTTP 2xx, and failures stay retryable.
        if (key[0] == "2") != (match.group(1) == "2"):
            raise ValueError(f"{raw_key}: only an HTTP 2xx may map to a 2xx reply, and vice versa")
        if key in ("timeout", "error") and match.group(1) != "4":
            raise ValueError(f"{raw_key}: must map to a 4xx reply, so the MTA retries")
        checked[key] = value
    return checked


def _check_match(pattern: str) -> str:
    compile_match(pattern)
    return pattern


def _check_bool_or_path(value: object) -> object:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        if not os.path.exists(value):
            raise ValueError(f"{value!r}: expected true, false or the path of a CA bundle")
        return value
    if not isinstance(value, bool):
        raise ValueError("expected true, false or the path of a CA bundle")
    return value


def _check_file_mode(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML reads 0660 as an int; which base was meant is anyone's guess.
        raise ValueError('give the mode as a quoted octal string, such as "0660"')
    if isinstance(value, str) and not _FILE_MODE.fullmatch(value.strip()):
        raise ValueError(f"{value!r}: expected an octal file mode such as '0660'")
    return value.strip() if isinstance(value, str) else value


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost6"})


def default_hostname() -> str:
    """The host's FQDN as ``hostname -f`` gives it. ``socket.getfqdn()`` alone answers
    "localhost" where /etc/hosts maps the host's name to 127.0.0.1 after "localhost" (some
    container runtimes write it so); a greeting and Received lines naming "localhost" help no
    one, so the host's own name wins then."""
    fqdn = socket.getfqdn()
    name = socket.gethostname()
    if fqdn.lower() in _LOOPBACK_NAMES and name and name.lower() not in _LOOPBACK_NAMES:
        return name
    return fqdn


def _check_hostname(value: str) -> str:
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("expected a host name without spaces")
    return value


def _check_metrics_listen(value: str) -> str:
    if value.strip():
        parsed = parse_listen(value)
        if parsed.kind != "tcp":
            raise ValueError(f"{value!r}: expected HOST:PORT (or empty to disable)")
    return value.strip()


def _check_file(value: str | None) -> str | None:
    if value is not None and not os.path.isfile(value):
        raise ValueError(f"{value!r} is not a readable file")
    return value


def _check_delimiter(value: str) -> str:
    if any(c in value for c in '@"<> \t\r\n'):
        raise ValueError("expected characters such as '+' or '+-', not '@', quotes or spaces")
    return value


def _check_dir(value: str | None) -> str | None:
    if value is not None and not os.path.isdir(value):
        raise ValueError(f"{value!r} is not a directory")
    return value


ListenList = Annotated[
    list[Annotated[str, AfterValidator(_check_listen)]], BeforeValidator(_split_commas)
]
SecretList = Annotated[
    list[Annotated[SecretStr, AfterValidator(_check_secret)]], BeforeValidator(_split_commas)
]
Headers = Annotated[dict[str, str], BeforeValidator(_json_text), AfterValidator(_check_headers)]
StatusMap = Annotated[
    dict[str, str], BeforeValidator(_json_text), AfterValidator(_check_status_map)
]
Url = Annotated[str, AfterValidator(_check_url)]
Payload = Annotated[Literal["json", "raw", "multipart"], BeforeValidator(_lower)]
Delivery = Annotated[Literal["recipient", "message"], BeforeValidator(_lower)]
BoolOrPath = Annotated[bool | str, BeforeValidator(_check_bool_or_path)]
VerifyOnError = Annotated[Literal["accept", "defer"], BeforeValidator(_lower)]
OnParseLimit = Annotated[Literal["deliver", "reject"], BeforeValidator(_lower)]


class RouteConfig(BaseModel):
    """One ``[[routes]]`` entry as configured; unset fields fall back to the global settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(description="Route name, used as the metric label.")
    match: Annotated[str, AfterValidator(_check_match)] = Field(
        description="Recipient pattern: address, @domain, a glob (*@*.example.org) or re:REGEX."
    )
    url: Annotated[Url | None, BeforeValidator(_none_if_blank)] = Field(
        default=None, description="Webhook URL of this route (default: webhook_url)."
    )
    payload: Payload | None = Field(default=None, description="json, raw or multipart.")
    secret: SecretList | None = Field(
        default=None, description="Signing secret(s) of this route; an empty list: no signature."
    )
    headers: Headers | None = Field(
        default=None, description="Extra request headers, merged over webhook_headers."
    )
    timeout: float | None = Field(default=None, gt=0, description="Seconds per request.")
    retries: int | None = Field(default=None, ge=0, description="Extra tries in the session.")
    include_raw: bool | None = Field(default=None, description="Add the raw message to json.")
    status_map: StatusMap | None = Field(
        default=None, description="Overrides of the HTTP status map, merged over status_map."
    )
    # --- payloads, routing and delivery policy ---
    trace_headers: bool | None = Field(
        default=None, description="raw payload: prepend Return-Path, Delivered-To, Received."
    )
    # --- recipient verification at RCPT ---
    verify_url: Annotated[Url | None, BeforeValidator(_none_if_blank)] = Field(
        default=None, description="Recipient verification URL of this route (default: verify_url)."
    )
    verify_timeout: float | None = Field(
        default=None, gt=0, le=MAX_VERIFY_TIMEOUT, description="Seconds per verify request."
    )
    verify_on_error: VerifyOnError | None = Field(
        default=None, description="accept or defer when verify_url gives no usable answer."
    )
    delivery: Delivery | None = Field(
        default=None, description="recipient: one request per recipient; message: one per message."
    )
    on_parse_limit: OnParseLimit | None = Field(
        default=None, description="deliver or reject a message past a parse limit."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _ROUTE_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: expected 1-64 characters of A-Z a-z 0-9 _ . -")
        if name == "default":
            raise ValueError("'default' is reserved for the route of webhook_url")
        if name == "none":  # the metric label of recipients no route matches
            raise ValueError("'none' is reserved for recipients no route matches")
        return name


class Settings(BaseSettings):
    """Every setting of the bridge. Build it with `load_settings()`; ``Settings(**values)``
    takes only the values it is given, never the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    listen: ListenList = Field(
        default=["127.0.0.1:2424"],
        description="Listen addresses, comma-separated: HOST:PORT, [V6]:PORT or unix:/path.",
    )
    webhook_url: Annotated[Url | None, BeforeValidator(_none_if_blank)] = Field(
        default=None, description="URL of the default route (required unless routes are set)."
    )
    payload: Payload = Field(default="json", description="Request body: json, raw or multipart.")
    webhook_secret: SecretList = Field(
        default=[],
        description="Standard Webhooks signing secret(s) whsec_..., comma-separated; unset: none.",
    )
    webhook_headers: Headers = Field(
        default={}, description="Extra request headers, a JSON object (e.g. Authorization)."
    )
    http_timeout: float = Field(
        default=30.0, gt=0, description="Seconds for one webhook request, connect to last byte."
    )
    http_retries: int = Field(
        default=2, ge=0, description="Extra tries inside the session for retryable failures."
    )
    max_message_size: int = Field(
        default=26214400, gt=0, description="Largest message in bytes; advertised as SIZE."
    )
    max_recipients: int = Field(default=1000, gt=0, description="Recipients per transaction.")
    max_connections: int = Field(default=1000, gt=0, description="Concurrent LMTP sessions.")
    idle_timeout: float = Field(
        default=300.0, gt=0, description="Seconds a session may wait for a command line."
    )
    metrics_listen: Annotated[str, AfterValidator(_check_metrics_listen)] = Field(
        default="127.0.0.1:9464",
        description="HOST:PORT of /metrics, /healthz and /readyz; empty disables.",
    )
    hostname: Annotated[str, AfterValidator(_check_hostname)] = Field(
        default_factory=default_hostname,
        description="Name in the greeting and trace headers (default: the host's FQDN).",
    )
    shutdown_grace: float = Field(
        default=25.0, ge=0, description="Seconds to finish transactions after SIGTERM."
    )
    log_format: Annotated[Literal["json", "text"] | None, BeforeValidator(_blank_or_lower)] = Field(
        default=None, description="json or text; unset: text on a TTY, else json."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    spool_threshold: int = Field(
        default=1048576, ge=0, description="Messages larger than this (bytes) spool to a file."
    )
    spool_dir: Annotated[
        str | None, BeforeValidator(_none_if_blank), AfterValidator(_check_dir)
    ] = Field(default=None, description="Directory for spooled messages (default: system temp).")
    spool_memory_limit: int = Field(
        default=67108864,
        ge=0,
        description="Bytes of messages all sessions together hold in memory while receiving;"
        " past it, messages spool to files whatever their size.",
    )
    parse_threads: int = Field(
        default=2,
        gt=0,
        description="Worker threads that parse messages and render their bodies off the event"
        " loop, at most this many at once (a small plain message is parsed on the loop).",
    )
    max_command_errors: int = Field(
        default=10, gt=0, description="Bad commands in a session before 421 and close."
    )
    unix_socket_mode: Annotated[str, BeforeValidator(_check_file_mode)] = Field(
        default="0666", description="Octal file mode of unix listen sockets."
    )
    http_max_connections: int = Field(
        default=100, gt=0, description="Connection pool size of the webhook client."
    )
    http_verify: BoolOrPath = Field(
        default=True,
        description="Verify webhook TLS certificates: true, false or a CA bundle path.",
    )
    log_addresses: bool = Field(
        default=False, description="Put mail addresses in log lines (always at DEBUG)."
    )
    include_raw: bool = Field(
        default=False, description="Add the base64 raw message to json payloads."
    )
    status_map: StatusMap = Field(
        default={},
        description='Overrides of the HTTP status map, e.g. {"404": "550 5.1.1"}; '
        "keys: a status, a class such as 5xx, timeout, error.",
    )
    routes: Annotated[list[RouteConfig], BeforeValidator(_json_text)] = Field(
        default=[], description="Ordered recipient routes; the first match wins."
    )
    trusted_authserv_ids: Annotated[list[str], BeforeValidator(_split_commas)] = Field(
        default=[],
        description="authserv-ids whose Authentication-Results headers are reported.",
    )
    workers: Annotated[int, BeforeValidator(_workers)] = Field(
        default=1,
        ge=1,
        description='Worker processes sharing the listeners; "auto": one per CPU this process '
        "may use (affinity, capped by a cgroup CPU limit).",
    )
    # --- payloads, routing and delivery policy ---
    trace_headers: bool = Field(
        default=True,
        description="raw payload: prepend Return-Path, Delivered-To and Received trace headers.",
    )
    delivery: Delivery = Field(
        default="recipient",
        description="Default route: one request per recipient (recipient) or one per message "
        "with per-recipient verdicts (message).",
    )
    max_verdicts_size: int = Field(
        default=1 << 20,
        ge=4096,
        description="Bytes of a per-message webhook's 2xx answer read for verdicts; a longer "
        "JSON answer defers every recipient (451 4.3.0).",
    )
    recipient_delimiter: Annotated[str, AfterValidator(_check_delimiter)] = Field(
        default="+",
        description="Characters that start an address extension (bob+tag); empty: none.",
    )
    http_retry_budget: float = Field(
        default=120.0,
        gt=0,
        le=MAX_RETRY_BUDGET,
        description="Seconds for all tries and backoff of one recipient; at most 300, half of "
        "Postfix's lmtp_data_done_timeout.",
    )
    # A route's circuit breaker judges the endpoint (bridge/delivery/breaker.py): it opens when
    # at least breaker_min_calls deliveries ended in breaker_window seconds and at least
    # breaker_failure_ratio of them failed at the endpoint (5xx/429 once per recipient).
    breaker_failure_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of a route's deliveries in breaker_window that failed at the endpoint "
        "(connect, TLS, timeout, 5xx/429 counted once per recipient) that opens its breaker.",
    )
    breaker_window: float = Field(
        default=30.0, gt=0, description="Seconds of delivery outcomes a route's breaker judges."
    )
    breaker_min_calls: int = Field(
        default=10,
        ge=0,
        description="Deliveries judged in breaker_window before a breaker may open; 0 disables "
        "the breakers.",
    )
    breaker_cooldown: float = Field(
        default=30.0, gt=0, description="Seconds an open breaker refuses before one probe."
    )
    breaker_threshold: int | None = Field(
        default=None,
        ge=0,
        description="Deprecated: the old name of breaker_min_calls (used when that is not set).",
    )
    # --- recipient verification at RCPT (SPEC 7) ---
    verify_url: Annotated[Url | None, BeforeValidator(_none_if_blank)] = Field(
        default=None,
        description="Recipient verification URL of the default route and of routes without "
        "their own; unset: RCPT is accepted without asking.",
    )
    verify_timeout: float = Field(
        default=5.0, gt=0, le=MAX_VERIFY_TIMEOUT, description="Seconds for one verify request."
    )
    verify_on_error: VerifyOnError = Field(
        default="accept",
        description="No usable verify answer (timeout, connection error, 3xx, 401/403, 429, "
        "5xx): accept the RCPT (the delivery decides) or defer it with the 4xx reply.",
    )
    verify_cache_ttl: float = Field(
        default=300.0, ge=0, description="Seconds a verified (2xx) recipient is remembered."
    )
    verify_negative_ttl: float = Field(
        default=60.0, ge=0, description="Seconds a refused recipient is remembered."
    )
    verify_cache_size: int = Field(
        default=10000, ge=0, description="Verify answers kept (least recently used out); 0: none."
    )
    http_client_cert: Annotated[
        str | None, BeforeValidator(_none_if_blank), AfterValidator(_check_file)
    ] = Field(default=None, description="PEM client certificate for mTLS (may hold the key).")
    http_client_key: Annotated[
        str | None, BeforeValidator(_none_if_blank), AfterValidator(_check_file)
    ] = Field(default=None, description="PEM private key of http_client_cert, if separate.")
    http_trust_env: bool = Field(
        default=False,
        description="Use HTTPS_PROXY/HTTP_PROXY/NO_PROXY (and SSL_CERT_FILE) from the environment.",
    )
    http_follow_redirects: bool = Field(
        default=False, description="Follow 307/308 redirects, re-posting the same body."
    )
    http_max_redirects: int = Field(
        default=3, ge=1, le=20, description="Most redirects followed for one request."
    )
    # --- performance ---
    http_transport: Literal["h11", "httpx"] = Field(
        default="h11",
        description="Webhook HTTP transport: h11 (lean, pooled HTTP/1.1 on trio) or httpx "
        "(httpcore's; always used with http_trust_env, for proxies).",
    )

    # --- protocol depth and hostile input ---
    tls_key_file: Annotated[
        str | None, BeforeValidator(_none_if_blank), AfterValidator(_check_file)
    ] = Field(default=None, description="PEM private key of tls_cert_file, if separate.")
    tls_cert_file: Annotated[
        str | None, BeforeValidator(_none_if_blank), AfterValidator(_check_file)
    ] = Field(
        default=None,
        validate_default=True,
        description="PEM certificate chain for STARTTLS (may hold the key); unset: no STARTTLS.",
    )
    # The content side: how much of a message the json/multipart payloads parse (ParseLimits).
    max_header_block_bytes: int = Field(
        default=DEFAULT_LIMITS.max_header_block_bytes,
        gt=0,
        description="Bytes of one header block (the message's or a MIME part's) parsed; "
        "the fields after it are left out.",
    )
    max_header_count: int = Field(
        default=DEFAULT_LIMITS.max_header_count,
        gt=0,
        description="Header fields of one header block parsed; the rest are left out.",
    )
    max_header_bytes: int = Field(
        default=DEFAULT_LIMITS.max_header_bytes,
        gt=0,
        description="Characters of one header field, unfolded, parsed; the rest is cut.",
    )
    max_encoded_words: int = Field(
        default=DEFAULT_LIMITS.max_encoded_words,
        ge=0,
        description="RFC 2047 encoded-words decoded in one header field; later ones stay encoded.",
    )
    max_addresses_per_header: int = Field(
        default=DEFAULT_LIMITS.max_addresses_per_header,
        gt=0,
        description="Mailboxes read from one address header (From, To, Cc, ...).",
    )
    max_mime_parts: int = Field(
        default=DEFAULT_LIMITS.max_mime_parts,
        gt=0,
        description="MIME parts (multiparts included) parsed; the rest of the message is not.",
    )
    max_mime_depth: int = Field(
        default=DEFAULT_LIMITS.max_mime_depth,
        gt=0,
        description="Multipart and message/* nesting parsed; deeper parts are not.",
    )
    parse_cpu_budget: float = Field(
        default=DEFAULT_LIMITS.parse_cpu_budget,
        gt=0,
        description="CPU seconds for parsing one message; what is not parsed by then is left out.",
    )
    on_parse_limit: OnParseLimit = Field(
        default="deliver",
        description="A message past a parse limit: deliver what was parsed (defects name the "
        "limit) or reject it (554 5.6.0).",
    )
    reply_buffer_size: int = Field(
        default=1048576,
        ge=4096,
        description="Octets of replies held for a client that pipelines without reading them; "
        "past it the session reads no more input until the client reads.",
    )

    @field_validator("tls_cert_file")
    @classmethod
    def _usable_certificate(cls, value: str | None, info: ValidationInfo) -> str | None:
        key = info.data.get("tls_key_file")
        if value is None:
            if key:
                raise ValueError("required when tls_key_file is set")
            return value
        from bridge.server.tls import server_context  # loads the chain: a bad file stops start-up

        server_context(value, key)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() layers file, env and flags itself, to say where a bad value came from.
        return (init_settings,)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            return "WARNING" if value == "WARN" else value
        return value

    @field_validator("listen")
    @classmethod
    def _distinct_listen(cls, addrs: list[str]) -> list[str]:
        if not addrs:
            raise ValueError("at least one listen address is required")
        seen: set[ListenAddress] = set()
        for addr in addrs:
            parsed = parse_listen(addr)
            if parsed in seen and parsed.port != 0:
                raise ValueError(f"{addr!r} is given twice")
            seen.add(parsed)
        return addrs

    @field_validator("routes")
    @classmethod
    def _distinct_names(cls, routes: list[RouteConfig]) -> list[RouteConfig]:
        names = [r.name for r in routes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"route names must be unique: {', '.join(twice)} given twice")
        return routes

    @model_validator(mode="before")
    @classmethod
    def _breaker_threshold_is_min_calls(cls, data: Any) -> Any:
        # breaker_threshold (failures in a row, before the breaker judged the endpoint) still
        # works: its number, as breaker_min_calls, keeps 0 = disabled and its order of size
        if isinstance(data, dict):
            old = str(data.get("breaker_threshold", "")).strip()
            if old.isdigit() and data.get("breaker_min_calls") is None:  # else its own error
                data = {**data, "breaker_min_calls": int(old)}
        return data

    @model_validator(mode="after")
    def _one_url_per_message(self) -> Settings:
        # A per-message request goes to one URL for several recipients: nothing to fill in.
        where = [("webhook_url", self.webhook_url, self.delivery)] + [
            (f"routes[{i}].url", r.url or self.webhook_url, r.delivery or self.delivery)
            for i, r in enumerate(self.routes)
        ]
        for name, url, delivery in where:
            if delivery == "message" and url is not None and "{" in url:
                raise ValueError(
                    f"{name}: recipient placeholders such as {{rcpt}} need delivery = "
                    "recipient; a per-message request serves several recipients"
                )
        return self

    @model_validator(mode="after")
    def _client_key_needs_cert(self) -> Settings:
        if self.http_client_key is not None and self.http_client_cert is None:
            raise ValueError("http_client_key: set http_client_cert too")
        return self

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [parse_listen(addr) for addr in self.listen]

    @property
    def unix_socket_permissions(self) -> int:
        return int(self.unix_socket_mode, 8)

    @property
    def parse_limits(self) -> ParseLimits:
        return ParseLimits(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ParseLimits)}
        )


FIELDS = tuple(Settings.model_fields)
