"""Reading through fitted lenses from the CLI, a config run and the Python API: the rows each
lens writes, their lens columns, the run identity, and the one-line errors of bad lenses."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import run_cli

from klstore.core import lenses
from klstore.store import views


def _lens_folder(tmp_path, n_layers=4, d_model=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_layers, d_model, d_model, generator=generator) * 0.05
    bias = torch.randn(n_layers, d_model, generator=generator) * 0.3
    weight[-1], bias[-1] = 0.0, 0.0
    lens = lenses.AffineLens("tuned", weight, bias)
    return lenses.save(lens, tmp_path / f"lens-{seed}"), lens


def test_compute_store_through_two_lenses(tiny_model_dir, tmp_path):
    folder, lens = _lens_folder(tmp_path)
    store = tmp_path / "store"
    base = ["compute", "--model", tiny_model_dir, "--prompt", "hello there", "-n", "3", "--store", store]
    plain = run_cli(*base)
    assert plain.returncode == 0, plain.stderr
    both = run_cli(*base, "--lens", "logit", "--lens", folder, "--lens", folder)  # a repeat is read once
    assert both.returncode == 0, both.stderr
    _, runs = views.sql(str(store), "SELECT run_id, config FROM runs ORDER BY created_at")
    assert len(runs) == 2
    assert "lens" not in json.loads(runs[0][1])  # the logit-only run keeps its pre-lens identity
    assert json.loads(runs[1][1])["lens"] == [{"kind": "logit", "id": "logit"}, {"kind": "tuned", "id": lens.id}]
    assert str(folder) not in runs[1][1]
    _, rows = views.sql(
        str(store),
        "SELECT probe, lens, lens_id, count(*) FROM kl WHERE run_id = ? GROUP BY ALL ORDER BY probe",
        [runs[1][0]],
    )
    assert rows == [("logit_lens", "logit", "logit", 12), ("tuned_lens", "tuned", lens.id, 12)]
    # every shard attempt records the model fingerprint that lenses are tied to
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _, prints = views.sql(str(store), "SELECT DISTINCT fingerprint FROM shards")
    assert prints == [(lenses.model_fingerprint(model),)]
    _, cells = views.sql(
        str(store),
        "SELECT probe, layer, gen_idx, kl FROM kl WHERE run_id = ? ORDER BY probe, layer, gen_idx",
        [runs[1][0]],
    )
    logit = np.array([c[3] for c in cells if c[0] == "logit_lens"]).reshape(4, 3)
    tuned = np.array([c[3] for c in cells if c[0] == "tuned_lens"]).reshape(4, 3)
    np.testing.assert_array_equal(tuned[3], logit[3])  # the last block: every lens is the identity
    assert (np.abs(tuned[:3] - logit[:3]) > 1e-4).all()
    # the same lens from a store id gives the same run (its id, not its path, is the identity)
    from klstore.run import lenses as lens_store
    from klstore.store.tables import open_store

    lens_store.put(open_store(str(store)), folder, lens.id)
    again = run_cli(*base, "--lens", "logit", "--lens", lens.id)
    assert again.returncode == 0, again.stderr
    _, count = views.sql(str(store), "SELECT count(*) FROM runs")
    assert count == [(2,)]


def test_a_config_run_and_the_api_read_through_a_lens(tiny_model_dir, tmp_path, ray_session):
    import yaml

    import klstore

    folder, lens = _lens_folder(tmp_path, seed=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "text": "hello there"}\n{"id": "b", "text": "good morning"}\n')
    config = {
        "name": "lensrun",
        "store": str(tmp_path / "store"),
        "models": [{"name": str(tiny_model_dir), "label": "tiny"}],
        "prompts": [str(prompts)],
        "probes": ["logit_lens", "skip"],
        "generation": {"max_new_tokens": 2},
        "lens": ["logit", str(folder)],
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", tmp_path / "run.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    _, rows = views.sql(
        str(tmp_path / "store"), "SELECT probe, lens, lens_id, count(*) FROM kl GROUP BY ALL ORDER BY probe"
    )
    assert rows == [
        ("logit_lens", "logit", "logit", 16),
        ("skip", "logit", "logit", 16),
        ("tuned_lens", "tuned", lens.id, 16),
    ]
    res = klstore.load(str(tiny_model_dir)).compute(
        ["hello there", "good morning"], probes=["logit_lens"], n=2, lens=["logit", str(folder)], progress=False
    )
    _, stored = views.sql(
        str(tmp_path / "store"), "SELECT prompt_id, layer, gen_idx, kl FROM kl WHERE probe = 'tuned_lens' ORDER BY ALL"
    )
    api = res.to_arrow().to_pylist()
    mine = sorted(
        (r["prompt_id"].replace("p0", "a").replace("p1", "b"), r["layer"], r["gen_idx"], r["kl"])
        for r in api
        if r["probe"] == "tuned_lens"
    )
    assert [m[:3] for m in mine] == [s[:3] for s in stored]
    np.testing.assert_allclose([m[3] for m in mine], [s[3] for s in stored], atol=1e-5)
    assert {r["lens_id"] for r in api if r["probe"] == "tuned_lens"} == {lens.id}


def test_bad_lens_on_the_command_line_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    folder, _ = _lens_folder(tmp_path, n_layers=6)  # a lens for a deeper model
    store = tmp_path / "store"
    for lens, message in ((folder, "is for a model with 6 layers of width 32"), ("0123456789abcdef", "no store")):
        result = run_cli("compute", "--model", tiny_model_dir, "--prompt", "hi", "--lens", lens, "--store", store)
        assert result.returncode == 2
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("klstore: error:")]
        assert "Traceback" not in result.stderr
        assert message in line or "does not exist" in line, line
    assert not (store / "kl").exists() and not (store / "runs").exists()
