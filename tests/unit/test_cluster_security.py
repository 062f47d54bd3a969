"""The cluster manifests start every Ray node with token authentication and keep the dashboard private."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_every_ray_start_in_cluster_yaml_uses_token_auth():
    cluster = _cluster()
    starts = [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key] if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        assert re.match(r"^RAY_AUTH_MODE=token ray start ", command), command
    head = next(c for c in cluster["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"dashboard-host[= :\"']*0\.0\.0\.0", text)
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def _containers(rayjob):
    spec = rayjob["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [
        c for group in spec["rayClusterSpec"]["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]
    ]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"]
    return head + workers + submitter


@pytest.mark.parametrize("index", range(3))
def test_every_rayjob_container_has_the_token(index):
    containers = _containers(yaml.safe_load((REPO / "jobs" / "rayjob.yaml").read_text()))
    assert len(containers) == 3  # head, GPU workers, job submitter
    env = {e["name"]: e for e in containers[index]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "klstore-ray-token", "key": "auth_token"}
    assert "value" not in env["RAY_AUTH_TOKEN"]  # never a token written into the manifest
