"""Settings: defaults, the file < env < flags layering, `_FILE` secrets and error reporting."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from bridge.base.listen import ListenAddress, parse_listen
from bridge.config import REDACTED, ConfigError, Settings, load_settings, redacted_dump

URL = "http://127.0.0.1:8080/hook"
SECRET = "whsec_" + base64.b64encode(b"s3cr3t-key-material-0123456789ab").decode()
SECRET2 = "whsec_" + base64.b64encode(b"another-key-material-0123456789").decode()
BARE_SECRET = base64.b64encode(b"bare-base64-secret-without-prefix").decode()


def problems_of(**kwargs: object) -> list[str]:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_defaults_match_the_spec() -> None:
    s = load_settings(environ={"LMTP_BRIDGE_WEBHOOK_URL": URL})
    assert s.listen == ["127.0.0.1:2424"]
    assert s.webhook_url == URL
    assert s.payload == "json"
    assert s.webhook_secret == []
    assert s.webhook_headers == {}
    assert s.http_timeout == 30
    assert s.http_retries == 2
    assert s.max_message_size == 26214400
    assert s.max_recipients == 1000
    assert s.max_connections == 1000
    assert s.idle_timeout == 300
    assert s.metrics_listen == "127.0.0.1:9464"
    assert s.hostname  # the host's FQDN
    assert s.shutdown_grace == 25
    assert s.log_format is None
    assert s.log_level == "INFO"
    assert s.spool_threshold == 1048576
    assert s.spool_dir is None
    assert s.max_command_errors == 10
    assert s.unix_socket_mode == "0666"
    assert s.unix_socket_permissions == 0o666
    assert s.http_max_connections == 100
    assert s.http_verify is True
    assert s.log_addresses is False
    assert s.include_raw is False
    assert s.status_map == {}
    assert s.routes == []
    assert s.workers == 1


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_readme_lists_every_per_route_key() -> None:
    import re

    from bridge.config import RouteConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sentence = readme.split("A route may set its own", 1)[1].split(";", 1)[0]
    assert set(re.findall(r"`(\w+)`", sentence)) - {"webhook_headers"} == (
        set(RouteConfig.model_fields) - {"name", "match"}
    )


def test_without_url_or_routes_the_url_is_required() -> None:
    assert problems_of() == ["webhook_url: required unless routes are configured"]


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.toml"
    conf.write_text(
        f'webhook_url = "{URL}"\nhttp_timeout = 5\nhttp_retries = 7\nmax_recipients = 3\n'
    )
    env = {"LMTP_BRIDGE_HTTP_TIMEOUT": "6", "LMTP_BRIDGE_HTTP_RETRIES": "8"}
    s = load_settings(str(conf), overrides={"http_retries": 9, "payload": None}, environ=env)
    assert s.max_recipients == 3  # file only
    assert s.http_timeout == 6  # env beats file
    assert s.http_retries == 9  # flag beats env
    assert s.payload == "json"  # a flag not given (None) changes nothing


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.yml"
    conf.write_text(f"webhook_url: {URL}\nmax_connections: 12\n")
    s = load_settings(environ={"LMTP_BRIDGE_CONFIG": str(conf)})
    assert s.max_connections == 12


def test_environment_names_are_case_insensitive() -> None:
    s = load_settings(environ={"lmtp_bridge_webhook_url": URL, "Lmtp_Bridge_Workers": "4"})
    assert (s.webhook_url, s.workers) == (URL, 4)


def test_toml_file_with_two_routes(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.toml"
    conf.write_text(
        f"""
listen = ["127.0.0.1:2424", "unix:/run/lmtp.sock"]
webhook_url = "{URL}"
payload = "raw"

[webhook_headers]
Authorization = "Bearer t0ken"

[[routes]]
name = "support"
match = "@support.example.org"
url = "https://support.example.org/in"
payload = "multipart"
secret = "{SECRET},{SECRET2}"
timeout = 3.5

