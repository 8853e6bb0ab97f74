"""The Helm chart helm/lmtp-bridge, checked with the real Helm engine: helm-python-sdk embeds
Helm's Go library (lint, render, values.schema.json). Every rendered manifest is validated against
the Kubernetes schemas of kubernetes-validate, and the rendered configuration is loaded by the
bridge's own settings loader."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from bridge.config import RouteConfig, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "lmtp-bridge"
RELEASE, NAMESPACE = "mail", "mailns"
FULLNAME = "mail-lmtp-bridge"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known here.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
MONITORING_API = [
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

# Every optional feature on.
ALL_FEATURES: dict[str, Any] = {
    "config": {
        "webhook_url": "https://hooks.mail.example.net/inbound",
        "payload": "raw",
        "http_timeout": 10,
        "shutdown_grace": 30,
        "status_map": {"404": "550 5.1.1"},
        "webhook_headers": {"X-Tenant": "acme"},
        "routes": [
            {
                "name": "support",
                "match": "support@example.org",
                "url": "https://helpdesk.example.org/inbound",
                "payload": "multipart",
            },
            {"name": "billing", "match": "@billing.example.org", "timeout": 5, "retries": 1},
        ],
    },
    "secret": {"webhookSecret": SECRET, "webhookHeaders": {"Authorization": "Bearer t0ken"}},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Mail"}},
    },
    "networkPolicy": {
        "enabled": True,
        "lmtp": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "postfix"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mta"}},
        },
        "metrics": {
            "namespaceSelector": {"matchLabels": {"name": "prometheus"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
        "extraLmtpFrom": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "egress": [{"ports": [{"port": 443, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}],
    },
    "extraEnv": [{"name": "LMTP_BRIDGE_LOG_LEVEL", "value": "DEBUG"}],
    "podAnnotations": {"example.org/team": "mail"},
    "commonLabels": {"example.org/owner": "mail-team"},
    "imagePullSecrets": [{"name": "regcred"}],
    "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "lmtp-bridge"}},
        }
    ],
    "priorityClassName": "mail-critical",
    "image": {"digest": "sha256:" + "ab" * 32},
}


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None, api_versions=()) -> tuple[dict[tuple[str, str], dict], str]:
    """Render like `helm template`: ({(kind, name): manifest}, NOTES.txt)."""
    if api_versions:
        # Chart.render() has no --api-versions; the library's render call takes them.
        opts = {"name": RELEASE, "namespace": NAMESPACE, "api_versions": list(api_versions)}
        out = json.loads(
            _native.call_string(
                "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)
            )
        )
    else:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    manifests: dict[tuple[str, str], dict] = {}
    notes = ""
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in manifests, f"{key} rendered twice"
                manifests[key] = doc
    return manifests, notes


def kinds(manifests) -> set[str]:
    return {kind for kind, _ in manifests}


def validate_all(manifests) -> None:
    for (kind, name), doc in manifests.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no schema in kubernetes-validate; checked field by field below
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{kind}/{name} on Kubernetes {version}: {exc}") from None


def merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def deployment(manifests) -> dict:
    return manifests[("Deployment", FULLNAME)]


def container(manifests) -> dict:
    (only,) = deployment(manifests)["spec"]["template"]["spec"]["containers"]
    return only


def env_of(manifests) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(manifests)["env"]}


# ---- lint ----


@pytest.mark.parametrize(
    "values", [None, ALL_FEATURES, {"mode": "sidecar"}], ids=["defaults", "all-features", "sidecar"]
)
def test_helm_lint_is_clean(values):
    result = helm_python.lint(CHART, values, strict=True)
    serious = [m for m in result["messages"] if m["severity"] >= 2]  # 1 info, 2 warning, 3 error
    assert result["errors"] == [] and serious == [], result


# ---- what each mode renders ----


def test_defaults_render_valid_manifests(chart):
    manifests, notes = render(chart)
    assert kinds(manifests) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    validate_all(manifests)
    assert deployment(manifests)["spec"]["replicas"] == 2
    transport = f"lmtp:inet:{FULLNAME}.{NAMESPACE}.svc.cluster.local:2424"
    assert f"virtual_transport = {transport}" in notes
    assert "config.webhook_url is still the example" in notes


def test_every_feature_renders_valid_manifests(chart):
    manifests, notes = render(chart, ALL_FEATURES, api_versions=MONITORING_API)
    assert kinds(manifests) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    }
    assert ("ConfigMap", f"{FULLNAME}-dashboard") in manifests
    validate_all(manifests)
    assert "replicas" not in deployment(manifests)["spec"]  # the HPA owns it
    hpa = manifests[("HorizontalPodAutoscaler", FULLNAME)]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert container(manifests)["image"] == "ghcr.io/lmtp-bridge/lmtp-bridge@sha256:" + "ab" * 32
    assert "WARNING" not in notes


def test_monitors_need_the_value_and_the_crd(chart):
    on = {"metrics": ALL_FEATURES["metrics"]}
    manifests, notes = render(chart, on)  # no Prometheus Operator in the cluster
    assert not kinds(manifests) & {"ServiceMonitor", "PodMonitor"}
    assert "none was created" in notes
    manifests, _ = render(chart, {}, api_versions=MONITORING_API)  # CRDs, but not enabled
    assert not kinds(manifests) & {"ServiceMonitor", "PodMonitor"}
    manifests, _ = render(chart, on, api_versions=MONITORING_API)
    selector = deployment(manifests)["spec"]["selector"]["matchLabels"]
    service_monitor = manifests[("ServiceMonitor", FULLNAME)]
    assert service_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert service_monitor["spec"]["selector"]["matchLabels"] == selector
    assert service_monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    assert service_monitor["metadata"]["labels"]["release"] == "prom"
    pod_monitor = manifests[("PodMonitor", FULLNAME)]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == selector
    assert pod_monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_sidecar_mode_renders_only_the_configuration(chart):
    manifests, notes = render(chart, {"mode": "sidecar"})
    assert kinds(manifests) == {"ConfigMap", "Secret"}  # the Secret the MTA's pod mounts
    manifests, notes = render(
        chart, merged(ALL_FEATURES, {"mode": "sidecar"}), api_versions=MONITORING_API
    )
    assert kinds(manifests) == {"ConfigMap", "Secret", "PrometheusRule"}  # and the dashboard
    validate_all(manifests)
    assert "virtual_transport = lmtp:inet:127.0.0.1:2424" in notes
    assert f"ConfigMap {FULLNAME}" in notes


# ---- the pod ----


def test_restricted_pod_security_standard(chart):
    for values in ({}, ALL_FEATURES):
        manifests, _ = render(chart, values, api_versions=MONITORING_API)
        pod = deployment(manifests)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        ctx = container(manifests)["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m for m in container(manifests)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the spool, on a writable volume
        assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")
        account = manifests[("ServiceAccount", FULLNAME)]
        assert account["automountServiceAccountToken"] is False


def test_probes_ports_and_selectors(chart):
    manifests, _ = render(chart, ALL_FEATURES, api_versions=MONITORING_API)
    c = container(manifests)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"lmtp": 2424, "metrics": 9464}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = env_of(manifests)
    assert env["LMTP_BRIDGE_LISTEN"] == "0.0.0.0:2424"
    assert env["LMTP_BRIDGE_METRICS_LISTEN"] == "0.0.0.0:9464"

    selector = deployment(manifests)["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "lmtp-bridge",
        "app.kubernetes.io/instance": RELEASE,
    }
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    service = manifests[("Service", FULLNAME)]
    assert service["spec"]["selector"] == selector
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("lmtp", 2424, "lmtp"),
        ("metrics", 9464, "metrics"),
    ]
    assert manifests[("PodDisruptionBudget", FULLNAME)]["spec"]["selector"]["matchLabels"] == (
        selector
    )
    policy = manifests[("NetworkPolicy", FULLNAME)]["spec"]
    assert policy["podSelector"]["matchLabels"] == selector
    assert [r["ports"][0]["port"] for r in policy["ingress"]] == ["lmtp", "metrics"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    for manifest in manifests.values():  # the recommended labels everywhere
        labels = manifest["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, manifest["kind"]
        assert labels["example.org/owner"] == "mail-team"


def test_checksum_rolls_pods_on_config_or_secret_change(chart):
    def checksum(values):
        manifests, _ = render(chart, values)
        return deployment(manifests)["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({}) == base
    assert checksum({"config": {"http_timeout": 5}}) != base
    assert checksum({"secret": {"webhookSecret": SECRET}}) != base
    assert checksum({"replicaCount": 3}) == base


def test_termination_grace_is_above_the_drain_grace(chart):
    def grace(values):
        manifests, _ = render(chart, values)
        return deployment(manifests)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert grace({}) == 25 + 15
    assert grace({"config": {"shutdown_grace": 100}}) == 115
    assert grace({"terminationGracePeriodSeconds": 60}) == 60
    with pytest.raises(helm_python.HelmError, match=r"must be above config\.shutdown_grace"):
        render(chart, {"terminationGracePeriodSeconds": 25})


# ---- values.schema.json ----


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCont": 3},
        {"image": {"repo": "x"}},
        {"config": {"webhook_ulr": "https://x.example/"}},
        {
            "config": {
                "routes": [{"name": "a", "match": "@a.example", "urll": "https://a.example/"}]
            }
        },
        {"secret": {"webhookSecrets": SECRET}},
        {"autoscaling": {"enable": True}},
        {"mode": "daemonset"},
        {"ports": {"lmtp": 25}},
    ],
)
def test_schema_rejects_misspelt_keys_and_bad_values(chart, bad):
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(bad, name=RELEASE)
    result = helm_python.lint(CHART, bad)
    assert result["errors"], result


def test_schema_config_keys_are_bridge_settings():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    assert set(config["properties"]) <= set(Settings.model_fields)
    # set by the chart itself, never by config:
    assert not set(config["properties"]) & {"listen", "metrics_listen", "webhook_secret"}
    route = config["properties"]["routes"]["items"]
    assert route["additionalProperties"] is False
    assert set(route["properties"]) <= set(RouteConfig.model_fields) - {"secret"}


def test_values_yaml_documents_every_key():
    """Each key of the chart's own structure has a comment line above it; the contents of
    Kubernetes objects passed through (securityContext, resources, ...) need none."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    lines = (CHART / "values.yaml").read_text().splitlines()
    parent = ""
    for i, line in enumerate(lines):
        key = re.match(r"^( {2})?([a-zA-Z]\w*):", line)
        if not key:
            continue
        if not key.group(1):
            parent = key.group(2)
        elif "properties" not in schema[parent]:
            continue
        assert lines[i - 1].lstrip().startswith("#"), f"values.yaml: {line!r} has no comment"


