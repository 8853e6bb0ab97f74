"""The monitoring that ships in deploy/ (and, as copies, in the Helm chart), proven against a real
Prometheus (Debian's `prometheus` package):

- deploy/lmtp-bridge-alerts.yml passes `promtool check rules`, and `promtool test rules` runs
  tests/prometheus/lmtp-bridge-alerts.test.yml, which must show every alert firing and staying
  quiet;
- a Prometheus started here (127.0.0.1, temporary config and storage, 1 s scrape interval)
  scrapes a running bridge while deliveries are delivered, deferred, rejected and refused by an
  open circuit breaker: every query of the Grafana dashboard and of the README's metrics table
  returns data, and the real rule evaluation puts every alert in pending state when its condition
  holds (the bridge killed at the end for the two "down" alerts).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.bridge_process import (
    BridgeProcess,
    SyncLmtp,
    data_section,
    free_port,
    http_get,
    message,
    tool,
    wait_for,
)
from tests.webhook_server import WebhookServer

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "lmtp-bridge-alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "lmtp-bridge-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "lmtp-bridge-dashboard.json"
CHART_FILES = ROOT / "helm" / "lmtp-bridge" / "files"
# what Grafana puts in for the dashboard's variables when "All" is chosen, and for the interval
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
REJECTED = [f"nobody{i}@example.org" for i in range(15)]  # > 10: LmtpBridgeRejectionsSpike


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel, with the dashboard's variables filled in."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            found.append((panel["title"], expr))
    return found


def readme_queries() -> list[str]:
    """The PromQL column of the README's metrics table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Observability and lifecycle", 1)[1].split("\n## ", 1)[0]
    queries = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else []
        if len(cells) == 4 and cells[0].startswith("`lmtp_bridge_"):
            queries += re.findall(r"`([^`]*\(.*?)`", cells[3])
    return queries


# ---- promtool ----


