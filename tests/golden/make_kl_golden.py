"""Regenerates tests/golden/kl_smollm2.json: the stored `kl` values of a small fixed run.

Run from the repo root with the project's venv:
    .venv/bin/python tests/golden/make_kl_golden.py

The golden file was first written by the code before the ground-floor refactor
(issue 9); tests/integration/test_golden.py reruns the same command and demands
byte-identical float32 values, so a restructuring can never move a number.
Values are stored as float32 bit patterns (hex), nulls as null.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "prompts.jsonl"
GOLDEN = HERE / "kl_smollm2.json"
_INPUTS = ["compute", "--model", "smollm2-135m", "--prompts", str(PROMPTS), "--layers", "0,3,14-16,-2,-1", "-n", "3"]
COMMAND = [
    *_INPUTS,
    "--probe",
    "logit_lens",
    "--probe",
    "skip",
    "--probe",
    "ablate_mlp",
    "--probe",
    "noise",
    "--scale",
    "0.5",
    "--probe",
    "patch",
    "--divergence",
    "kl",
    "--divergence",
    "kl_reverse",
    "--divergence",
    "js",
    "--run",
    "golden",
    "--shard-size",
    "2",
]
QUERY = (
    "SELECT run_id, model, probe, prompt_id, prompt_group, layer, gen_idx, kl, kl_reverse, js, top1_match "
    "FROM kl ORDER BY probe, prompt_id, layer, gen_idx"
)
# The default path: `kl` alone goes through the vocabulary-chunked head pass (klstore/core/unembed.py),
# which the command above (three divergences: the row path) never reaches; its lens tokens too.
GOLDEN_HEAD_PASS = HERE / "kl_smollm2_head_pass.json"
COMMAND_HEAD_PASS = [
    *_INPUTS,
    "--probe",
    "logit_lens",
    "--probe",
    "skip",
    "--probe",
    "patch",
    "--run",
    "golden-head",
    "--shard-size",
    "2",
]
QUERY_HEAD_PASS = (
    "SELECT run_id, model, probe, prompt_id, prompt_group, layer, gen_idx, kl, kl_reverse, js, "
    "top1_match, topk_ids, topk_probs, gen_rank, gen_logq FROM kl ORDER BY probe, prompt_id, layer, gen_idx"
)
RUNS = {"row path": (COMMAND, QUERY, GOLDEN), "head pass": (COMMAND_HEAD_PASS, QUERY_HEAD_PASS, GOLDEN_HEAD_PASS)}


def bits(value):
    return None if value is None else struct.pack("<f", value).hex()


def stored_rows(store: str, command: list, query: str) -> list:
    """Run a golden command into `store` and return its kl rows with floats as bit patterns."""
    done = subprocess.run([sys.executable, "-m", "klstore", *command, "--store", store], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    out = subprocess.run(
        [sys.executable, "-m", "klstore", "sql", query, "--store", store, "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    # the json output rounds nothing: floats arrive as Python floats of the float32 values
    out_rows = []
    for r in rows:
        row = {**r, **{k: bits(r[k]) for k in ("kl", "kl_reverse", "js", "gen_logq") if k in r}}
        if r.get("topk_probs") is not None:
            row["topk_probs"] = [bits(v) for v in r["topk_probs"]]
        out_rows.append(row)
    return out_rows


if __name__ == "__main__":
    for command, query, golden in RUNS.values():
        with tempfile.TemporaryDirectory() as tmp:
            rows = stored_rows(str(Path(tmp) / "store"), command, query)
        golden.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
        print(f"wrote {len(rows)} rows to {golden}")
