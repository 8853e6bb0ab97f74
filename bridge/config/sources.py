"""Where settings come from, in rising priority: defaults, a TOML or YAML file, the environment
(``LMTP_BRIDGE_<NAME>`` or ``<NAME>_FILE``), the command line. ``load_settings`` merges and
checks them."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping

import yaml
from pydantic import ValidationError

from bridge.config.report import ConfigError, describe, one_line
from bridge.config.settings import CONFIG_ENV, ENV_PREFIX, FIELDS, Settings, _json_text


def load_settings(
    config_file: str | None = None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults < file (`config_file` or LMTP_BRIDGE_CONFIG) < environment < `overrides`.

    `overrides` are the command-line flags by setting name; None values mean "not given".
    Raises ConfigError with every problem found.
    """
    env = {k.upper(): (k, v) for k, v in (os.environ if environ is None else environ).items()}
    problems: list[str] = []
    values: dict[str, object] = {}
    origin: dict[str, str] = {}

    path = config_file
    if path is None and CONFIG_ENV in env:
        path = env[CONFIG_ENV][1]
    if path:
        for key, value in _read_file(path, problems).items():
            values[key], origin[key] = value, path
    for key, (name, value) in _read_env(env, problems).items():
        values[key], origin[key] = value, name
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], origin[key] = value, "the command line"

    for key in [k for k in values if k not in FIELDS]:
        problems.append(f"{key}: unknown setting (from {origin[key]})")
        del values[key]

    settings: Settings | None = None
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems.extend(describe(err, origin) for err in exc.errors())
    problems.extend(_check_urls(values))
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def _read_file(path: str, problems: list[str]) -> dict[str, object]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".yaml", ".yml"):
        problems.append(f"config: {path}: expected a .toml, .yaml or .yml file")
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if ext == ".toml" else yaml.safe_load(f)
    except OSError as exc:
        problems.append(f"config: cannot read {path}: {exc.strerror or exc}")
        return {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        problems.append(f"config: {path} does not parse: {one_line(str(exc))}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"config: {path}: expected a table of settings at the top")
        return {}
    return {str(k): v for k, v in data.items()}


def _read_env(
    env: Mapping[str, tuple[str, str]], problems: list[str]
) -> dict[str, tuple[str, str]]:
    """Setting -> (variable name, value), from LMTP_BRIDGE_<NAME> or LMTP_BRIDGE_<NAME>_FILE."""
    found: dict[str, tuple[str, str]] = {}
    for field in FIELDS:
        direct = env.get(f"{ENV_PREFIX}{field}".upper())
        from_file = env.get(f"{ENV_PREFIX}{field}_FILE".upper())
        if direct and from_file:
            problems.append(f"{field}: both {direct[0]} and {from_file[0]} are set; use one")
        elif direct:
            found[field] = direct
        elif from_file:
            name, path = from_file
            try:
                with open(path, encoding="utf-8") as f:
                    found[field] = (name, f.read().rstrip("\r\n"))
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                problems.append(f"{field}: cannot read {name}={path}: {reason or exc}")
    return found


def _check_urls(values: Mapping[str, object]) -> list[str]:
    """Every route needs a URL: its own or webhook_url. Works on the raw values, so it reports
    even when other settings failed validation."""
    url = values.get("webhook_url")
    if url is not None and not (isinstance(url, str) and not url.strip()):
        return []
    routes = values.get("routes", [])
    try:
        routes = _json_text(routes)
    except ValueError:
        return []  # already reported as a routes problem
    if not isinstance(routes, list):
        return []
    if not routes:
        return ["webhook_url: required unless routes are configured"]
    return [
        f"routes[{i}].url: required, since webhook_url is not set"
        for i, route in enumerate(routes)
        if isinstance(route, Mapping) and not str(route.get("url") or "").strip()
    ]


# Kubernetes "service links": for a Service named lmtp-bridge (or lmtp-bridge-<x>) in the pod's
# namespace, every container gets LMTP_BRIDGE_[<X>_]SERVICE_HOST, ..._SERVICE_PORT[_<NAME>],
# ..._PORT=tcp://IP:PORT and ..._PORT_<N>_TCP[_PROTO|_PORT|_ADDR]. They name no setting, but
# they are no typo either: never reported (a pod must not fail check-config for its own Service).
_SERVICE_LINK_NAME = re.compile(r"(?:[A-Z0-9_]+_)?SERVICE_(?:HOST|PORT(?:_[A-Z0-9_]+)?)", re.ASCII)
_SERVICE_LINK_URL_NAME = re.compile(r"(?:[A-Z0-9_]+_)?PORT(?:_[0-9]+_(?:TCP|UDP|SCTP))?", re.ASCII)
_SERVICE_LINK_PART_NAME = re.compile(
    r"(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_(?:PROTO|PORT|ADDR)", re.ASCII
)
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://\S+", re.ASCII)


def _is_service_link(suffix: str, value: str) -> bool:
    """``suffix`` (the name after LMTP_BRIDGE_) with ``value`` is a Kubernetes service link;
    the ``..._PORT`` form only with the ``tcp://IP:PORT`` value Kubernetes gives it."""
    if _SERVICE_LINK_NAME.fullmatch(suffix) or _SERVICE_LINK_PART_NAME.fullmatch(suffix):
        return True
    return bool(
        _SERVICE_LINK_URL_NAME.fullmatch(suffix) and _SERVICE_LINK_URL.fullmatch(value.strip())
    )


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per ``LMTP_BRIDGE_*`` variable that names no setting (a typo such as
    LMTP_BRIDGE_HTTP_TIMOUT would otherwise be ignored without a word), with the closest name.
    Kubernetes service-link variables are left alone."""
    known = {CONFIG_ENV}
    for field in FIELDS:
        known.update((f"{ENV_PREFIX}{field}".upper(), f"{ENV_PREFIX}{field}_FILE".upper()))
    environ = os.environ if environ is None else environ
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if _is_service_link(upper[len(ENV_PREFIX) :], environ[name]):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name}: unknown environment variable, no setting has this name{hint}")
    return lines
