"""Two Ray nodes on this machine (`ray start` on 127.0.0.1, each with its own CPU), writing
into an S3 store (moto on 127.0.0.1): actors on both nodes, every row once; then the second
node's processes are killed mid-run and the run finishes on the survivor with exactly the
expected rows. Only the processes these tests start are stopped.

Why a private network namespace: Ray keeps every server of a node on loopback only in its
single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, klstore.run.runner.SINGLE_NODE_ENV),
and in that mode `ray start --address=...` refuses a second node ("Multi-node Ray clusters
are not supported"). With multi-node support on, Ray's servers listen on every interface and
its agents on the machine's network address, even with --node-ip-address=127.0.0.1. So a
two-node cluster cannot stay on loopback by Ray's own settings. These tests therefore run in
a network namespace of their own (`unshare --net`), whose only interface is loopback: no
socket of theirs can be reached from, or send to, any other address. The outer test
(`test_multinode_in_a_private_network_namespace`) runs this file again inside one and
requires every test in it to pass; the inner run first checks that loopback is the only
interface there.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from conftest import REPO, stop_processes

pytestmark = pytest.mark.real_model

IN_NAMESPACE = os.environ.get("KLSTORE_NETNS") == "1"
inside_only = pytest.mark.skipif(
    not IN_NAMESPACE, reason="runs inside the private network namespace (test_multinode_in_a_private_network_namespace)"
)

DRIVER = r'''
import json, os, signal, sys, threading
import psutil, ray, yaml
from klstore.config import load_config
from klstore.run import runner
from klstore.store import views

model_dir, tmp, phase, gcs, worker_port = sys.argv[1:6]
ray.init(address=gcs, _node_ip_address="127.0.0.1", log_to_driver=False)
prompts = os.path.join(tmp, "prompts.jsonl")
with open(prompts, "w") as handle:
    for i in range(12):
        handle.write(json.dumps({"id": f"q{i}", "text": f"prompt number {i} says"}) + "\n")
store = os.path.join(tmp, "local-store") if phase == "local" else f"s3://klbucket/multinode-{phase}"
config = os.path.join(tmp, f"cfg-{phase}.yaml")
with open(config, "w") as handle:
    yaml.safe_dump({"name": phase, "store": store,
                    "models": [{"name": model_dir, "label": "tiny", "actors": 2, "num_cpus": 1, "device": "cpu"}],
                    "prompts": [{"path": prompts}], "probes": ["logit_lens", "skip"], "layers": "all",
                    "generation": {"max_new_tokens": 4}, "shard_size": 1}, handle)
cfg = load_config(config)
worker_nodes = [n["NodeID"][:12] for n in ray.nodes()
                if n["Alive"] and str(n.get("NodeManagerPort")) == worker_port]
killed = []

def lose_the_second_node(label, result):
    """Once the second node has stored a shard, SIGKILL its processes: its actor is then handed
    its next shard (right after this callback) and is found dead, a lost attempt."""
    if phase != "loss" or killed:
        return
    _, done_there = views.sql(store, "SELECT count(*) FROM shards WHERE outcome = 'ok' AND node LIKE ?",
                              [f"%/{worker_nodes[0]}%"])
    if not done_there[0][0]:
        return
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if f"--node_manager_port={worker_port}" in " ".join(proc.info["cmdline"] or []):
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                except psutil.NoSuchProcess:
                    pass

if phase == "local":
    from klstore.errors import KlstoreError
    try:
        runner.run(cfg, progress_every=2)
        print("RESULT " + json.dumps({"error": None}))
    except KlstoreError as exc:
        print("RESULT " + json.dumps({"error": str(exc), "store_exists": os.path.exists(store)}))
    ray.shutdown()
    sys.exit(0)
summary = runner.run(cfg, progress_every=2, on_shard_done=lose_the_second_node)
_, rows = views.sql(store, "SELECT count(*), count(DISTINCT (prompt_id, probe, layer, gen_idx)) FROM kl")
_, prompt_rows = views.sql(store, "SELECT count(*), count(DISTINCT prompt_id), sum(n_generated) FROM prompts")
_, attempts = views.sql(store, "SELECT node, outcome, count(*) FROM shards GROUP BY ALL ORDER BY ALL")
_, status = views.sql(store, "SELECT status FROM runs")
print("RESULT " + json.dumps({"status": summary["status"], "kl": rows[0], "prompts": prompt_rows[0],
                              "attempts": attempts, "runs": status, "worker_nodes": worker_nodes,
                              "killed": len(killed)}))
ray.shutdown()
'''


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def two_nodes():
    assert IN_NAMESPACE, "a multi-node Ray listens beyond loopback outside a private network namespace"
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="kn", dir="/tmp")  # AF_UNIX socket paths must stay short
    gcs_port, worker_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"

    def common():  # each node its own free agent ports (the shared test-session Ray holds the defaults)
        return [
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]

    head = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={_free_port()}",
            *common(),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    markers = [temp_dir, f"--node_manager_port={worker_port}"]
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run(
            [
                ray_bin,
                "start",
                f"--address=127.0.0.1:{gcs_port}",
                "--num-cpus=1",
                f"--node-manager-port={worker_port}",
                *common(),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield {"gcs": f"127.0.0.1:{gcs_port}", "worker_port": str(worker_port), "env": env}
    finally:
        stop_processes(markers)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _drive(phase, tiny_model_dir, tmp_path, nodes):
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tiny_model_dir), str(tmp_path), phase, nodes["gcs"], nodes["worker_port"]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env={**nodes["env"], **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


@inside_only
def test_two_nodes_with_an_s3_store_then_node_loss(tiny_model_dir, tmp_path, s3_server, two_nodes):
    local = _drive("local", tiny_model_dir, tmp_path, two_nodes)  # a plain folder on two nodes: refused
    assert local["error"] and "shared_store" in local["error"] and "\n" not in local["error"]
    both = _drive("both", tiny_model_dir, tmp_path, two_nodes)
    assert both["status"] == "completed" and both["runs"] == [["completed"]]
    assert both["prompts"][:2] == [12, 12]
    expected = both["prompts"][2] * 4 * 2  # generated tokens x 4 layers x 2 probes, each once
    assert both["kl"] == [expected, expected]
    assert len(both["worker_nodes"]) == 1
    ok_nodes = {node.split("/")[1] for node, outcome, _ in both["attempts"] if outcome == "ok"}
    assert len(ok_nodes) == 2 and both["worker_nodes"][0] in ok_nodes  # actors ran on both nodes

    lost = _drive("loss", tiny_model_dir, tmp_path, two_nodes)
    assert lost["killed"] > 0
    assert lost["status"] == "completed" and lost["runs"] == [["completed"]]
    assert lost["prompts"][:2] == [12, 12]
    expected = lost["prompts"][2] * 4 * 2
    assert lost["kl"] == [expected, expected]  # exactly the rows, none twice
    lost_node = lost["worker_nodes"][0]
    counts = {(node.split("/")[1], outcome): n for node, outcome, n in lost["attempts"]}
    assert counts.get((lost_node, "lost"), 0) >= 1  # the shard in flight there is recorded lost...
    survivor_ok = sum(n for (node, outcome), n in counts.items() if node != lost_node and outcome == "ok")
    assert survivor_ok + counts.get((lost_node, "ok"), 0) == 12  # ...and redone on the survivor


@inside_only
def test_the_namespace_has_loopback_only():
    with open("/proc/net/dev") as handle:
        interfaces = [line.split(":")[0].strip() for line in handle.readlines()[2:]]
    assert interfaces == ["lo"]
    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback is up
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


@pytest.mark.skipif(IN_NAMESPACE, reason="this is the outer run")
def test_multinode_in_a_private_network_namespace():
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, text=True) if unshare else None
    if probe is None or probe.returncode != 0:
        why = "unshare --net is not available here (it needs root or user namespaces)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + (f": {probe.stderr.strip()}" if probe is not None else ""))
        pytest.skip(why)
    env = {**os.environ, "KLSTORE_NETNS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    script = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider -rA -k "not private_network" "$1"'
    out = subprocess.run(
        [unshare, "--net", "sh", "-c", script, sys.executable, __file__],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0 and summary.startswith("2 passed, 1 deselected"), out.stdout[-4000:] + out.stderr[-2000:]
