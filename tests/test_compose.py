"""docker-compose.yml against the Compose specification's JSON schema (the copy check-jsonschema
ships; `docker compose config` too where the compose plugin exists, which is not the case on
these machines), the wiring of the chain, and the Dockerfile with hadolint.
The image itself is built and run by scripts/check-container.sh."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from bridge.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def test_compose_file_is_valid_by_the_compose_spec_cli():
    result = subprocess.run(
        [VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Also Docker's own parser where the compose plugin exists (it needs no engine for this).
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        result = subprocess.run(
            [docker, "compose", "-f", COMPOSE, "config", "--quiet"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


def test_compose_schema_catches_mistakes(compose, compose_schema):
    jsonschema.validate(compose, compose_schema)
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["lmtp-bridge"]["readonly"] = True
    with pytest.raises(jsonschema.ValidationError, match="readonly"):
        jsonschema.validate(misspelt, compose_schema)
    wrong_type = copy.deepcopy(compose)
    wrong_type["services"]["lmtp-bridge"]["cap_drop"] = "ALL"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_type, compose_schema)


def test_bridge_service_is_hardened(compose):
    bridge = compose["services"]["lmtp-bridge"]
    receiver = compose["services"]["webhook"]
    for service in (bridge, receiver):
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert service["init"] is True
        assert "no-new-privileges:true" in service["security_opt"]
        assert any(t.startswith("/tmp:") for t in service["tmpfs"])
        assert service["user"] == "10001:10001"
        assert service["healthcheck"]["test"][0] == "CMD"
        assert "stop_grace_period" in service
    grace = float(bridge["environment"]["LMTP_BRIDGE_SHUTDOWN_GRACE"])
    assert grace == Settings.model_fields["shutdown_grace"].default
    assert float(bridge["stop_grace_period"].rstrip("s")) > grace
    assert "9464/readyz" in " ".join(bridge["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for p in bridge["ports"])


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` (the only form the file uses; anything else fails)."""

    def one(match: re.Match[str]) -> str:
        return environ.get(match.group(1)) or match.group(2)

    out = re.sub(r"\$\{([A-Z_][A-Z0-9_]*):-([^}]*)\}", one, text)
    assert "$" not in out, out
    return out


def test_host_ports_come_from_variables_with_the_old_defaults(compose):
    published = {
        (name, int(p.rsplit(":", 1)[1])): p
        for name, service in compose["services"].items()
        for p in service.get("ports", [])
    }
    wanted = {
        ("postfix", 587): ("BRIDGE_SMTP_PORT", 2525),
        ("lmtp-bridge", 2424): ("BRIDGE_LMTP_PORT", 2424),
        ("lmtp-bridge", 9464): ("BRIDGE_METRICS_PORT", 9464),
        ("prometheus", 9090): ("BRIDGE_PROMETHEUS_PORT", 9090),
    }
    assert set(published) == set(wanted)
    for key, (variable, default) in wanted.items():
        port = published[key]
        assert f"${{{variable}:-{default}}}" in port, port
        assert interpolate(port, {}) == f"127.0.0.1:{default}:{key[1]}"
        assert interpolate(port, {variable: "12345"}) == f"127.0.0.1:12345:{key[1]}"
        assert not variable.startswith("LMTP_BRIDGE_")  # the bridge's own settings namespace
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    for variable, default in wanted.values():
        assert f"{variable} ({default})" in header  # documented at the top of the file


def test_secrets_come_from_secrets(compose):
    bridge = compose["services"]["lmtp-bridge"]
    assert bridge["secrets"] == ["webhook_secret"]
    assert bridge["environment"]["LMTP_BRIDGE_WEBHOOK_SECRET_FILE"] == "/run/secrets/webhook_secret"
    assert not any("SECRET=" in str(v) for v in bridge["environment"])
    secret_file = ROOT / compose["secrets"]["webhook_secret"]["file"]
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]+=*\n?", secret_file.read_text())


def test_the_chain_is_wired(compose):
    services = compose["services"]
    postfix = services["postfix"]["environment"]
    assert postfix["POSTFIX_virtual_transport"] == "lmtp:inet:lmtp-bridge:2424"
    assert not [k for k in postfix if "assume_final" in k]  # flags=X in master.cf instead
    init = ROOT / "deploy" / "postfix-init.d"
    assert "./deploy/postfix-init.d:/docker-init.d:ro" in services["postfix"]["volumes"]
    script = (init / "lmtp-final.sh").read_text()
    assert "postconf -F -e 'lmtp/unix/command = lmtp flags=X'" in script
    assert int(postfix["POSTFIX_lmtp_destination_recipient_limit"]) <= (
        Settings.model_fields["max_recipients"].default
    )
    assert services["postfix"]["depends_on"]["lmtp-bridge"]["condition"] == "service_healthy"
    url = services["lmtp-bridge"]["environment"]["LMTP_BRIDGE_WEBHOOK_URL"]
    assert url == "http://webhook:8025/hook"
    assert services["webhook"]["command"][:2] == ["--listen", "0.0.0.0:8025"]
    for service in services.values():  # every mounted file exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["lmtp-bridge:9464"]
    # the alert rules are loaded: the file prometheus.yml names is the one mounted there
    mounts = dict(v.split(":")[1::-1] for v in services["prometheus"]["volumes"])
    for rule_file in prometheus["rule_files"]:
        assert mounts[rule_file] == "./deploy/lmtp-bridge-alerts.yml"
    assert services["prometheus"]["profiles"] == ["monitoring"]


# ---- the Dockerfile ----


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run(
        [VENV_BIN / "hadolint", "--failure-threshold", "info", ROOT / "Dockerfile"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim-\w+$", text, re.M)
    assert len(re.findall(r"^FROM \$\{BASE_IMAGE\}", text, re.M)) == 2  # multi-stage
    assert "COPY --from=builder /opt/lmtp-bridge /opt/lmtp-bridge" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^EXPOSE 2424 9464$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["lmtp-bridge"\]$', text, re.M)
    assert re.search(r'^\s+CMD \["python", "-c", ".*/healthz', text, re.M)  # exec form, no curl
    assert "LMTP_BRIDGE_LISTEN=0.0.0.0:2424" in text
    assert "LMTP_BRIDGE_METRICS_LISTEN=0.0.0.0:9464" in text
    assert "org.opencontainers.image.version" in text
    assert "<<" not in text and "--link" not in text  # the builder here rejects both
    ignore = (ROOT / ".dockerignore").read_text()
    assert ignore.splitlines()[1:4] == ["*", "!pyproject.toml", "!README.md"]
