"""An exported run loads with Hugging Face `datasets` (`load_dataset(DIR, "kl")` and every other
config), row for row and value for value what the store holds.

`datasets` is not a klstore dependency: it runs in the reference environment build/venv-tunedlens
(`make bench-tunedlens-env`, which .ci/run builds; it pins datasets 5.0.1), offline, in a
subprocess. Where that environment is absent this test skips, except under CI (CI=true), where
it fails and says to build it."""

from __future__ import annotations

import json
import os
import subprocess

from bench_envs import reference_python
from conftest import REPO
from dataset_helpers import make_store, tiny_llama

from klstore.api import export_run
from klstore.store import views
from klstore.store.dataset import RUN_TABLES

VENV = REPO / "build" / "venv-tunedlens"

# Loads each config, and prints its features' dtypes and its rows as JSON (floats by repr: exact).
_LOAD = """
import json, sys
import datasets
datasets.disable_progress_bars()
out = {}
for config in sys.argv[2:]:
    ds = datasets.load_dataset(sys.argv[1], config)
    (split,) = ds
    rows = ds[split].to_list()
    for row in rows:
        for key, value in row.items():
            if hasattr(value, "isoformat"):
                row[key] = value.isoformat()
    out[config] = {"split": split, "columns": ds[split].column_names, "rows": rows}
print(json.dumps(out))
"""


def _python():
    return reference_python(VENV, "reference (with datasets)", "bench-tunedlens-env")


def _normal(value):
    """A store value as JSON gives it back: timestamps as ISO text."""
    return value.isoformat() if hasattr(value, "isoformat") else value


def test_load_dataset_reads_every_config(tmp_path):
    python = _python()
    uri, run_id, _ = make_store(tiny_llama(), tmp_path)
    folder = tmp_path / "export"
    export_run(run_id, folder, store=uri)
    configs = [*RUN_TABLES, "tokens", "lens_tokens"]
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [str(python), "-c", _LOAD, str(folder), *configs],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for config in configs:
        if config == "tokens":
            query = "SELECT * FROM tokens WHERE model IN (SELECT model FROM kl WHERE run_id = ?)"
        else:
            query = f"SELECT * FROM {config} WHERE run_id = ?"
        names, rows = views.sql(uri, query, [run_id])
        got = loaded[config]
        assert got["split"] == "train" and got["columns"] == names, config
        expected = sorted(json.dumps([_normal(v) for v in row]) for row in rows)
        actual = sorted(json.dumps([row[n] for n in names]) for row in got["rows"])
        assert actual == expected, config  # every value; float32 values exactly (the same doubles)
        assert len(rows) > 0, config
    kl = loaded["kl"]["rows"]
    assert {r["probe"] for r in kl} == {"logit_lens", "tuned_lens", "skip"}
    assert {r["layer"] for r in kl} == {0, 2, 3} and all(len(r["topk_ids"]) == 5 for r in kl)
