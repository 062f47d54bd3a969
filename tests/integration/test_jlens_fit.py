"""`klstore lens fit` with kind jacobian on a tiny model: the fitted J-lens equals the estimator
run in one process over the same prompts, two workers equal one, a killed fit resumes without
recomputing finished shards, and bad settings are one-line errors that write nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli
from lens_helpers import word_corpus

from klstore.core import jacobian, lenses
from klstore.core.adapter import Adapter
from klstore.core.models import load_model
from klstore.run import fit as fitting_run
from klstore.run.holds import HOLD_VARIABLE
from klstore.spec import parse_fit
from klstore.store import views


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("jcorpus") / "corpus.jsonl", documents=12, words=30, seed=1)


def _config(tiny_model_dir, text, store, **changes) -> dict:
    config = {
        "name": "tinyj",
        "store": str(store),
        "model": str(tiny_model_dir),
        "kind": "jacobian",
        "corpus": {"path": str(text), "seq_len": 12, "held_out": 2, "train_sequences": 6},
        "jacobian": {"skip": 3, "dim_batch": 8, "shard_size": 2},
        "workers": 1,
    }
    config.update(changes)
    return config


def _jlens(store, result) -> lenses.AffineLens:
    (entry,) = [lens for lens in result["lenses"] if lens["kind"] == "jacobian"]
    return lenses.load(store / "lens_files" / entry["id"])


def test_jacobian_fit_equals_the_estimator_and_two_workers_equal_one(ray_session, tiny_model_dir, corpus, tmp_path):
    quiet = lambda message: None  # noqa: E731
    spec = parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s1"))
    one = fitting_run.fit(spec, say=quiet)
    two = fitting_run.fit(parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s2", workers=2)), say=quiet)
    a, b = _jlens(tmp_path / "s1", one), _jlens(tmp_path / "s2", two)
    torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0)  # the same shards, merged in index order
    # the estimator in this process over the same packed prompts
    loaded = load_model(str(tiny_model_dir), device="cpu")
    loaded.model.requires_grad_(False)
    adapter = Adapter.discover(loaded.model)
    data = fitting_run.read_corpus(spec, loaded.tokenizer)
    sums = jacobian.JacobianSums.zeros(4, 32)
    for row in range(data.train.shape[0]):
        sums.add(jacobian.prompt_jacobian(loaded.model, adapter, data.train[row : row + 1], skip=3, dim_batch=8))
    expected = sums.lens()
    torch.testing.assert_close(a.weight, expected.weight, rtol=1e-5, atol=1e-6)
    assert a.kind == "jacobian" and not a.bias.any() and not a.weight[-1].any()
    _, rows = views.sql(str(tmp_path / "s2"), "SELECT kind, workers, tokens, recipe FROM lenses")
    ((kind, workers, tokens, recipe),) = rows
    assert (kind, workers, tokens) == ("jacobian", 2, 6 * 12)
    assert json.loads(recipe)["prompts"] == 6 and json.loads(recipe)["skipped_prompts"] == 0
    _, evals = views.sql(str(tmp_path / "s2"), "SELECT lens, count(*) FROM lens_eval GROUP BY lens ORDER BY lens")
    assert evals == [("jacobian", 4), ("logit", 4)]


def test_a_fit_of_some_source_layers_equals_the_estimator_on_those_blocks(
    ray_session, tiny_model_dir, corpus, tmp_path
):
    """source_layers 1-2 of a 4-block model: the lens holds J at blocks 1 and 2 (the estimator over
    those blocks in this process), refuses block 0, has lens_eval rows at 1-3 only, and its
    recipe and artifact name the blocks; the fit id differs from the whole fit's."""
    spec = parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s", jacobian={"skip": 3, "source_layers": "1-2"}))
    result = fitting_run.fit(spec, say=lambda message: None)
    lens = _jlens(tmp_path / "s", result)
    assert lens.blocks == (1, 2) and lens.readable == (1, 2, 3)
    loaded = load_model(str(tiny_model_dir), device="cpu")
    loaded.model.requires_grad_(False)
    adapter = Adapter.discover(loaded.model)
    data = fitting_run.read_corpus(spec, loaded.tokenizer)
    sums = jacobian.JacobianSums.zeros(4, 32, (1, 2))
    for row in range(data.train.shape[0]):
        ids = data.train[row : row + 1]
        sums.add(jacobian.prompt_jacobian(loaded.model, adapter, ids, skip=3, dim_batch=8, blocks=(1, 2)))
    torch.testing.assert_close(lens.weight, sums.lens().weight, rtol=1e-5, atol=1e-6)
    assert not lens.weight[0].any() and not lens.weight[3].any()
    _, recipe = views.sql(str(tmp_path / "s"), "SELECT recipe FROM lenses")
    recipe = json.loads(recipe[0][0])
    assert recipe["source_layers"] == "1-2" and recipe["blocks"] == [1, 2] and recipe["prompts"] == 6
    _, evals = views.sql(
        str(tmp_path / "s"), "SELECT lens, list(layer ORDER BY layer) FROM lens_eval GROUP BY lens ORDER BY lens"
    )
    assert evals == [("jacobian", [1, 2, 3]), ("logit", [0, 1, 2, 3])]
    # `klstore lens list` compares it with the logit lens on the same layers (1-3), not on all four
    from klstore.store import upkeep

    names, listed = upkeep.lens_summaries(str(tmp_path / "s"))
    (row,) = [dict(zip(names, r)) for r in listed]
    _, logit = views.sql(
        str(tmp_path / "s"), "SELECT round(avg(kl), 4) FROM lens_eval WHERE lens = 'logit' AND layer IN (1, 2, 3)"
    )
    assert row["logit_kl"] == logit[0][0]
    artifact = torch.load(next((tmp_path / "s").glob("lens_files/*/jlens.pt")), weights_only=True)
    assert artifact["source_layers"] == [1, 2] and artifact["metadata"]["target_layer"] == 3
    whole = parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s", jacobian={"skip": 3}))
    assert fitting_run.fit_id_for(whole) != result["fit_id"]