# ---- the bridge reads what the chart renders ----


def test_rendered_configuration_loads_in_the_bridge(chart, tmp_path):
    manifests, _ = render(chart, ALL_FEATURES, api_versions=MONITORING_API)
    pod = deployment(manifests)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(manifests)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # lay out the mounted ConfigMap and Secret as the kubelet would, under tmp_path
    files: dict[str, bytes] = {}
    for name, path in mounts.items():
        volume = volumes[name]
        if "configMap" in volume:
            data = manifests[("ConfigMap", volume["configMap"]["name"])]["data"]
            files.update({f"{path}/{k}": v.encode() for k, v in data.items()})
        elif "secret" in volume:
            data = manifests[("Secret", volume["secret"]["secretName"])]["data"]
            files.update({f"{path}/{k}": base64.b64decode(v) for k, v in data.items()})
    for path, content in files.items():
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_bytes(content)
    environ = {}
    for name, value in env_of(manifests).items():
        in_mount = any(value.startswith(p + "/") for p in mounts.values())
        environ[name] = str(tmp_path / value.lstrip("/")) if in_mount else value

    settings = load_settings(environ=environ)

    assert settings.listen == ["0.0.0.0:2424"]
    assert settings.metrics_listen == "0.0.0.0:9464"
    assert settings.webhook_url == "https://hooks.mail.example.net/inbound"
    assert settings.payload == "raw" and settings.http_timeout == 10
    assert [s.get_secret_value() for s in settings.webhook_secret] == [SECRET]
    assert settings.webhook_headers == {"Authorization": "Bearer t0ken"}  # the Secret's file
    assert [r.name for r in settings.routes] == ["support", "billing"]
    assert settings.log_level == "DEBUG"  # extraEnv
    assert settings.spool_dir is None  # the temp dir: the emptyDir at /tmp


