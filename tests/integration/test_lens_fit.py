"""`klstore lens fit` over Ray Train on a tiny model: two workers give one worker's translators,
a killed fit resumes to the uninterrupted result, the store holds the lens and its evaluation,
and bad fit configs are one-line errors that write nothing."""

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

from klstore.core import lenses
from klstore.run import fit as fitting_run
from klstore.run.holds import HOLD_VARIABLE
from klstore.spec import parse_fit
from klstore.store import views


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents=40, words=40, seed=0)


def _config(tiny_model_dir, text, store, **changes) -> dict:
    config = {
        "name": "tiny",
        "store": str(store),
        "model": str(tiny_model_dir),
        "kind": "tuned",
        "init": "least_squares",
        "corpus": {"path": str(text), "seq_len": 32, "held_out": 4},
        "train": {"tokens": 768, "tokens_per_step": 128, "lr_scale": 5.0},
        "workers": 1,
        "checkpoint_every": 2,
    }
    config.update(changes)
    return config


def _tuned(store, result) -> lenses.AffineLens:
    (tuned,) = [lens for lens in result["lenses"] if lens["kind"] == "tuned"]
    return lenses.load(store / "lens_files" / tuned["id"])


def test_two_workers_fit_one_workers_translators(ray_session, tiny_model_dir, corpus, tmp_path):
    quiet = lambda message: None  # noqa: E731
    spec = parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s1"))
    one = fitting_run.fit(spec, say=quiet)
    two = fitting_run.fit(parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s2", workers=2)), say=quiet)
    a, b = _tuned(tmp_path / "s1", one), _tuned(tmp_path / "s2", two)
    start = lenses.load(tmp_path / "s1" / "lens_files" / one["lenses"][1]["id"])  # least squares: where it began
    assert (a.weight - start.weight).abs().max() > 1e-4, "training moved the translators"
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(b.bias, a.bias, rtol=1e-4, atol=2e-6)
    # the store: the lenses table, lens_eval rows for every lens and layer, checksummed files
    _, rows = views.sql(str(tmp_path / "s2"), "SELECT kind, workers, tokens FROM lenses ORDER BY kind")
    assert rows == [("least_squares", 2, fitting_run.read_corpus(spec).n_train_tokens), ("tuned", 2, 768)]
    _, evals = views.sql(
        str(tmp_path / "s2"), "SELECT lens, count(*), min(tokens), max(tokens) FROM lens_eval GROUP BY lens ORDER BY 1"
    )
    assert evals == [("least_squares", 4, 128, 128), ("logit", 4, 128, 128), ("tuned", 4, 128, 128)]
    _, last = views.sql(str(tmp_path / "s2"), "SELECT lens, kl FROM lens_eval WHERE layer = 3")
    assert all(kl == pytest.approx(0.0, abs=1e-6) for _, kl in last)  # every lens is the identity at the last block
    assert (tmp_path / "s2" / "lens_files" / b.id / "params.pt.sha256.json").exists()
    again = fitting_run.fit(parse_fit(_config(tiny_model_dir, corpus, tmp_path / "s2", workers=2)), say=quiet)
    assert again == two  # a finished fit is not redone
    # klstore lens list / lens eval read the same rows
    listed = run_cli("lens", "list", "--store", tmp_path / "s2", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    by_kind = {row["kind"]: row for row in json.loads(listed.stdout)}
    assert set(by_kind) == {"least_squares", "tuned"} and by_kind["tuned"]["lens_id"] == b.id
    _, means = views.sql(
        str(tmp_path / "s2"), "SELECT lens, round(avg(kl), 4) FROM lens_eval GROUP BY lens ORDER BY lens"
    )
    means = dict(means)
    assert by_kind["tuned"]["held_out_kl"] == means["tuned"] and by_kind["tuned"]["logit_kl"] == means["logit"]
    evaluated = run_cli("lens", "eval", "--store", tmp_path / "s2", "--format", "json")
    assert evaluated.returncode == 0, evaluated.stderr
    table = json.loads(evaluated.stdout)
    assert len(table) == 12 and {row["lens"] for row in table} == {"logit", "least_squares", "tuned"}


def test_killed_fit_resumes_to_the_uninterrupted_lens(tiny_model_dir, corpus, tmp_path):
    import yaml

    store_a, store_b = tmp_path / "whole", tmp_path / "killed"
    for store in (store_a, store_b):
        (tmp_path / f"{store.name}.yaml").write_text(yaml.safe_dump(_config(tiny_model_dir, corpus, store)))
    whole = run_cli("lens", "fit", tmp_path / "whole.yaml")
    assert whole.returncode == 0, whole.stderr[-2000:]
    # the worker stops after step 4's checkpoint (klstore.run.holds): the kill finds that state
    env = {**os.environ, "PYTHONUNBUFFERED": "1", HOLD_VARIABLE: "tuned-step-4"}
    process = subprocess.Popen(
        [sys.executable, "-m", "klstore", "lens", "fit", str(tmp_path / "killed.yaml")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    deadline = time.time() + 300
    for line in process.stdout:
        seen.append(line)
        if "step 4/6" in line or time.time() > deadline:
            break
    os.killpg(process.pid, signal.SIGKILL)  # the driver, its local Ray and the Ray Train workers
    process.wait()
    assert any("step 4/6" in line for line in seen), "".join(seen)[-2000:]
    assert (store_b / "lens_fits").exists() and not list(store_b.glob("lenses/**/*.parquet"))
    resumed = run_cli("lens", "fit", tmp_path / "killed.yaml")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stdout + resumed.stderr
    a = lenses.load(next(store_a.glob("lens_files/*/klstore.json")).parent)
    tuned = [p.parent for p in store_b.glob("lens_files/*/klstore.json") if '"tuned"' in p.read_text()]
    a = [lenses.load(p.parent) for p in store_a.glob("lens_files/*/klstore.json") if '"tuned"' in p.read_text()][0]
    b = lenses.load(tuned[0])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.id == b.id


BAD_FITS = {
    "an empty corpus": (lambda c, p: {"corpus": {"path": str(_text(p, "")), "seq_len": 32}}, "is empty"),
    "a corpus shorter than one sequence": (
        lambda c, p: {"corpus": {"path": str(_text(p, "the of and")), "seq_len": 32, "held_out": 1}},
        "fewer than one sequence of 32",
    ),
    "a non-finite learning rate": (lambda c, p: {"train": {"tokens": 64, "lr_scale": float("nan")}}, "train.lr_scale"),
    "a negative learning rate": (lambda c, p: {"train": {"tokens": 64, "lr_scale": -1.0}}, "train.lr_scale"),
    "no token budget": (lambda c, p: {"train": {"lr_scale": 1.0}}, "train.tokens"),
    "no recipe for a tuned lens": (lambda c, p: {"train": None}, "a tuned lens needs a training recipe"),
    "an unknown kind": (lambda c, p: {"kind": "magic"}, "kind"),
    "more workers than sequences per step": (lambda c, p: {"workers": 8}, "fewer than the 8 workers"),
}


def _text(folder, text):
    path = folder / "c.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_FITS))
def test_bad_fit_configs_are_one_line_errors_with_nothing_written(case, tiny_model_dir, corpus, tmp_path):
    import yaml

    change, message = BAD_FITS[case]
    config = _config(tiny_model_dir, corpus, tmp_path / "store", **change(corpus, tmp_path))
    if config.get("train") is None:
        config.pop("train")
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("lens", "fit", tmp_path / "fit.yaml")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("klstore: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()


def test_dry_run_computes_and_writes_nothing(tiny_model_dir, corpus, tmp_path):
    import yaml

    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(_config(tiny_model_dir, corpus, tmp_path / "store")))
    result = run_cli("lens", "fit", tmp_path / "fit.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    spec = parse_fit(_config(tiny_model_dir, corpus, tmp_path / "store"))
    assert f"dry run of lens fit {fitting_run.fit_id_for(spec)}" in result.stdout
    assert "6 step(s) of 4 sequence(s) x 32 tokens" in result.stdout
    assert not (tmp_path / "store").exists()
