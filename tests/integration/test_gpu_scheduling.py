"""GPU scheduling without GPUs: a Ray that believes it has 4 GPUs (in a subprocess, so the
session's shared Ray is untouched), the runner's own placement functions and real actors.
The workers' device stays the CPU (`device: cpu`)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.real_model

SCRIPT = textwrap.dedent('''
    import json, sys
    import ray
    from klstore.config import load_config
    from klstore.errors import KlstoreError
    from klstore.run import runner
    from klstore.run.plan import actor_count, actor_cpus
    from klstore.spec import ModelConfig
    from klstore.store import views

    configs = json.loads(sys.argv[1])
    ray.init(num_cpus=4, num_gpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    out = {}
    nodes = runner.cluster_nodes(ray)
    out["nodes"] = nodes

    @ray.remote
    class Probe:
        """Stands in for a model actor: reports the GPUs Ray assigned to it."""
        def gpus(self):
            return ray.get_runtime_context().get_accelerator_ids()["GPU"]

    def place(model):
        count = actor_count(nodes, model, 1)
        options = runner.actor_options(model, actor_cpus(nodes, model, count), True)
        actors = [Probe.options(**options).remote() for _ in range(count)]
        ids = ray.get([a.gpus.remote() for a in actors], timeout=120)
        free = ray.available_resources().get("GPU", 0)
        for actor in actors:
            ray.kill(actor)
        return {"count": count, "ids": ids, "free_gpus": free}

    out["half"] = place(ModelConfig(name="tiny", num_gpus=0.5, num_cpus=0.5, device="cpu"))
    out["half_default_cpus"] = actor_count(nodes, ModelConfig(name="tiny", num_gpus=0.5), 1)
    out["four"] = place(ModelConfig(name="tiny", num_gpus=4, device="cpu"))

    cfg = load_config(configs["four"])  # the whole runner: one actor holding all 4 GPUs
    summary = runner.run(cfg, progress_every=5)
    _, rows = views.sql(cfg.store, "SELECT count(DISTINCT actor), min(device), count(*) FROM shards "
                                   "WHERE outcome = 'ok'")
    out["run"] = {"status": summary["status"], "actors": rows[0][0], "device": rows[0][1], "attempts": rows[0][2]}

    cfg = load_config(configs["five"])
    try:
        runner.run(cfg, progress_every=5)
        out["five"] = None
    except KlstoreError as exc:
        out["five"] = str(exc)
    _, rows = views.sql(cfg.store, "SELECT count(*) FROM runs")
    out["five_runs"] = rows[0][0]
    print("RESULT " + json.dumps(out))
    ray.shutdown()
''')


def _config(tmp_path, model_dir, name, num_gpus):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": f"Prompt {i} says"}) + "\n" for i in range(4)))
    data = {
        "name": name,
        "store": str(tmp_path / f"store-{name}"),
        "models": [{"name": str(model_dir), "label": "tiny", "num_gpus": num_gpus, "device": "cpu"}],
        "prompts": [str(prompts)],
        "probes": ["logit_lens"],
        "generation": {"max_new_tokens": 2},
        "shard_size": 2,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_fake_gpus_pack_fractions_and_refuse_oversized_actors(tiny_model_dir, tmp_path):
    configs = {
        "four": _config(tmp_path, tiny_model_dir, "four", 4),
        "five": _config(tmp_path, tiny_model_dir, "five", 5),
    }
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a Ray of its own
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(configs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    assert out["nodes"][0]["GPU"] == 4
    # num_gpus 0.5: eight actors, two on each of the four GPUs, none left over
    half = out["half"]
    assert half["count"] == 8 and half["free_gpus"] == 0
    assert all(len(ids) == 1 for ids in half["ids"])
    assert sorted(ids[0] for ids in half["ids"]) == sorted(["0", "1", "2", "3"] * 2)
    assert out["half_default_cpus"] == 4  # one CPU per GPU actor by default: the 4 CPUs bound it
    # num_gpus 4: one actor holding every GPU
    assert out["four"]["count"] == 1 and sorted(out["four"]["ids"][0]) == ["0", "1", "2", "3"]
    assert out["run"] == {"status": "completed", "actors": 1, "device": "cpu", "attempts": 2}
    # num_gpus 5: a config error before any actor starts or the run is marked
    assert "num_gpus 5 per actor" in out["five"] and "more than 4 GPUs" in out["five"]
    assert out["five_runs"] == 0