def test_existing_secret_is_mounted_with_its_keys(chart):
    manifests, _ = render(
        chart, {"secret": {"existingSecret": "mail-hooks", "keys": {"webhookHeaders": ""}}}
    )
    assert "Secret" not in kinds(manifests)
    pod = deployment(manifests)["spec"]["template"]["spec"]
    assert {"name": "secrets", "secret": {"secretName": "mail-hooks", "defaultMode": 0o440}} in (
        pod["volumes"]
    )
    env = env_of(manifests)
    assert env["LMTP_BRIDGE_WEBHOOK_SECRET_FILE"] == "/etc/lmtp-bridge/secrets/webhook-secret"
    assert "LMTP_BRIDGE_WEBHOOK_HEADERS_FILE" not in env
    validate_all(manifests)


# ---- the README's sidecar examples ----


def readme_yaml(first_line: str) -> dict:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return yaml.safe_load(block)


@pytest.mark.parametrize(
    "secret", [{"webhookSecret": SECRET}, {}], ids=["with-webhook-secret", "without"]
)
def test_readme_sidecar_examples_fit_the_chart(chart, secret):
    """Both examples mount the release's ConfigMap and Secret by name: the Secret must exist
    even without a signing secret, or the MTA's pod never starts."""
    release = "mail-hooks"
    rendered = chart.render({"mode": "sidecar", "secret": secret}, name=release, namespace="mail")
    manifests = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                manifests[doc["kind"]] = doc
    configmap, secret = manifests["ConfigMap"], manifests["Secret"]
    postfix_values = readme_yaml("# values of the bokysan/docker-postfix chart")
    native_pod = readme_yaml("# a native sidecar")
    (extra,) = postfix_values["extraContainers"]
    (init,) = native_pod["spec"]["initContainers"]
    assert init["restartPolicy"] == "Always"
    for c, volumes in (
        (extra, postfix_values["extraVolumes"]),
        (init, native_pod["spec"]["volumes"]),
    ):
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["LMTP_BRIDGE_LISTEN"] == "127.0.0.1:2424"
        by_name = {v["name"]: v for v in volumes}
        mounts = {m["mountPath"]: by_name[m["name"]] for m in c["volumeMounts"]}
        config_dir, _, config_key = env["LMTP_BRIDGE_CONFIG"].rpartition("/")
        assert mounts[config_dir]["configMap"]["name"] == configmap["metadata"]["name"]
        assert config_key in configmap["data"]
        secret_dir, _, secret_key = env["LMTP_BRIDGE_WEBHOOK_SECRET_FILE"].rpartition("/")
        assert mounts[secret_dir]["secret"]["secretName"] == secret["metadata"]["name"]
        assert secret_key in secret["data"]
        assert "emptyDir" in mounts["/tmp"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert postfix_values["config"]["postfix"]["virtual_transport"] == "lmtp:inet:127.0.0.1:2424"
    # Postfix's container gets flags=X from the ConfigMap's init script (no lmtp_assume_final)
    (postfix_container,) = native_pod["spec"]["containers"]
    script = (ROOT / "deploy" / "postfix-init.d" / "lmtp-final.sh").read_text()
    for mounts in (postfix_values["extraVolumeMounts"], postfix_container["volumeMounts"]):
        (mount,) = [m for m in mounts if m["mountPath"].startswith("/docker-init.d/")]
        assert mount["name"] == "lmtp-bridge-config"
        assert configmap["data"][mount["subPath"]].strip() in script
    assert "assume_final" not in yaml.safe_dump([postfix_values, native_pod])
    # both are valid Kubernetes: the native sidecar Pod as it is, the extra container in a Pod
    extra_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "postfix"},
        "spec": {"containers": [extra], "volumes": postfix_values["extraVolumes"]},
    }
    for pod in (native_pod, extra_pod):
        for version in ("1.29.0", K8S_VERSIONS[-1]):
            kubernetes_validate.validate(pod, version, strict=True)