def test_killed_jacobian_fit_resumes_without_recomputing_shards(tiny_model_dir, corpus, tmp_path):
    import yaml

    config = _config(tiny_model_dir, corpus, tmp_path / "store", jacobian={"skip": 3, "dim_batch": 1, "shard_size": 1})
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "klstore", "lens", "fit", str(tmp_path / "fit.yaml")],
        cwd=REPO,
        # the worker stops after writing shard 2 (klstore.run.holds), so the kill finds exactly 3
        env={**os.environ, "PYTHONUNBUFFERED": "1", HOLD_VARIABLE: "jacobian-shard-2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    shards = tmp_path / "store" / "lens_fits"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*/jacobian-*.pt"))) < 3:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("*/jacobian-*.pt")}
    assert sorted(finished) == [f"jacobian-{i:06d}.pt" for i in range(3)], sorted(finished)
    resumed = run_cli("lens", "fit", tmp_path / "fit.yaml")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*/jacobian-*.pt")}
    assert len(after) == 6 and all(after[name] == mtime for name, mtime in finished.items())  # not recomputed
    whole = run_cli(
        "lens",
        "fit",
        _write_yaml(tmp_path, _config(tiny_model_dir, corpus, tmp_path / "whole", jacobian=config["jacobian"])),
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    a = [lenses.load(p.parent) for p in (tmp_path / "whole").glob("lens_files/*/klstore.json")][0]
    b = [lenses.load(p.parent) for p in (tmp_path / "store").glob("lens_files/*/klstore.json")][0]
    assert a.id == b.id


def _write_yaml(tmp_path, config):
    import yaml

    path = tmp_path / "whole.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BAD = {
    "every prompt shorter than the skipped positions": (
        {"jacobian": {"skip": 11}},
        "no valid position",
    ),
    "dim_batch 0": ({"jacobian": {"dim_batch": 0}}, "jacobian.dim_batch"),
    "a negative skip": ({"jacobian": {"skip": -1}}, "jacobian.skip"),
    "source_layers beyond the model": ({"jacobian": {"skip": 3, "source_layers": "1-4"}}, "layer 4:"),
    "source_layers of the last block only": (
        {"jacobian": {"skip": 3, "source_layers": "-1"}},
        "names only the last block (3 of",
    ),
    "source_layers that are not a layer spec": (
        {"jacobian": {"skip": 3, "source_layers": "1..2"}},
        "jacobian.source_layers",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_jacobian_settings_are_one_line_errors(case, tiny_model_dir, corpus, tmp_path):
    change, message = BAD[case]
    path = _write_yaml(tmp_path, _config(tiny_model_dir, corpus, tmp_path / "store", **change))
    result = run_cli("lens", "fit", path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("klstore: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "store").exists()
