"""Report benchmark (issue 4): a full report from 10 million `kl` rows, then an unchanged rerun.

    python benchmarks/report.py [--rows 10000000] [--dir /tmp/klstore-report-bench]

Rows are the synthetic ones of benchmarks/store.py (2 models x 2 probes x 30
layers x 5 tokens per prompt, 8 prompt groups), plus generations and prompts
rows for the per-prompt heatmaps. The report is reports/default.yaml.
Targets: full report <= 60 s, unchanged rerun <= 5 s on this 2-core machine.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from store import LAYERS, MODELS, PROBES, TOKENS, shard_table  # noqa: E402

from klstore.config import load_report_spec  # noqa: E402
from klstore.report import site  # noqa: E402
from klstore.store import GENERATIONS_SCHEMA, PROMPTS_SCHEMA, open_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dir", default="/tmp/klstore-report-bench")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    store = open_store(os.path.join(args.dir, "store"), create=True)
    per_prompt = LAYERS * TOKENS * len(MODELS) * len(PROBES)
    n_prompts = args.rows // per_prompt
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    step = 2048
    for first in range(0, n_prompts, step):
        count = min(step, n_prompts - first)
        ids = [f"prompt-{i:07d}" for i in range(first, first + count)]
        groups = [f"group-{i % 8}" for i in range(first, first + count)]
        for model in MODELS:
            for probe in PROBES:
                store.write("kl", shard_table(rng, first, count), f"part-{first:08d}.parquet",
                            model=model, probe=probe, run_id="bench")
            n = count * TOKENS
            store.write("generations", pa.table({
                "prompt_id": np.repeat(ids, TOKENS), "prompt_group": np.repeat(groups, TOKENS),
                "gen_idx": np.tile(np.arange(TOKENS, dtype=np.int16), count),
                "token_id": rng.integers(0, 1000, n).astype(np.int32),
                "token_text": [f"tok{i % 97}" for i in range(n)],
                "logprob": rng.random(n).astype(np.float32), "entropy": rng.random(n).astype(np.float32),
            }, schema=GENERATIONS_SCHEMA), f"part-{first:08d}.parquet", model=model, run_id="bench")
            store.write("prompts", pa.table({
                "prompt_id": ids, "prompt_group": groups, "prompt_text": [f"text of {i}" for i in ids],
                "source_text": [None] * count, "n_prompt_tokens": np.full(count, 8, np.int32),
                "n_generated": np.full(count, TOKENS, np.int32), "stopped_at_eos": [False] * count,
                "status": ["ok"] * count, "error": [None] * count,
            }, schema=PROMPTS_SCHEMA), f"part-{first:08d}.parquet", model=model, run_id="bench")
    print(f"store: {n_prompts * per_prompt:,} kl rows written in {time.perf_counter() - t0:.1f} s")
    spec = load_report_spec(os.path.join(os.path.dirname(__file__), "..", "reports", "default.yaml"))
    out = os.path.join(args.dir, "report")
    full = site.build(store, spec, out=out, log=lambda m: None)
    print(f"full report:      {full['seconds']:6.1f} s ({full['drawn']} figures drawn; target <= 60 s)")
    again = site.build(store, spec, out=out, log=lambda m: None)
    print(f"unchanged rerun:  {again['seconds']:6.2f} s ({again['drawn']} figures drawn; target <= 5 s)")
    forced = site.build(store, spec, out=out, force=True, log=lambda m: None)
    print(f"forced rebuild:   {forced['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