def test_versions_agree():
    """appVersion is the image tag: the bridge's version, as in the Dockerfile and the README."""
    from bridge import __version__

    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_meta["apiVersion"] == "v2"
    assert chart_meta["appVersion"] == __version__
    assert f"ARG VERSION={__version__}\n" in (ROOT / "Dockerfile").read_text()
    readme_tags = set(
        re.findall(
            r"image: ghcr\.io/lmtp-bridge/lmtp-bridge:(\S+)", (ROOT / "README.md").read_text()
        )
    )
    assert readme_tags == {__version__}


# ---- NetworkPolicy: on by default, LMTP only from the pods you name ----


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only, which is what the chart renders) against labels."""
    assert selector is not None and set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def admitted(policy: dict, port: str, pod: dict[str, str], namespace: dict[str, str]) -> bool:
    """Whether NetworkPolicy ``policy`` lets a pod (its labels) from a namespace (its labels,
    kubernetes.io/metadata.name among them) connect to ``port``: the rules of the Kubernetes
    NetworkPolicy API for podSelector/namespaceSelector peers."""
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            if "ipBlock" in peer:
                continue
            if "namespaceSelector" in peer:
                namespace_ok = selects(peer["namespaceSelector"], namespace)
            else:
                namespace_ok = namespace["kubernetes.io/metadata.name"] == NAMESPACE
            if namespace_ok and selects(peer.get("podSelector", {}), pod):
                return True
    return False


def namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def test_network_policy_is_on_by_default_and_admits_only_the_named_pods(chart):
    manifests, notes = render(chart)
    policy = manifests[("NetworkPolicy", FULLNAME)]
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == (deployment(manifests)["spec"]["selector"]["matchLabels"])
    )
    here, monitoring = namespace_labels(NAMESPACE), namespace_labels("monitoring")
    mta = {"app.kubernetes.io/name": "postfix", "lmtp-bridge-client": "true"}
    other = {"app.kubernetes.io/name": "web"}
    assert admitted(policy, "lmtp", mta, here)
    assert not admitted(policy, "lmtp", other, here)  # any other pod: refused
    assert not admitted(policy, "lmtp", mta, namespace_labels("elsewhere"))
    assert not admitted(policy, "lmtp", {}, monitoring)
    assert admitted(policy, "metrics", {"app": "prometheus"}, monitoring)
    assert not admitted(policy, "metrics", mta, here)  # metrics only from monitoring
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress open: webhooks, DNS
    assert '{"matchLabels":{"lmtp-bridge-client":"true"}} in namespace mailns' in notes
    assert '{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}' in notes

    # the README's example: the MTA's own label, in the MTA's namespace
    manifests, _ = render(chart, ALL_FEATURES, api_versions=MONITORING_API)
    policy = manifests[("NetworkPolicy", FULLNAME)]
    postfix = {"app.kubernetes.io/name": "postfix"}
    assert admitted(policy, "lmtp", postfix, namespace_labels("mta"))
    assert not admitted(policy, "lmtp", postfix, here)
    assert not admitted(policy, "lmtp", other, namespace_labels("mta"))
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert admitted(policy, "metrics", prometheus, {"name": "prometheus"})
    assert not admitted(policy, "metrics", other, {"name": "prometheus"})
    lmtp_rule = policy["spec"]["ingress"][0]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in lmtp_rule["from"]  # extraLmtpFrom
    validate_all(manifests)

    manifests, _ = render(chart, {"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in kinds(manifests)


def test_network_policy_selectors_are_checked(chart):
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, {"networkPolicy": {"lmtp": {"podSelector": "postfix"}}})
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, {"networkPolicy": {"lmtp": {"podSelector": {"app": "postfix"}}}})


# ---- the Secret: rendered, or existing; the sidecar's always exists ----


def test_secret_rendered_or_existing(chart, tmp_path):
    def secret_env(values):
        manifests, notes = render(chart, values)
        return manifests, env_of(manifests), notes

    manifests, env, _ = secret_env({"secret": {"webhookSecret": SECRET}})
    secret = manifests[("Secret", FULLNAME)]
    assert base64.b64decode(secret["data"]["webhook-secret"]).decode() == SECRET
    assert env["LMTP_BRIDGE_WEBHOOK_SECRET_FILE"] == "/etc/lmtp-bridge/secrets/webhook-secret"
    validate_all(manifests)

    manifests, env, notes = secret_env({"secret": {"existingSecret": "mail-hooks"}})
    assert "Secret" not in kinds(manifests)
    assert env["LMTP_BRIDGE_WEBHOOK_SECRET_FILE"] == "/etc/lmtp-bridge/secrets/webhook-secret"
    assert "not signed" not in notes

    manifests, env, notes = secret_env({})  # nothing to keep: no Secret, no mount, a warning
    assert "Secret" not in kinds(manifests)
    assert "LMTP_BRIDGE_WEBHOOK_SECRET_FILE" not in env
    assert "WARNING: no secret.webhookSecret" in notes

    # sidecar mode without a signing secret: the Secret still exists (the MTA's pod mounts it by
    # name) and its empty key is read by the bridge as "no signature"
    manifests, notes = render(chart, {"mode": "sidecar"})
    secret = manifests[("Secret", FULLNAME)]
    assert secret["data"] == {"webhook-secret": ""}
    assert f"Secret    {FULLNAME} (mount this one)" in notes
    (tmp_path / "webhook-secret").write_bytes(base64.b64decode(secret["data"]["webhook-secret"]))
    settings = load_settings(
        environ={
            "LMTP_BRIDGE_WEBHOOK_URL": "https://hooks.example.org/mail",
            "LMTP_BRIDGE_WEBHOOK_SECRET_FILE": str(tmp_path / "webhook-secret"),
        }
    )
    assert settings.webhook_secret == []
    manifests, notes = render(chart, {"mode": "sidecar", "secret": {"existingSecret": "hooks"}})
    assert kinds(manifests) == {"ConfigMap"}
    assert "Secret    hooks (mount this one)" in notes
    manifests, _ = render(chart, {"mode": "sidecar", "secret": {"create": False}})
    assert kinds(manifests) == {"ConfigMap"}


# ---- monitoring: the dashboard ConfigMap and the PrometheusRule ----

DEPLOY = ROOT / "deploy"


def test_dashboard_configmap_for_the_grafana_sidecar(chart):
    manifests, _ = render(chart)
    assert ("ConfigMap", f"{FULLNAME}-dashboard") not in manifests  # off by default
    for mode in ("deployment", "sidecar"):
        manifests, _ = render(chart, {"mode": mode, "metrics": ALL_FEATURES["metrics"]})
        configmap = manifests[("ConfigMap", f"{FULLNAME}-dashboard")]
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["annotations"] == {"grafana_folder": "Mail"}
        assert configmap["metadata"]["namespace"] == NAMESPACE
        (name,) = configmap["data"]
        assert name.endswith(".json")
        assert json.loads(configmap["data"][name]) == json.loads(
            (DEPLOY / "lmtp-bridge-dashboard.json").read_text()
        )
        validate_all({("ConfigMap", "dashboard"): configmap})
    manifests, _ = render(
        chart, {"metrics": {"grafanaDashboard": {"enabled": True, "namespace": "grafana"}}}
    )
    assert manifests[("ConfigMap", f"{FULLNAME}-dashboard")]["metadata"]["namespace"] == "grafana"


def test_prometheus_rule_needs_the_value_and_the_crd(chart):
    on = {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}}
    manifests, notes = render(chart, on)  # no Prometheus Operator
    assert "PrometheusRule" not in kinds(manifests)
    assert "PrometheusRule API" in notes and "none was created" in notes
    manifests, _ = render(chart, {}, api_versions=MONITORING_API)  # the CRD, not enabled
    assert "PrometheusRule" not in kinds(manifests)
    manifests, notes = render(chart, on, api_versions=MONITORING_API)
    rule = manifests[("PrometheusRule", FULLNAME)]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["metadata"]["namespace"] == NAMESPACE
    # exactly the rule file that promtool tests (tests/test_monitoring.py)
    assert rule["spec"] == yaml.safe_load((DEPLOY / "lmtp-bridge-alerts.yml").read_text())
    assert "PrometheusRule API" not in notes
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
            assert alert["labels"]["severity"] in ("critical", "warning")


def test_readme_install_command_renders_as_written(chart):
    """The README's `helm install` line, its --set and --set-json flags applied as Helm would:
    valid manifests, and the NetworkPolicy admits the MTA it names."""
    import shlex

    text = (ROOT / "README.md").read_text()
    command = re.search(
        r"^ +helm install mail-hooks helm/lmtp-bridge .*?(?<!\\)\n", text, re.M | re.S
    )
    assert command, "the README's helm install example"
    words = shlex.split(command.group(0).replace("\\\n", " "))
    assert words[:4] == ["helm", "install", "mail-hooks", "helm/lmtp-bridge"]
    values: dict[str, Any] = {}
    flags = iter(words[4:])
    for flag in flags:
        if flag in ("--set", "--set-json"):
            path, _, raw = next(flags).partition("=")
            value = json.loads(raw) if flag == "--set-json" else raw
            *parents, leaf = path.split(".")
            node = values
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        else:
            assert flag == "-n" and next(flags)
    values["secret"]["webhookSecret"] = SECRET  # the README says whsec_...
    manifests, notes = render(chart, values)
    validate_all(manifests)
    policy = manifests[("NetworkPolicy", FULLNAME)]
    postfix = {"app.kubernetes.io/name": "postfix"}
    assert admitted(policy, "lmtp", postfix, namespace_labels(NAMESPACE))
    assert not admitted(policy, "lmtp", {"lmtp-bridge-client": "true"}, namespace_labels(NAMESPACE))
    assert "not signed" not in notes
