"""Planning a run for a cluster without Ray: actor placement, config checks against the
cluster's nodes, the dry run's estimate, and the `shards` table of shard attempts."""

import os

import pytest
from tiny_models import ToyTokenizer, build

from klstore.cli import main
from klstore.config import parse_experiment
from klstore.core.models import from_objects
from klstore.errors import KlstoreError
from klstore.run.plan import RunPlan, actor_count, actor_cpus, check_cluster, execute_local
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, ExperimentConfig, GenerationSpec, ModelConfig, ProbeSpec, Prompt
from klstore.store import open_store, views
from klstore.store.upkeep import compact, verify

PROMPTS = tuple(Prompt(f"q{i}", f"prompt number {i} says") for i in range(5))
FOUR_GPUS = [{"CPU": 16.0, "GPU": 4.0}]


@pytest.fixture(scope="module")
def tiny():
    return from_objects("tiny", build("llama"), ToyTokenizer())


def _config(uri: str, **changes) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name="plan",
        store=uri,
        models=(ModelConfig(name="tiny", label="tiny"),),
        prompt_paths=(),
        compute=ComputeSpec((ProbeSpec("logit_lens"), ProbeSpec("skip")), "all", ("kl",), GenerationSpec(3)),
        shard_size=2,
        source="test",
        prompts=PROMPTS,
    )
    return cfg.model_copy(update=changes)


def _run(tiny, uri: str) -> dict:
    plan = RunPlan(_config(uri))
    return execute_local(plan, Worker("tiny", "tiny", plan.store, loaded=tiny), say=lambda m: None)


@pytest.mark.parametrize(
    "nodes, model, n_models, actors",
    [
        (FOUR_GPUS, {"num_gpus": 0.5}, 1, 8),  # fractions pack: two per GPU
        (FOUR_GPUS, {"num_gpus": 0.75}, 1, 4),  # ...but never span GPUs: one 0.75 per GPU
        (FOUR_GPUS, {"num_gpus": 0.5}, 2, 4),  # two models share the cluster evenly
        (FOUR_GPUS, {"num_gpus": 2}, 1, 2),
        (FOUR_GPUS, {"num_gpus": 4}, 1, 1),
        ([{"CPU": 4.0, "GPU": 4.0}], {"num_gpus": 0.5}, 1, 4),  # one CPU each by default: the CPUs bound it
        ([{"CPU": 4.0, "GPU": 4.0}], {"num_gpus": 0.5, "num_cpus": 0.5}, 1, 8),
        ([{"CPU": 2.0, "GPU": 3.0}, {"CPU": 8.0, "GPU": 1.0}], {"num_gpus": 2}, 1, 1),  # per node, not summed
        ([{"CPU": 8.0}], {"num_gpus": 1}, 1, 8),  # num_gpus is ignored without GPUs
        ([{"CPU": 8.0}], {"num_gpus": 1, "actors": 3}, 1, 3),
    ],
)
def test_actor_count_follows_ray_placement(nodes, model, n_models, actors):
    assert actor_count(nodes, ModelConfig(name="m", **model), n_models) == actors


def test_actor_cpus():
    assert actor_cpus(FOUR_GPUS, ModelConfig(name="m", num_gpus=1), 4) == 1.0
    assert actor_cpus([{"CPU": 8.0}], ModelConfig(name="m"), 2) == 4.0
    assert actor_cpus([{"CPU": 4.0}, {"CPU": 4.0}], ModelConfig(name="m"), 1) == 4.0  # at most one node's
    assert actor_cpus([{"CPU": 8.0}], ModelConfig(name="m", num_cpus=3), 2) == 3.0


def test_cluster_checks():
    cfg = _config("./s", models=(ModelConfig(name="m", label="big", num_gpus=5),))
    with pytest.raises(
        KlstoreError, match="model 'big': num_gpus 5 per actor, but no node of the cluster has more than 4 GPUs"
    ):
        check_cluster(cfg, "./s", [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}])
    check_cluster(cfg, "./s", [{"CPU": 8.0}])  # no GPUs anywhere: num_gpus is ignored
    with pytest.raises(KlstoreError, match="num_cpus 32 per actor"):
        check_cluster(_config("./s", models=(ModelConfig(name="m", num_cpus=32),)), "./s", FOUR_GPUS)
    two_nodes = [{"CPU": 8.0}, {"CPU": 8.0}]
    with pytest.raises(
        KlstoreError, match="every node must write to the same place: use an s3:// store, or set `shared_store: true`"
    ):
        check_cluster(_config("./s"), "./s", two_nodes)
    check_cluster(_config("./s", shared_store=True), "./s", two_nodes)
    check_cluster(_config("./s"), "s3://bucket/prefix", two_nodes)
    check_cluster(_config("./s"), "./s", [{"CPU": 8.0}])


def test_shared_store_key_leaves_the_run_id_alone():
    data = {"name": "x", "models": ["smollm2-135m"], "prompts": [], "probes": ["logit_lens"]}
    plain, shared = parse_experiment(data), parse_experiment({**data, "shared_store": True})
    assert not plain.shared_store and shared.shared_store
    assert plain.identity() == shared.identity()
    with pytest.raises(KlstoreError, match="shared_store must be true or false"):
        parse_experiment({**data, "shared_store": "yes"})
    with pytest.raises(KlstoreError, match=r"models\[0\].num_gpus: num_gpus above 1 must be a whole number, got 1.5"):
        parse_experiment({**data, "models": [{"name": "m", "num_gpus": 1.5}]})