def test_promtool_checks_the_rules():
    result = subprocess.run(
        [tool("promtool"), "check", "rules", ALERTS], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_unit_tests_cover_every_alert_both_ways():
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert [(ALERT_TESTS.parent / f).resolve() for f in tests["rule_files"]] == [ALERTS]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(alert_names()), "an alert without a test that it fires"
    assert quiet == set(alert_names()), "an alert without a test that it stays quiet"
    result = subprocess.run(
        [tool("promtool"), "test", "rules", ALERT_TESTS], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_chart_ships_the_same_files():
    """The chart cannot read deploy/ (Helm sees only the chart's directory): it holds copies."""
    assert (CHART_FILES / ALERTS.name).read_bytes() == ALERTS.read_bytes(), (
        f"cp {ALERTS.relative_to(ROOT)} {CHART_FILES.relative_to(ROOT)}/"
    )
    assert (CHART_FILES / DASHBOARD.name).read_bytes() == DASHBOARD.read_bytes(), (
        f"cp {DASHBOARD.relative_to(ROOT)} {CHART_FILES.relative_to(ROOT)}/"
    )


# ---- the dashboard's shape ----


def test_dashboard_is_a_provisionable_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lmtp-bridge" and dashboard["title"]
    assert "__inputs" not in dashboard  # a file for provisioning (sidecar), not for the import UI
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = set()
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], target["expr"]
    # what the issue asks people to be able to look at
    for wanted in (
        "Recipient outcomes by result and route",
        "Deferred and rejected share by route",
        "Webhook latency p50 / p99 by route",
        "Circuit breaker state by route",
        "In flight",
        "Message size p50 / p99",
        "Verify requests by result",
    ):
        assert wanted in titles


# ---- a real Prometheus scraping a real bridge ----


class Prometheus:
    """prometheus on 127.0.0.1 with a temporary configuration and storage."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "lmtp-bridge", "static_configs": [{"targets": [target]}]}
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-4000:]

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log}")
            try:
                return http_get(f"{self.url}/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 60, "prometheus to become ready")

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}", timeout=10)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (path, params, body)
        return answer["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def transaction(address: str, recipients: list[str], body: str = "Hello.") -> list[int]:
    """One LMTP transaction; the reply code of each recipient (at RCPT, or after the data)."""
    client = SyncLmtp.connect(address)
    try:
        client.greet()
        assert client.command("MAIL FROM:<alice@example.org>").code == 250
        codes = {r: client.command(f"RCPT TO:<{r}>").code for r in recipients}
        accepted = [r for r in recipients if codes[r] == 250]
        if accepted:
            assert client.command("DATA").code == 354
            client.send(data_section(message(body=body)))
            for rcpt in accepted:
                codes[rcpt] = client.reply().code
        client.command("QUIT")
    finally:
        client.close()
    return [codes[r] for r in recipients]


@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[Prometheus, BridgeProcess]]:
    """A bridge under traffic and the Prometheus that scrapes it."""
    with tempfile.TemporaryDirectory(prefix="lb-prom-") as directory, WebhookServer() as hook:
        hook.behave("*", status=200, delay=0.01)
        hook.behave("later@example.org", status=503)
        for rcpt in REJECTED:
            hook.behave(rcpt, status=404)
        for rcpt in ("a@flaky.example.org", "b@flaky.example.org"):
            hook.behave(rcpt, status=503)
        hook.behave("s@slow.example.org", status=200, delay=0.45)
        hook.behave("unknown@checked.example.org", status=404)  # refused at RCPT by verify_url
        routes = [
            {"name": "flaky", "match": "@flaky.example.org"},
            {"name": "slow", "match": "@slow.example.org", "timeout": 0.5},
            {"name": "support", "match": "support@example.org"},
            {
                "name": "checked",
                "match": "@checked.example.org",
                "verify_url": f"{hook.base_url}/verify",
            },
        ]
        env = {
            "LMTP_BRIDGE_ROUTES": json.dumps(routes),
            # a breaker opens on 2 deliveries that (nearly) all failed at the endpoint
            "LMTP_BRIDGE_BREAKER_MIN_CALLS": "2",
            "LMTP_BRIDGE_BREAKER_FAILURE_RATIO": "0.9",
        }
        bridge = BridgeProcess(hook.url, env).wait_ready()
        prometheus = Prometheus(Path(directory), f"127.0.0.1:{bridge.metrics_port}")
        try:
            prometheus.wait_ready()
            wait_for(lambda: prometheus.query("up == 1"), 30, "the first scrape")
            # delivered on every route, deferred (503), rejected (404), and the flaky route's
            # breaker opened by two recipients' 503s: its third recipient is refused at RCPT
            assert transaction(bridge.address, ["bob@example.org", "support@example.org"]) == [
                250,
                250,
            ]
            for _ in range(3):  # one recipient's 503s count once: the breaker stays closed
                assert transaction(bridge.address, ["later@example.org"], "x" * 5000) == [451]
                assert transaction(bridge.address, ["bob@example.org"]) == [250]
            assert transaction(bridge.address, REJECTED) == [550] * len(REJECTED)
            assert transaction(bridge.address, ["a@flaky.example.org"]) == [451]
            assert transaction(bridge.address, ["b@flaky.example.org"]) == [451]
            assert transaction(bridge.address, ["c@flaky.example.org"]) == [451]  # at RCPT
            for _ in range(3):
                assert transaction(bridge.address, ["s@slow.example.org"])[0] in (250, 451)
                assert transaction(bridge.address, ["carol@example.org"], "y" * 100_000) == [250]
            # recipient verification: asked, refused, and answered from the cache
            for _ in range(2):
                assert transaction(
                    bridge.address, ["known@checked.example.org", "unknown@checked.example.org"]
                ) == [250, 550]
            total = 2 + 6 + len(REJECTED) + 3 + 6 + 4
            # scraped after the traffic, and a few scrapes more so that rate() has samples
            wait_for(
                lambda: prometheus.query(f"sum(lmtp_bridge_recipients_total) == {total}"),
                30,
                "Prometheus to scrape the traffic",
            )
            time.sleep(3)
            yield prometheus, bridge
        finally:
            prometheus.close()
            bridge.close()


@pytest.mark.parametrize(
    "title, expr", dashboard_queries(), ids=[f"{t}:{e[:40]}" for t, e in dashboard_queries()]
)
def test_every_dashboard_query_returns_data(scraped, title, expr):
    prometheus, _ = scraped
    samples = prometheus.query(expr)
    assert samples, f"{title}: no data for {expr}"
    assert any(math.isfinite(v) for _, v in samples), f"{title}: only NaN/Inf for {expr}"


def test_every_readme_query_returns_data(scraped):
    prometheus, _ = scraped
    queries = readme_queries()
    assert len(queries) >= 10, queries
    for expr in queries:
        samples = prometheus.query(expr)
        assert samples, f"README: no data for {expr}"


def test_dashboard_shows_what_happened(scraped):
    prometheus, _ = scraped
    queries = dict((t, e) for t, e in reversed(dashboard_queries()))
    ((_, deferral),) = prometheus.query(queries["Deferral ratio"])
    assert 0 < deferral < 1
    assert prometheus.query(queries["Open circuit breakers"])[0][1] == 1
    by_route = {
        (m["route"], m["result"]): v
        for m, v in prometheus.query(queries["Recipient outcomes by result and route"])
    }
    for key in (
        ("default", "delivered"),
        ("support", "delivered"),
        ("default", "deferred"),
        ("default", "rejected"),
        ("flaky", "deferred"),
        ("checked", "delivered"),
        ("checked", "rejected"),
    ):
        assert by_route[key] > 0, key
    breaker = {
        m["route"]: v for m, v in prometheus.query(queries["Circuit breaker state by route"])
    }
    assert breaker["flaky"] == 1 and breaker["default"] == 0


def test_alerts_evaluate_on_real_metrics(scraped):
    """Prometheus evaluates the rule file on what it scraped: no rule errors, and each alert
    whose condition the traffic created is pending (its `for` has not passed yet)."""
    prometheus, bridge = scraped
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(alert_names())
    for rule in rules:
        assert rule["health"] == "ok", rule

    def pending() -> dict[str, list[dict[str, str]]]:
        found: dict[str, list[dict[str, str]]] = {}
        for alert in prometheus.alerts():
            found.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return found

    wanted = {
        "LmtpBridgeDeferralRatioHigh",
        "LmtpBridgeCircuitBreakerOpen",
        "LmtpBridgeWebhookLatencyNearTimeout",
        "LmtpBridgeRejectionsSpike",
    }
    now = wait_for(lambda: (p := pending()) and wanted <= set(p) and p, 30, "pending alerts")
    assert not {"LmtpBridgeDown", "LmtpBridgeAbsent"} & set(now)
    # (under a heavy load the slow route may time out and open its breaker too)
    assert "flaky" in [a["route"] for a in now["LmtpBridgeCircuitBreakerOpen"]]
    assert "default" not in [a["route"] for a in now["LmtpBridgeCircuitBreakerOpen"]]
    assert [a["route"] for a in now["LmtpBridgeWebhookLatencyNearTimeout"]] == ["slow"]
    assert [a["route"] for a in now["LmtpBridgeRejectionsSpike"]] == ["default"]
    assert {"default", "flaky"} <= {a["route"] for a in now["LmtpBridgeDeferralRatioHigh"]}
    assert "support" not in {a["route"] for a in now["LmtpBridgeDeferralRatioHigh"]}

    bridge.close()  # the bridge dies: both "down" alerts go pending
    down = wait_for(
        lambda: (p := pending()) and {"LmtpBridgeDown", "LmtpBridgeAbsent"} <= set(p) and p,
        30,
        "LmtpBridgeDown and LmtpBridgeAbsent",
    )
    assert down["LmtpBridgeDown"][0]["instance"] == f"127.0.0.1:{bridge.metrics_port}"
