"""``workers = "auto"``: one worker per CPU this process may use, a container's CPU limit
included (cgroup v2 ``cpu.max``, v1 CFS quota), read here from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings
from bridge.server import cpus

URL = "http://127.0.0.1:8080/hook"
MINE = len(os.sched_getaffinity(0))


def tree(tmp_path: Path, files: dict[str, str], own: str = "0::/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own + "\n")
    return root, proc


@pytest.mark.parametrize(
    ("files", "own", "quota"),
    [
        ({}, "0::/", None),  # no cgroup files: no limit
        ({"cpu.max": "max 100000\n"}, "0::/", None),  # v2 without a limit
        ({"cpu.max": "150000 100000\n"}, "0::/", 1.5),  # a container's 1500m
        ({"pod/cpu.max": "50000 100000\n"}, "0::/pod", 0.5),  # our own cgroup, by path
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, "0::/", 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "0::/", None),
        ({"cpu.max": "garbage\n"}, "0::/", None),
    ],
)
def test_cpu_quota_from_cgroup_files(
    tmp_path: Path, files: dict[str, str], own: str, quota: float | None
) -> None:
    root, proc = tree(tmp_path, files, own)
    assert cpus.cpu_quota(root, proc) == quota


def test_a_quota_caps_the_affinity_and_rounds_up(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, {"cpu.max": "50000 100000\n"})
    assert cpus.available_cpus(root, proc) == 1  # half a CPU still runs one worker
    root, proc = tree(tmp_path / "big", {"cpu.max": f"{(MINE + 8) * 100000} 100000\n"})
    assert cpus.available_cpus(root, proc) == MINE  # a quota above the affinity changes nothing


def test_workers_auto_in_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bridge.config.settings.available_cpus", lambda: 3)
    env = {"LMTP_BRIDGE_WEBHOOK_URL": URL, "LMTP_BRIDGE_WORKERS": "auto"}
    assert load_settings(environ=env).workers == 3
    assert (
        load_settings(
            environ={"LMTP_BRIDGE_WEBHOOK_URL": URL}, overrides={"workers": "AUTO"}
        ).workers
        == 3
    )
    with pytest.raises(ConfigError, match="workers"):
        load_settings(environ={**env, "LMTP_BRIDGE_WORKERS": "lots"})