def test_dry_run_plan_writes_nothing(tmp_path):
    uri = str(tmp_path / "missing")
    plan = RunPlan(_config(uri), write=False)
    assert plan.store is None and not os.path.exists(uri)
    assert [len(t.prompts) for t in plan.pending("tiny")] == [2, 2, 1]


def test_shard_attempts_recorded_kept_verified_and_compacted(tiny, tmp_path, capsys):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    run_id = RunPlan(_config(uri)).run_id
    _, rows = views.sql(
        uri,
        "SELECT run_id, model, actor, outcome, prompts, cells, node, device, "
        "cells_per_second > 0, ended_at >= started_at FROM shards ORDER BY shard_key",
    )
    assert len(rows) == 3 and {r[:4] for r in rows} == {(run_id, "tiny", "local", "ok")}
    assert sorted(r[4] for r in rows) == [1, 2, 2] and all(r[7] == "cpu" and r[8] and r[9] for r in rows)
    _, kl = views.sql(uri, "SELECT count(*) FROM kl")
    assert sum(r[5] for r in rows) == kl[0][0]  # cells = kl rows over both probes
    assert _run(tiny, uri)["cells"] == 0  # resume: shards takes no part, nothing is redone
    store = open_store(uri)
    Worker("tiny", "tiny", store, loaded=tiny).run_shard(run_id, PROMPTS[:2], RunPlan(_config(uri)).job)
    _, again = views.sql(uri, "SELECT count(*), count(DISTINCT shard_key) FROM shards")
    assert again == [(4, 3)]  # a redone shard adds an attempt, never replaces one
    assert main(["runs", "--shards", run_id, "--store", uri]) == 0
    out = capsys.readouterr().out
    assert "per node:" in out and "per actor:" in out and "failed or lost attempts:" in out and "local" in out
    result = verify(store)
    assert not any(result["problems"].values()) and result["duplicate_rows"] == 0
    compact(store)
    assert len(store.files("shards")) == 1
    assert views.sql(uri, "SELECT count(*) FROM shards")[1] == [(4,)]
    result = verify(store)
    assert not any(result["problems"].values()) and result["duplicate_rows"] == 0


def test_store_without_shards_table(tiny, tmp_path, capsys):
    """Stores written before the shards table: an empty view, and `runs --shards` says why."""
    import shutil

    uri = str(tmp_path / "old")
    _run(tiny, uri)
    shutil.rmtree(os.path.join(uri, "shards"))
    assert views.sql(uri, "SELECT count(*) FROM shards")[1] == [(0,)]
    assert main(["runs", "--shards", "plan", "--store", uri]) == 2
    err = capsys.readouterr().err
    assert "no shard attempts recorded for run 'plan'" in err and len(err.strip().splitlines()) == 1
    result = verify(open_store(uri))
    assert not any(result["problems"].values())


def test_dry_run_estimate_counts_the_store(tiny, tmp_path, monkeypatch):
    import klstore.core.models as models

    monkeypatch.setattr(models, "read_shape", lambda name, trust=False: models.ModelShape(4, 256))
    uri = str(tmp_path / "s")
    before = RunPlan(_config(uri), write=False).estimate([{"CPU": 2.0}], "test")
    (model,) = before.models
    assert (model.prompts, model.shards, model.shards_done, model.layers) == (5, 3, 0, 4)
    assert model.cells == model.kl_rows == 5 * 4 * 3 * 2 and model.kl_rows_in_store == 0
    assert (model.actors, model.actors_started) == (2, 2)
    assert before.bytes_measured_on == 0 and before.bytes_per_kl_row == 3.5 + 5 * 5.2
    _run(tiny, uri)
    after = RunPlan(_config(uri), write=False).estimate([{"CPU": 2.0}], "test")
    _, kl = views.sql(uri, "SELECT count(*) FROM kl")
    assert after.models[0].kl_rows_in_store == after.bytes_measured_on == kl[0][0] <= before.kl_rows
    assert after.models[0].shards_done == 3 and after.models[0].actors_started == 0
    files = open_store(uri).files("kl")
    assert after.bytes_per_kl_row == pytest.approx(sum(os.path.getsize(f) for f in files) / kl[0][0])


def test_dry_run_cli_and_shared_store_flag(tmp_path, monkeypatch, capsys):
    """`klstore run --dry-run` on a two-node cluster: a local store is refused in one line unless
    `--shared-store` says every node mounts it; nothing is written either way."""
    import transformers
    import yaml

    from klstore.run import runner

    model = tmp_path / "model"
    transformers.LlamaConfig(
        num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64
    ).save_pretrained(model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n')
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "d",
                "store": str(tmp_path / "store"),
                "models": [str(model)],
                "prompts": [str(prompts)],
                "probes": ["logit_lens", "skip"],
                "generation": {"max_new_tokens": 4},
            }
        )
    )
    monkeypatch.setattr(runner, "planning_nodes", lambda: ([{"CPU": 4.0}, {"CPU": 4.0}], "a test cluster"))
    assert main(["run", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "every node must write to the same place" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--dry-run", "--shared-store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 node(s), 8 CPUs, 0 GPUs: a test cluster" in out
    assert f"{2 * 3 * 4 * 2} kl rows" in out and not (tmp_path / "store").exists()