[[routes]]
name = "catch.all-2"
match = "re:.*@example\\\\.org"
headers = {{ X-Team = "ops" }}
status_map = {{ "404" = "450 4.1.1" }}
"""
    )
    s = load_settings(str(conf), environ={})
    assert s.listen == ["127.0.0.1:2424", "unix:/run/lmtp.sock"]
    assert s.listen_addresses == [
        ListenAddress("tcp", "127.0.0.1", 2424),
        ListenAddress("unix", path="/run/lmtp.sock"),
    ]
    assert s.payload == "raw"
    assert s.webhook_headers == {"Authorization": "Bearer t0ken"}
    first, second = s.routes
    assert first.name == "support"
    assert first.url == "https://support.example.org/in"
    assert first.payload == "multipart"
    assert [x.get_secret_value() for x in first.secret or []] == [SECRET, SECRET2]
    assert first.timeout == 3.5
    assert second.name == "catch.all-2"
    assert second.match == r"re:.*@example\.org"
    assert second.url is None  # falls back to webhook_url in the router
    assert second.headers == {"X-Team": "ops"}
    assert second.status_map == {"404": "450 4.1.1"}


def test_yaml_file(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.yaml"
    conf.write_text(
        f"""
listen: "127.0.0.1:2424, [::1]:2425"
webhook_secret:
  - {SECRET}
  - {BARE_SECRET}
http_verify: no
log_format: TEXT
log_level: warn
routes:
  - name: bob
    match: bob@example.org
    url: {URL}
    retries: 0
    include_raw: true
"""
    )
    s = load_settings(str(conf), environ={})
    assert s.listen_addresses == [
        ListenAddress("tcp", "127.0.0.1", 2424),
        ListenAddress("tcp", "::1", 2425),
    ]
    assert [x.get_secret_value() for x in s.webhook_secret] == [SECRET, BARE_SECRET]
    assert s.http_verify is False
    assert (s.log_format, s.log_level) == ("text", "WARNING")
    assert s.webhook_url is None  # allowed: the route has its own url
    (route,) = s.routes
    assert (route.name, route.retries, route.include_raw) == ("bob", 0, True)


def test_secret_from_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_WEBHOOK_SECRET_FILE": str(secret_file)}
    s = load_settings(environ=env)
    assert [x.get_secret_value() for x in s.webhook_secret] == [SECRET]


def test_any_setting_reads_from_file(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text(URL + "\r\n")
    s = load_settings(environ={"LMTP_BRIDGE_WEBHOOK_URL_FILE": str(url_file)})
    assert s.webhook_url == URL


def test_file_variable_problems(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    both = {
        "LMTP_BRIDGE_WEBHOOK_URL": URL,
        "LMTP_BRIDGE_WEBHOOK_SECRET": SECRET,
        "LMTP_BRIDGE_WEBHOOK_SECRET_FILE": str(secret_file),
    }
    (problem,) = problems_of(environ=both)
    assert problem.startswith("webhook_secret: both LMTP_BRIDGE_WEBHOOK_SECRET and")
    missing = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_WEBHOOK_SECRET_FILE": "/nonexistent/x"}
    (problem,) = problems_of(environ=missing)
    assert problem.startswith("webhook_secret: cannot read LMTP_BRIDGE_WEBHOOK_SECRET_FILE")


def test_comma_separated_lists_from_environment() -> None:
    env = {
        "LMTP_BRIDGE_WEBHOOK_URL": URL,
        "LMTP_BRIDGE_LISTEN": "127.0.0.1:2424, [::1]:2424,unix:/tmp/lmtp.sock",
        "LMTP_BRIDGE_WEBHOOK_SECRET": f"{SECRET}, {SECRET2}",
        "LMTP_BRIDGE_TRUSTED_AUTHSERV_IDS": "mx1.example.org,mx2.example.org",
    }
    s = load_settings(environ=env)
    assert s.listen == ["127.0.0.1:2424", "[::1]:2424", "unix:/tmp/lmtp.sock"]
    assert [x.get_secret_value() for x in s.webhook_secret] == [SECRET, SECRET2]
    assert s.trusted_authserv_ids == ["mx1.example.org", "mx2.example.org"]


def test_json_objects_from_environment() -> None:
    env = {
        "LMTP_BRIDGE_WEBHOOK_URL": URL,
        "LMTP_BRIDGE_WEBHOOK_HEADERS": '{"Authorization": "Bearer abc", "X-Env": "prod"}',
        "LMTP_BRIDGE_STATUS_MAP": '{"404": "451 4.1.1", "5XX": "452 4.3.0"}',
        "LMTP_BRIDGE_ROUTES": json.dumps([{"name": "r1", "match": "*@*.example.org"}]),
    }
    s = load_settings(environ=env)
    assert s.webhook_headers == {"Authorization": "Bearer abc", "X-Env": "prod"}
    assert s.status_map == {"404": "451 4.1.1", "5xx": "452 4.3.0"}
    assert [r.name for r in s.routes] == ["r1"]


def test_many_problems_are_reported_together_one_line_each() -> None:
    env = {
        "LMTP_BRIDGE_WEBHOOK_URL": "ftp://example.org/x",
        "LMTP_BRIDGE_HTTP_TIMEOUT": "abc",
        "LMTP_BRIDGE_HTTP_RETRIES": "-1",
        "LMTP_BRIDGE_MAX_RECIPIENTS": "0",
        "LMTP_BRIDGE_PAYLOAD": "xml",
        "LMTP_BRIDGE_LISTEN": "localhost",
        "LMTP_BRIDGE_METRICS_LISTEN": "nope",
        "LMTP_BRIDGE_WEBHOOK_HEADERS": "{not json",
        "LMTP_BRIDGE_LOG_FORMAT": "xml",
        "LMTP_BRIDGE_UNIX_SOCKET_MODE": "999",
    }
    problems = problems_of(environ=env)
    named = [p.split(":", 1)[0] for p in problems]
    assert named == [
        "listen[0]",
        "webhook_url",
        "payload",
        "webhook_headers",
        "http_timeout",
        "http_retries",
        "max_recipients",
        "metrics_listen",
        "log_format",
        "unix_socket_mode",
    ]
    assert all("\n" not in p for p in problems)
    assert (
        "http_timeout: Input should be a valid number, unable to parse string as a number "
        "(got 'abc' from LMTP_BRIDGE_HTTP_TIMEOUT)"
    ) in problems


def test_problems_in_a_file_name_the_file_and_the_route(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.toml"
    conf.write_text(
        """
