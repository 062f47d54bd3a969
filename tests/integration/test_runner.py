"""The Ray runner: exact rows, resume, a killed actor, a model that cannot load, ray job submit."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, kill_when_seen, run_cli, stop_processes

from klstore.config import load_config
from klstore.errors import KlstoreError
from klstore.run import runner
from klstore.store import upkeep, views

pytestmark = pytest.mark.real_model


def _prompts(path, n, long_every=None):
    with open(path, "w") as handle:
        for i in range(n):
            text = f"Prompt number {i} says that the answer is"
            if long_every and i % long_every == long_every - 1:
                text = "many words " * 200  # longer than the tiny model's 256-token context
            handle.write(json.dumps({"id": f"q{i:03d}", "text": text, "group": f"g{i % 3}"}) + "\n")


def _config(tmp_path, model_dir, n_prompts=12, shard_size=4, extra_models=(), **overrides):
    prompts = tmp_path / "prompts.jsonl"
    _prompts(prompts, n_prompts, overrides.pop("long_every", None))
    data = {
        "name": "t",
        "store": str(tmp_path / "store"),
        "models": [{"name": str(model_dir), "label": "tiny", "num_gpus": 0.5}, *extra_models],
        "prompts": [{"path": str(prompts)}],
        "probes": ["logit_lens", "skip"],
        "layers": "all",
        "generation": {"max_new_tokens": 3},
        "divergences": ["kl", "js"],
        "shard_size": shard_size,
        **overrides,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _counts(store):
    _, rows = views.sql(
        store,
        "SELECT (SELECT count(*) FROM prompts), (SELECT count(*) FROM generations), "
        "(SELECT count(*) FROM kl), (SELECT count(DISTINCT prompt_id) FROM kl)",
    )
    return rows[0]


def _expected_kl_rows(store):
    _, rows = views.sql(store, "SELECT sum(n_generated) FROM prompts")
    return rows[0][0] * 4 * 2  # 4 layers x 2 probes per generated token


def test_run_writes_exact_rows_and_rerun_skips(ray_session, tiny_model_dir, tmp_path):
    cfg = load_config(_config(tmp_path, tiny_model_dir, long_every=5))
    summary = runner.run(cfg, progress_every=1)
    store = cfg.store
    assert summary["status"] == "completed"
    n_prompts, n_gens, n_kl, distinct = _counts(store)
    assert n_prompts == 12 and distinct == 10 and n_kl == _expected_kl_rows(store) == n_gens * 8
    _, failed = views.sql(store, "SELECT prompt_id, status FROM prompts WHERE status <> 'ok' ORDER BY 1")
    assert failed == [("q004", "error"), ("q009", "error")]
    _, runs = views.sql(store, "SELECT run_id, status, name FROM runs")
    assert runs == [(summary["run_id"], "completed", "t")]
    again = runner.run(cfg, progress_every=1)
    assert again["run_id"] == summary["run_id"] and _counts(store) == (n_prompts, n_gens, n_kl, distinct)
    assert sum(p.cells for p in again["progress"].values()) == 0  # nothing recomputed
    from klstore.store import open_store

    result = upkeep.verify(open_store(store))
    assert result["duplicate_rows"] == 0 and not any(result["problems"].values())


def test_resume_after_interrupted_run(ray_session, tiny_model_dir, tmp_path):
    cfg = load_config(_config(tmp_path, tiny_model_dir, n_prompts=16, shard_size=4))

    def crash(label, result):
        raise KeyboardInterrupt("driver interrupted")

    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, progress_every=1, on_shard_done=crash)
    _, runs = views.sql(cfg.store, "SELECT status FROM runs")
    assert runs == [("failed",)]
    partial = _counts(cfg.store)[0]
    assert 4 <= partial < 16
    summary = runner.run(cfg, progress_every=1)
    assert summary["status"] == "completed"
    assert summary["progress"]["tiny"].cells < _expected_kl_rows(cfg.store)  # done shards skipped
    n_prompts, n_gens, n_kl, _ = _counts(cfg.store)
    assert n_prompts == 16 and n_kl == _expected_kl_rows(cfg.store)
    _, runs = views.sql(cfg.store, "SELECT status FROM runs")
    assert runs == [("completed",)]


def test_killed_actor_is_replaced_and_shard_redone(ray_session, tiny_model_dir, tmp_path, capsys):
    cfg = load_config(_config(tmp_path, tiny_model_dir, n_prompts=90, shard_size=30, generation={"max_new_tokens": 8}))
    thread, killed = kill_when_seen("Worker.run_shard", delay=0.3)  # well inside the shard
    summary = runner.run(cfg, progress_every=1)
    thread.join()
    assert killed, "no actor was seen running a shard"
    assert summary["status"] == "completed"
    n_prompts, n_gens, n_kl, distinct = _counts(cfg.store)
    assert n_prompts == 90 and distinct == 90 and n_kl == _expected_kl_rows(cfg.store)
    from klstore.store import open_store

    result = upkeep.verify(open_store(cfg.store))
    assert result["duplicate_rows"] == 0 and not any(result["problems"].values())
    # the shards table: the lost attempt, and its redo by another actor
    _, lost = views.sql(cfg.store, "SELECT shard_key, actor, error, cells FROM shards WHERE outcome = 'lost'")
    assert len(lost) == 1 and lost[0][1] and lost[0][2] and lost[0][3] is None
    _, ok = views.sql(cfg.store, "SELECT shard_key, actor, cells, device FROM shards WHERE outcome = 'ok'")
    assert len(ok) == 3 and len({row[0] for row in ok}) == 3 and sum(row[2] for row in ok) == n_kl
    redo = [row for row in ok if row[0] == lost[0][0]]
    assert len(redo) == 1 and redo[0][1] != lost[0][1] and redo[0][3] == "cpu"
    from klstore.cli import main

    assert main(["runs", "--shards", summary["run_id"], "--store", cfg.store]) == 0
    out = capsys.readouterr().out
    assert "failed or lost attempts:" in out and "lost" in out and lost[0][1] in out


def test_dry_run_counts_equal_the_real_run(ray_session, tiny_model_dir, tmp_path, capsys):
    from klstore.cli import main
    from klstore.run.plan import RunPlan

    path = _config(tmp_path, tiny_model_dir, n_prompts=8, generation={"max_new_tokens": 2})
    cfg = load_config(path)
    assert main(["run", "--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nothing is computed or written" in out and "upper bound" in out and "29.5 bytes per row" in out
    assert not os.path.exists(cfg.store)  # a dry run creates no store
    before = RunPlan(cfg, write=False).estimate([{"CPU": 2.0}])
    (tiny,) = before.models
    assert (tiny.prompts, tiny.shards, tiny.layers, tiny.kl_rows_in_store) == (8, 2, 4, 0)
    assert tiny.cells == tiny.kl_rows == 8 * 4 * 2 * 2 and tiny.actors == 2
    assert f" {tiny.cells} " in out
    summary = runner.run(cfg, progress_every=5)
    assert summary["status"] == "completed"
    _, rows = views.sql(cfg.store, "SELECT count(*) FROM kl")
    real = rows[0][0]
    after = RunPlan(cfg, write=False).estimate([{"CPU": 2.0}])
    assert after.models[0].kl_rows_in_store == real and after.models[0].shards_done == 2
    _, eos = views.sql(cfg.store, "SELECT count(*) FILTER (WHERE stopped_at_eos) FROM prompts")
    if eos[0][0] == 0:
        assert real == before.kl_rows
    else:
        assert real < before.kl_rows
    assert main(["run", "--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"measured on this store's {real} kl rows" in out


def test_model_that_cannot_load_fails_alone(ray_session, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": -1}')
    cfg = load_config(
        _config(
            tmp_path,
            tiny_model_dir,
            n_prompts=6,
            extra_models=[{"name": str(broken), "label": "broken", "num_gpus": 0.5}],
        )
    )
    summary = runner.run(cfg, progress_every=1)
    assert summary["status"] == "failed"
    assert "broken" in summary["failed_models"]
    assert str(broken) in summary["failed_models"]["broken"]
    _, rows = views.sql(cfg.store, "SELECT model, count(*) FROM prompts GROUP BY model")
    assert rows == [("tiny", 6)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": "all"}, "cfg.yaml: layer: unknown key"),
        ({"shard_size": "big"}, "cfg.yaml: shard_size must be an integer, got 'big'"),
        ({"shard_size": 0}, "shard_size must be at least 1"),
        ({"probes": ["lens"]}, "unknown probe 'lens'"),
        ({"divergences": "kl"}, "divergences must be a list"),
        ({"generation": {"max_tokens": 3}}, "generation.max_tokens: unknown key"),
        ({"models": [{"name": "x", "gpus": 1}]}, "models[0].gpus: unknown key"),
        ({"models": [{"name": "x", "actors": 0}]}, "models[0].actors must be at least 1"),
        ({"name": "../up"}, "run name '../up' cannot name a store folder"),
        ({"layers": "1-x"}, "malformed layer spec"),
        ({"prompts": [{"path": "/nonexistent.jsonl"}]}, "prompts file not found"),
        ({"probes": [{"name": "noise", "scale": -1}]}, "probe noise: scale must be >= 0, got -1"),
        ({"probes": [{"name": "noise", "sigma": 1}]}, "probe noise: unknown parameter 'sigma'"),
        ({"probes": ["patch"]}, "patch needs a source for every prompt; 12 have none"),
    ],
)
def test_config_errors(tmp_path, tiny_model_dir, change, message):
    path = _config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KlstoreError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_config_error_through_cli(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: x\nmodels: [smollm2-135m]\nprompts: []\nprobes: [logit_lens]\nlayer: all\n")
    out = run_cli("run", path)
    assert out.returncode == 2 and "layer: unknown key" in out.stderr and "Traceback" not in out.stderr
    path.write_text("name: [unclosed\n")
    out = run_cli("run", path)
    assert out.returncode == 2 and "cfg.yaml:" in out.stderr and "invalid YAML" in out.stderr


def test_cluster_yaml_matches_ray_schema():
    import jsonschema
    import ray

    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as handle:
        schema = json.load(handle)
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    assert any("klstore" in cmd for cmd in cluster["setup_commands"])
    rayjob = yaml.safe_load((REPO / "jobs" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and "jobs/kl_sweep.py" in rayjob["spec"]["entrypoint"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit(tiny_model_dir, tmp_path):
    """A real `ray start --head` on loopback plus `ray job submit` of jobs/kl_sweep.py."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # AF_UNIX socket paths must stay short
    gcs_port, dash_port = _free_port(), _free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's default for clusters; the CLI then sends ~/.ray/auth_token
    env.setdefault("NO_PROXY", "127.0.0.1,localhost")
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # free ports for the agents: the shared test-session Ray already holds the defaults
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        cfg = _config(tmp_path, tiny_model_dir, n_prompts=6)
        command = [
            ray_bin,
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash_port}",
            "--runtime-env-json",
            json.dumps({"working_dir": str(REPO), "excludes": [".venv", "klstore-data", ".git"]}),
            "--",
            sys.executable,
            "jobs/kl_sweep.py",
            str(cfg),
        ]
        deadline = time.time() + 120
        while True:  # the dashboard's job agent comes up a little after `ray start` returns
            submit = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
            if "No available agent" not in submit.stderr + submit.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-1500:] + "\n" + submit.stderr[-700:]
        assert "succeeded" in submit.stdout
        store = str(tmp_path / "store")
        n_prompts, _, n_kl, _ = _counts(store)
        assert n_prompts == 6 and n_kl == _expected_kl_rows(store)
        _, runs = views.sql(store, "SELECT status FROM runs")
        assert runs == [("completed",)]
    finally:
        _stop_ray_started_in(temp_dir)


def _stop_ray_started_in(temp_dir):
    """Stop only the Ray processes of the cluster started under temp_dir (not `ray stop`)."""
    stop_processes([str(temp_dir)])
    shutil.rmtree(temp_dir, ignore_errors=True)
