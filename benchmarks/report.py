"""Report benchmark (issues 4, 11 and 13): drawing in parallel vs in one process, on the demo's
shape and on 10 million `kl` rows with top-5 lens tokens.

    python benchmarks/report.py [--rows 10000000] [--dir /tmp/klstore-report-bench] [--skip-serial]

1. Demo shape: 2 models (30 and 18 layers, as SmolLM2-135M and Gemma-3-270M) x 3 probes x 24
   prompts in 3 groups x 5 tokens with top-5 lens tokens: reports/default.yaml draws 57
   figures and writes 144 prompt pages. Built with one drawing process, then with one per
   CPU (the default), in this process: the times and their ratio.
2. 10 M rows: 2 models x 2 probes x 30 layers x 5 tokens per prompt, 8 prompt groups, top-5
   lens tokens, plus generations, prompts and vocabulary rows: the full report (default
   workers), an unchanged rerun, and forced rebuilds with one process and with the default.

Targets: demo report <= 15 s and 10 M rows <= 30 s (issue 13, 2 cores); 10 M rows with k = 5
<= 60 s (issue 11); unchanged rerun <= 5 s (issue 4). Synthetic values: log-normal KL that
falls with depth, random top-k ids over a 1,000-token vocabulary. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from klstore.config import load_report_spec  # noqa: E402
from klstore.report import drawing, site  # noqa: E402
from klstore.store import GENERATIONS_SCHEMA, KL_SCHEMA, PROMPTS_SCHEMA, open_store  # noqa: E402
from klstore.store.tables import TOKENS_SCHEMA  # noqa: E402

TOKENS, TOPK, VOCAB = 5, 5, 1000
SPEC = os.path.join(os.path.dirname(__file__), "..", "reports", "default.yaml")


def kl_table(rng, ids, groups, layers: int) -> pa.Table:
    """kl rows of the prompts `ids` (one model and probe): every layer x token, top-5 tokens."""
    cells = layers * TOKENS
    n = len(ids) * cells
    index = pa.array(np.repeat(np.arange(len(ids)), cells))
    layer = np.tile(np.repeat(np.arange(layers, dtype=np.int16), TOKENS), len(ids))
    kl = (np.exp(-layer / 8.0) * 12.0 * rng.lognormal(0.0, 0.5, n)).astype(np.float32)
    probs = np.sort(rng.dirichlet(np.ones(TOPK + 1), n)[:, :TOPK].astype(np.float32), axis=1)[:, ::-1]
    offsets = pa.array(np.arange(0, (n + 1) * TOPK, TOPK, dtype=np.int32))
    columns = {
        "prompt_id": pa.DictionaryArray.from_arrays(index, pa.array(ids)).cast(pa.string()),
        "prompt_group": pa.DictionaryArray.from_arrays(index, pa.array(groups)).cast(pa.string()),
        "layer": layer,
        "gen_idx": np.tile(np.arange(TOKENS, dtype=np.int16), len(ids) * layers),
        "kl": kl,
        "kl_reverse": pa.nulls(n, pa.float32()),
        "js": pa.nulls(n, pa.float32()),
        "top1_match": rng.random(n) < np.exp(-(layers - layer) / 6.0),
        "n_layers": np.full(n, layers, np.int16),
        "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, VOCAB, n * TOPK, dtype=np.int32))),
        "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1))),
        "gen_rank": rng.integers(1, 50, n, dtype=np.int32),
        "gen_logq": -rng.exponential(2.0, n).astype(np.float32),
    }
    # every other column of the schema (lens, lens_id, q_entropy, ...) null, as in older files
    columns.update({f.name: pa.nulls(n, f.type) for f in KL_SCHEMA if f.name not in columns})
    return pa.table(columns, schema=KL_SCHEMA)


def write_store(root: str, n_prompts: int, models: dict, probes, n_groups: int, step: int = 2048):
    """A store of `n_prompts` per model; models: label -> number of layers."""
    shutil.rmtree(root, ignore_errors=True)
    store = open_store(root, create=True)
    rng = np.random.default_rng(0)
    for model in models:
        texts = [" " * (i % 3 == 0) + f"tok{i}" for i in range(VOCAB)]
        store.write(
            "tokens",
            pa.table({"token_id": np.arange(VOCAB, dtype=np.int32), "token_text": texts}, schema=TOKENS_SCHEMA),
            "vocab-bench.parquet",
            model=model,
        )
    for first in range(0, n_prompts, step):
        count = min(step, n_prompts - first)
        ids = [f"prompt-{i:07d}" for i in range(first, first + count)]
        groups = [f"group-{i % n_groups}" for i in range(first, first + count)]
        for model, layers in models.items():
            for probe in probes:
                store.write(
                    "kl",
                    kl_table(rng, ids, groups, layers),
                    f"part-{first:08d}.parquet",
                    model=model,
                    probe=probe,
                    run_id="bench",
                )
            n = count * TOKENS
            store.write(
                "generations",
                pa.table(
                    {
                        "prompt_id": np.repeat(ids, TOKENS),
                        "prompt_group": np.repeat(groups, TOKENS),
                        "gen_idx": np.tile(np.arange(TOKENS, dtype=np.int16), count),
                        "token_id": rng.integers(0, VOCAB, n).astype(np.int32),
                        "token_text": [f" tok{i % 97}" for i in range(n)],
                        "logprob": rng.random(n).astype(np.float32),
                        "entropy": rng.random(n).astype(np.float32),
                    },
                    schema=GENERATIONS_SCHEMA,
                ),
                f"part-{first:08d}.parquet",
                model=model,
                run_id="bench",
            )
            store.write(
                "prompts",
                pa.table(
                    {
                        "prompt_id": ids,
                        "prompt_group": groups,
                        "prompt_text": [f"text of {i}" for i in ids],
                        "source_text": [None] * count,
                        "n_prompt_tokens": np.full(count, 8, np.int32),
                        "n_generated": np.full(count, TOKENS, np.int32),
                        "stopped_at_eos": [False] * count,
                        "status": ["ok"] * count,
                        "error": [None] * count,
                    },
                    schema=PROMPTS_SCHEMA,
                ),
                f"part-{first:08d}.parquet",
                model=model,
                run_id="bench",
            )
    return store


def cpu(result: dict, cpus: int) -> str:
    """The build's CPU work, and the wall time it needs at least on `cpus` idle CPUs (this machine
    is often shared, so wall times alone say little)."""
    main, drawing_s = result["cpu_seconds"]["main"], result["cpu_seconds"]["drawing"]
    floor = max(main, (main + drawing_s) / cpus)
    return f"CPU {main:.1f} s + {drawing_s:.1f} s drawing: >= {floor:.1f} s on {cpus} idle CPUs"


def demo_shape(root: str, skip_serial: bool) -> None:
    t0 = time.perf_counter()
    store = write_store(
        os.path.join(root, "demo-store"), 24, {"model-30": 30, "model-18": 18}, ("logit_lens", "skip", "noise"), 3
    )
    print(f"demo-shaped store: 24 prompts x 2 models x 3 probes written in {time.perf_counter() - t0:.1f} s")
    spec = load_report_spec(SPEC)
    out = os.path.join(root, "demo-report")
    workers = drawing.available_cpus()
    serial = None if skip_serial else site.build(store, spec, out=out, force=True, log=lambda m: None, workers=1)
    parallel = site.build(store, spec, out=out, force=True, log=lambda m: None)
    print(f"demo report, {parallel['drawn']} figures:")
    if serial:
        print(f"  1 drawing process:        {serial['seconds']:6.1f} s ({cpu(serial, 1)})")
    print(
        f"  {workers} drawing processes:      {parallel['seconds']:6.1f} s (target <= 15 s; {cpu(parallel, workers)})"
        + (f"; {serial['seconds'] / parallel['seconds']:.2f}x faster than one" if serial else "")
    )


def ten_million(root: str, rows: int, skip_serial: bool) -> None:
    models, probes = {"model-a": 30, "model-b": 30}, ("logit_lens", "skip")
    per_prompt = 30 * TOKENS * len(models) * len(probes)
    n_prompts = rows // per_prompt
    t0 = time.perf_counter()
    store = write_store(os.path.join(root, "store"), n_prompts, models, probes, 8)
    print(
        f"store: {n_prompts * per_prompt:,} kl rows with top-{TOPK} tokens written in {time.perf_counter() - t0:.1f} s"
    )
    spec = load_report_spec(SPEC)
    out = os.path.join(root, "report")
    full = site.build(store, spec, out=out, log=lambda m: None)
    cpus = drawing.available_cpus()
    print(
        f"full report:      {full['seconds']:6.1f} s ({full['drawn']} figures drawn; "
        f"targets <= 30 s (issue 13), <= 60 s (issue 11); {cpu(full, cpus)})"
    )
    again = site.build(store, spec, out=out, log=lambda m: None)
    print(f"unchanged rerun:  {again['seconds']:6.2f} s ({again['drawn']} figures drawn; target <= 5 s)")
    forced = site.build(store, spec, out=out, force=True, log=lambda m: None)
    print(f"forced rebuild:   {forced['seconds']:6.1f} s ({cpus} drawing processes; {cpu(forced, cpus)})")
    if not skip_serial:
        serial = site.build(store, spec, out=out, force=True, log=lambda m: None, workers=1)
        print(
            f"forced rebuild:   {serial['seconds']:6.1f} s (1 drawing process; {cpu(serial, 1)}; "
            f"parallel is {serial['seconds'] / forced['seconds']:.2f}x faster)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dir", default="/tmp/klstore-report-bench")
    parser.add_argument("--skip-serial", action="store_true", help="skip the single-process builds")
    parser.add_argument("--demo-only", action="store_true", help="only the demo-shaped report")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)  # a report left from a previous run would be found unchanged
    print(f"{drawing.available_cpus()} CPUs available")
    demo_shape(args.dir, args.skip_serial)
    if not args.demo_only:
        ten_million(args.dir, args.rows, args.skip_serial)


if __name__ == "__main__":
    main()