listn = "127.0.0.1:2424"

[[routes]]
name = "ok"
match = "@example.org"

[[routes]]
name = "bad name!"
match = "re:(unclosed"
timeout = 0
"""
    )
    problems = problems_of(config_file=str(conf))
    assert f"listn: unknown setting (from {conf})" in problems
    assert any(p.startswith("routes[1].name: 'bad name!'") for p in problems)
    assert any(p.startswith("routes[1].match: invalid regular expression") for p in problems)
    assert any(p.startswith("routes[1].timeout: Input should be greater than 0") for p in problems)
    # No webhook_url: every route needs its own url, reported alongside the other problems.
    assert "routes[0].url: required, since webhook_url is not set" in problems
    assert "routes[1].url: required, since webhook_url is not set" in problems


def test_unreadable_or_unparsable_file(tmp_path: Path) -> None:
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL}
    (problem,) = problems_of(config_file=str(tmp_path / "missing.toml"), environ=env)
    assert problem.startswith("config: cannot read")
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [\n")
    (problem,) = problems_of(config_file=str(broken), environ=env)
    assert problem.startswith(f"config: {broken} does not parse")
    other = tmp_path / "bridge.ini"
    other.write_text("")
    (problem,) = problems_of(config_file=str(other), environ=env)
    assert "expected a .toml, .yaml or .yml file" in problem


@pytest.mark.parametrize("addr", ["127.0.0.1:25", "[::1]:25", "mail.example.org:25"])
def test_port_25_is_refused(addr: str) -> None:
    (problem,) = problems_of(environ={"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_LISTEN": addr})
    assert problem.startswith("listen[0]:")
    assert "port 25 is refused" in problem


def test_listen_needs_an_address_and_no_duplicates() -> None:
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_LISTEN": ""}
    assert problems_of(environ=env)[0].startswith("listen: at least one listen address")
    env["LMTP_BRIDGE_LISTEN"] = "127.0.0.1:2424,127.0.0.1:2424"
    assert "given twice" in problems_of(environ=env)[0]


def test_bad_secrets_are_reported_without_their_value() -> None:
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_WEBHOOK_SECRET": "whsec_short,not*base64"}
    problems = problems_of(environ=env)
    assert [p.split(":", 1)[0] for p in problems] == ["webhook_secret[0]", "webhook_secret[1]"]
    assert not any("short" in p or "not*base64" in p for p in problems)


def test_status_map_keys_and_values_are_checked() -> None:
    def problem(mapping: dict[str, str]) -> str:
        env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_STATUS_MAP": json.dumps(mapping)}
        (p,) = problems_of(environ=env)
        assert p.startswith("status_map: ")
        return p

    assert "key 'teapot'" in problem({"teapot": "451 4.3.0"})
    assert "'<code> <x.y.z>'" in problem({"404": "550"})
    assert "'<code> <x.y.z>'" in problem({"404": "550 4.1.1"})  # classes disagree
    assert "only an HTTP 2xx" in problem({"5xx": "250 2.0.0"})  # would lose mail
    assert "4xx reply" in problem({"timeout": "554 5.0.0"})


def test_duplicate_and_reserved_route_names() -> None:
    routes = [
        {"name": "a", "match": "@a.example"},
        {"name": "a", "match": "@b.example"},
    ]
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_ROUTES": json.dumps(routes)}
    (p,) = problems_of(environ=env)
    assert p.startswith("routes: route names must be unique: a given twice")
    routes = [{"name": "default", "match": "@a.example"}]
    env["LMTP_BRIDGE_ROUTES"] = json.dumps(routes)
    (p,) = problems_of(environ=env)
    assert p.startswith("routes[0].name: 'default' is reserved")
    env["LMTP_BRIDGE_ROUTES"] = json.dumps([{"name": "none", "match": "@a.example"}])
    (p,) = problems_of(environ=env)
    assert p.startswith("routes[0].name: 'none' is reserved")  # the label of unrouted ones


def test_yaml_octal_mode_must_be_quoted(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.yml"
    conf.write_text(f"webhook_url: {URL}\nunix_socket_mode: 0660\n")
    (p,) = problems_of(config_file=str(conf))
    assert p.startswith("unix_socket_mode: give the mode as a quoted octal string")
    conf.write_text(f"webhook_url: {URL}\nunix_socket_mode: '0660'\n")
    assert load_settings(str(conf), environ={}).unix_socket_permissions == 0o660


def test_http_verify_takes_a_ca_bundle_path(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_HTTP_VERIFY": str(bundle)}
    assert load_settings(environ=env).http_verify == str(bundle)


def test_empty_metrics_listen_disables_and_blank_optional_is_unset() -> None:
    env = {
        "LMTP_BRIDGE_WEBHOOK_URL": URL,
        "LMTP_BRIDGE_METRICS_LISTEN": "",
        "LMTP_BRIDGE_SPOOL_DIR": "",
        "LMTP_BRIDGE_LOG_FORMAT": "",
    }
    s = load_settings(environ=env)
    assert (s.metrics_listen, s.spool_dir, s.log_format) == ("", None, None)


def test_overrides_from_the_command_line_are_named_in_problems() -> None:
    problems = problems_of(overrides={"webhook_url": URL, "listen": ["127.0.0.1:25"]})
    assert problems == [
        "listen[0]: '127.0.0.1:25': port 25 is refused "
        "(RFC 2033 forbids LMTP on the SMTP port) (from the command line)"
    ]


def test_redacted_dump_never_contains_secrets(tmp_path: Path) -> None:
    conf = tmp_path / "bridge.toml"
    conf.write_text(
        f"""
