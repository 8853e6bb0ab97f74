"""The image publishing workflow .github/workflows/image.yml: actionlint-clean, and in agreement
with the Helm chart (the repository it pushes is the chart's default image.repository, the tag it
pushes is the chart's appVersion). Its version check runs here as the workflow would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge import __version__

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW = WORKFLOWS / "image.yml"
CHART = ROOT / "helm" / "lmtp-bridge"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    assert ACTIONLINT.exists(), "actionlint is missing: . scripts/venv.sh test installs it"
    return subprocess.run(
        [ACTIONLINT, "-no-color", "-oneline", *files], capture_output=True, text=True, cwd=ROOT
    )


def test_actionlint_passes_every_workflow():
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert WORKFLOW in files
    result = actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_a_mistake(tmp_path):
    broken = tmp_path / "image.yml"
    broken.write_text(
        WORKFLOW.read_text().replace("${{ github.ref_name }}", "${{ github.ref_nmae }}")
    )
    result = actionlint(broken)
    assert result.returncode != 0 and "ref_nmae" in result.stdout, result.stdout


def test_publishes_the_charts_image_for_amd64_and_arm64_on_tags(workflow):
    # (PyYAML reads the key `on` as True)
    assert workflow[True] == {"push": {"tags": ["v*"]}}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert workflow["env"]["IMAGE"] == values["image"]["repository"]
    assert values["image"]["repository"].startswith("ghcr.io/")
    (job,) = workflow["jobs"].values()
    assert job["permissions"]["packages"] == "write"
    steps = {s.get("uses", s.get("name")).split("@")[0]: s for s in job["steps"]}
    assert "docker/setup-qemu-action" in steps and "docker/setup-buildx-action" in steps
    assert steps["docker/login-action"]["with"]["registry"] == "ghcr.io"
    meta = steps["docker/metadata-action"]["with"]
    assert meta["images"] == "${{ env.IMAGE }}"
    # {{version}} of tag v0.1.0 is 0.1.0: the chart's appVersion, its default image tag
    assert "type=semver,pattern={{version}}" in meta["tags"].splitlines()
    build = steps["docker/build-push-action"]["with"]
    assert build["platforms"].split(",") == ["linux/amd64", "linux/arm64"]
    assert build["push"] is True
    assert build["tags"] == "${{ steps.meta.outputs.tags }}"
    assert "VERSION=${{ env.VERSION }}" in build["build-args"].splitlines()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


@pytest.mark.parametrize(
    "tag, ok", [(f"v{__version__}", True), ("v9.9.9", False), (__version__, False)]
)
def test_the_version_check_step(workflow, tmp_path, tag, ok):
    (job,) = workflow["jobs"].values()
    (step,) = [s for s in job["steps"] if s.get("name") == "The tag is the bridge's version"]
    assert step["env"]["TAG"] == "${{ github.ref_name }}"
    github_env = tmp_path / "github_env"
    github_env.write_text("")
    result = subprocess.run(
        ["bash", "-e", "-c", step["run"]],
        cwd=ROOT,
        env={**os.environ, "TAG": tag, "GITHUB_ENV": str(github_env)},
        capture_output=True,
        text=True,
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
        assert github_env.read_text() == f"VERSION={__version__}\n"
    else:
        assert result.returncode != 0
        assert "must agree" in result.stdout