webhook_url = "https://user:pa55word@hooks.example.org/in?token=t0k3n&team=ops"
webhook_secret = "{SECRET}"
webhook_headers = {{ Authorization = "Bearer b34rer", X-Team = "ops" }}

[[routes]]
name = "r"
match = "@example.org"
secret = ["{SECRET2}"]
headers = {{ X-Api-Key = "k3y" }}
"""
    )
    s = load_settings(str(conf), environ={})
    dump = redacted_dump(s)
    text = json.dumps(dump)
    for secret in (SECRET, SECRET2, "pa55word", "t0k3n", "b34rer", "k3y"):
        assert secret not in text
    assert dump["webhook_secret"] == [REDACTED]
    assert dump["routes"][0]["secret"] == [REDACTED]
    # every header value: a name says nothing about whether its value is a credential
    assert dump["webhook_headers"] == {"Authorization": REDACTED, "X-Team": REDACTED}
    assert dump["routes"][0]["headers"] == {"X-Api-Key": REDACTED}
    assert dump["webhook_url"] == (
        f"https://{REDACTED}@hooks.example.org/in?token={REDACTED}&team={REDACTED}"
    )
    assert SECRET not in repr(s) and SECRET not in str(s)


def test_check_config_prints_no_header_value_user_info_or_query_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge import cli

    routes = [{"name": "r", "match": "@x.org", "url": "https://h.example/{domain}?to={rcpt}&k=v"}]
    env = {
        "LMTP_BRIDGE_WEBHOOK_URL": "https://T0KEN@hooks.example.org/in?sig=S1G&x",
        "LMTP_BRIDGE_WEBHOOK_HEADERS": json.dumps({"X-Hook-Pass": "hunter2", "X-Team": "0ps"}),
        "LMTP_BRIDGE_ROUTES": json.dumps(routes),
    }
    for name in list(os.environ):
        if name.startswith("LMTP_BRIDGE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    for secret in ("T0KEN", "S1G", "hunter2", "0ps", "=v"):
        assert secret not in out
    dump = json.loads(out)
    assert (
        dump["webhook_url"] == f"https://{REDACTED}@hooks.example.org/in?sig={REDACTED}&{REDACTED}"
    )
    # a placeholder is no secret: the operator sees where the recipient goes
    assert dump["routes"][0]["url"] == f"https://h.example/{{domain}}?to={{rcpt}}&k={REDACTED}"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:PASSWORD@hooks.example.org/in",
        "https://user:PASSWORD@hooks.example.org/{nope}",
        "https://hooks.example.org:99999/in?key=PASSWORD",
        "https://user:PASSWORD@[::1/in",
    ],
)
def test_config_errors_never_echo_url_credentials(url: str, tmp_path: Path) -> None:
    routes = json.dumps([{"name": "r", "match": "@x.org", "url": url}])
    conf = tmp_path / "bad.yaml"
    conf.write_text(f"webhook_url: {url}\nwebhook_headers: {{X-A: PASSWORD: x}}\n")
    problems = [
        *problems_of(environ={"LMTP_BRIDGE_WEBHOOK_URL": url}),
        *problems_of(overrides={"webhook_url": URL}, environ={"LMTP_BRIDGE_ROUTES": routes}),
        *problems_of(config_file=str(conf)),
    ]
    assert len(problems) >= 3
    for problem in problems:
        assert "PASSWORD" not in problem and "user:" not in problem, problem


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:2424", ListenAddress("tcp", "127.0.0.1", 2424)),
        ("localhost:0", ListenAddress("tcp", "localhost", 0)),
        ("[::1]:2424", ListenAddress("tcp", "::1", 2424)),
        ("[::]:24", ListenAddress("tcp", "::", 24)),
        (
            "unix:/run/lmtp-bridge/lmtp.sock",
            ListenAddress("unix", path="/run/lmtp-bridge/lmtp.sock"),
        ),
    ],
)
def test_parse_listen(text: str, parsed: ListenAddress) -> None:
    assert parse_listen(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2424", "expected HOST:PORT"),
        ("::1:2424", "brackets"),
        ("[::1]2424", r"\[IPv6\]:PORT"),
        ("[nothost]:2424", "not an IPv6 address"),
        ("127.0.0.1:http", "must be a number"),
        ("127.0.0.1:65536", "out of range"),
        (":2424", "not a host name"),
        ("unix:", "unix:/path"),
    ],
)
def test_parse_listen_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_listen(text)


def test_settings_ignore_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only load_settings layers the environment; a plain Settings(...) is what it is given.
    monkeypatch.setenv("LMTP_BRIDGE_HTTP_TIMEOUT", "7")
    assert Settings(webhook_url=URL).http_timeout == 30
    monkeypatch.setenv("LMTP_BRIDGE_WEBHOOK_URL", URL)
    assert load_settings().http_timeout == 7


@pytest.mark.parametrize("name", ["", "has space", "new\nline", "x" * 65, "ünï"])
def test_route_names_are_label_safe(name: str) -> None:
    routes = [{"name": name, "match": "@example.org"}]
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_ROUTES": json.dumps(routes)}
    (p,) = problems_of(environ=env)
    assert p.startswith("routes[0].name: ")
    assert "\n" not in p


def test_delivery_policy_and_outbound_settings(tmp_path: Path) -> None:
    s = load_settings(environ={"LMTP_BRIDGE_WEBHOOK_URL": URL})
    assert (s.trace_headers, s.recipient_delimiter) == (True, "+")
    assert (s.http_retry_budget, s.breaker_cooldown) == (120.0, 30.0)
    assert (s.breaker_failure_ratio, s.breaker_window, s.breaker_min_calls) == (0.5, 30.0, 10)
    assert (s.http_client_cert, s.http_client_key, s.http_trust_env) == (None, None, False)
    assert (s.http_follow_redirects, s.http_max_redirects) == (False, 3)
    cert = tmp_path / "client.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    s = load_settings(
        environ={
            "LMTP_BRIDGE_WEBHOOK_URL": URL,
            "LMTP_BRIDGE_TRACE_HEADERS": "false",
            "LMTP_BRIDGE_RECIPIENT_DELIMITER": "+-",
            "LMTP_BRIDGE_HTTP_RETRY_BUDGET": "90",
            "LMTP_BRIDGE_BREAKER_THRESHOLD": "0",
            "LMTP_BRIDGE_HTTP_CLIENT_CERT": str(cert),
            "LMTP_BRIDGE_HTTP_TRUST_ENV": "yes",
            "LMTP_BRIDGE_HTTP_FOLLOW_REDIRECTS": "true",
        }
    )
    assert (s.trace_headers, s.recipient_delimiter, s.http_retry_budget) == (False, "+-", 90)
    # breaker_threshold, the old name, still sets breaker_min_calls (0 disables the breakers)
    assert (s.breaker_min_calls, s.http_client_cert, s.http_trust_env) == (0, str(cert), True)
    assert s.http_follow_redirects


def test_delivery_policy_problems_name_the_setting(tmp_path: Path) -> None:
    problems = problems_of(
        overrides={
            "webhook_url": URL,
            "http_retry_budget": 900,
            "breaker_threshold": -1,
            "breaker_cooldown": 0,
            "breaker_failure_ratio": 1.5,
            "breaker_window": 0,
            "http_client_cert": str(tmp_path / "missing.pem"),
            "recipient_delimiter": "@",
            "http_max_redirects": 0,
        }
    )
    named = sorted(p.split(":")[0] for p in problems)
    assert named == [
        "breaker_cooldown",
        "breaker_failure_ratio",
        "breaker_threshold",
        "breaker_window",
        "http_client_cert",
        "http_max_redirects",
        "http_retry_budget",
        "recipient_delimiter",
    ]
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_BREAKER_THRESHOLD": "3"}
    env["LMTP_BRIDGE_BREAKER_MIN_CALLS"] = "20"  # the new name wins over the old one
    assert load_settings(environ=env).breaker_min_calls == 20
    key = tmp_path / "client.key"
    key.write_text("x")
    (problem,) = problems_of(overrides={"webhook_url": URL, "http_client_key": str(key)})
    assert "set http_client_cert too" in problem
