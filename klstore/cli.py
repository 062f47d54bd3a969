"""The `klstore` command line. Commands import heavy libraries inside their bodies,
so `klstore --help` answers instantly. A KlstoreError becomes one line on stderr
and exit status 2; nothing else is caught, so a real bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from klstore.errors import KlstoreError

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------- compute
def _add_compute(sub) -> None:
    p = sub.add_parser("compute", help="compute KL matrices for prompts on one model (one process)",
                       description="Generate a continuation per prompt and print layer x token KL matrices.")
    p.add_argument("--model", required=True,
                   help="built-in name (smollm2-135m, gemma3-270m), Hugging Face repo id, folder or .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt text")
    src.add_argument("--prompts", metavar="FILE.jsonl", help='JSON Lines: {"id", "text", "group"?, "source"?}')
    p.add_argument("--probe", action="append", metavar="NAME",
                   help="logit_lens (default), skip, ablate_attn, ablate_mlp, noise, steer, patch; "
                        "repeat for several")
    p.add_argument("--scale", type=float, help="noise: std = scale * rms(h) (default 1)")
    p.add_argument("--alpha", type=float, help="steer: the vector's multiplier (default 1)")
    p.add_argument("--vector", metavar="FILE", help="steer: .pt/.npy/.safetensors, [hidden] or [layers, hidden]")
    p.add_argument("--positive", metavar="FILE.jsonl", help="steer: prompts whose mean activation is added")
    p.add_argument("--negative", metavar="FILE.jsonl", help="steer: prompts whose mean activation is subtracted")
    p.add_argument("--save-vector", metavar="FILE", help="steer: save the vector computed from --positive/--negative")
    p.add_argument("--source", metavar="TEXT", help="patch: the source prompt for --prompt")
    p.add_argument("--layers", default="all", help="layer spec: all, 0,15-21,27, -4--1 (default: all)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=5, help="tokens to generate (default 5)")
    p.add_argument("--divergence", action="append", metavar="NAME",
                   help="kl (default), kl_reverse, js; repeat for several")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and the noise probe's seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument("--png", metavar="PATH",
                   help="write heatmaps; with several prompts or probes, -<prompt id>-<probe> is added to the name")
    p.add_argument("--store", metavar="PATH",
                   help="write results into this store (folder or s3://bucket/prefix) instead of printing them")
    p.add_argument("--run", default="compute", metavar="NAME", help="run name in the store (default: compute)")
    p.add_argument("--label", help="model label in the store (default: derived from --model)")
    p.add_argument("--shard-size", type=int, default=16, help="prompts per written file (default 16)")
    p.set_defaults(func=cmd_compute)


def _compute_inputs(args):
    """Validate everything that needs no model, so bad input fails before a slow load."""
    from klstore import divergence
    from klstore.engine import GenerationSpec, Prompt
    from klstore.probes import ProbeSpec
    from klstore.prompts import load_prompts

    spec = GenerationSpec(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          seed=args.seed, temperature=args.temperature, chat=args.chat)
    divergences = divergence.check_names(args.divergence or ["kl"])
    probes = [ProbeSpec(name, _probe_params(name, args)) for name in dict.fromkeys(args.probe or ["logit_lens"])]
    if args.prompts:
        prompts = load_prompts(args.prompts)
    else:
        if not args.prompt.strip():
            raise KlstoreError("prompt is empty")
        prompts = [Prompt("prompt", args.prompt, source=args.source)]
    if any(p.name == "patch" for p in probes):
        missing = [p.id for p in prompts if not p.source]
        if missing:
            raise KlstoreError(f"prompt {missing[0]!r} has no source (the patch probe needs one: "
                               "--source, or a \"source\" field in the prompts file)")
    from klstore.layerspec import parse_layers

    parse_layers(args.layers, 10**6)  # syntax only; the range is checked against the model
    return spec, divergences, probes, prompts


def _probe_params(name: str, args) -> dict:
    """Probe parameters from the command line (only those the probe takes)."""
    if name == "noise":
        return {"scale": 1.0 if args.scale is None else args.scale, "seed": args.seed}
    if name == "steer":
        given = {"alpha": args.alpha, "vector": args.vector, "positive": args.positive,
                 "negative": args.negative, "save": args.save_vector}
        return {k: v for k, v in given.items() if v is not None}
    return {}


def cmd_compute(args) -> int:
    spec, divergences, probes, prompts = _compute_inputs(args)
    if args.store:
        return _compute_into_store(args, spec, divergences, probes, prompts)
    from klstore.models import quiet_libraries

    quiet_libraries()
    from klstore.engine import Engine
    from klstore.layerspec import parse_layers
    from klstore.models import load

    loaded = load(args.model, device=args.device, dtype=args.dtype,
                  trust_remote_code=args.trust_remote_code)
    engine = Engine(loaded)
    layers = parse_layers(args.layers, engine.n_layers, loaded.label)
    for probe in probes:  # vectors, sub-layers: checked before any work
        engine.prepare(probe, spec)
    for prompt in prompts:  # every prompt is checked (empty, too long) before any work
        engine.encode(prompt, spec)
    results = engine.run_many(prompts, probes, layers, divergences, spec)
    for result in results:
        if isinstance(result, Exception):
            raise result
        if not args.json:
            for matrix in result:
                print(format_table(matrix))
    if args.json:
        print(json.dumps(results_to_json(loaded.label, results), indent=1))
    if args.png:
        _write_pngs(args.png, results, divergences[0])
    failed = [err for matrices in results for m in matrices for err in m.errors]
    for err in failed:
        print(f"klstore: warning: {err}", file=sys.stderr)
    return 1 if failed else 0


def _compute_into_store(args, spec, divergences, probes, prompts) -> int:
    """compute --store: a one-model run in this process, with the same run id and shard
    files as `klstore run` of the equivalent config; failed prompts are recorded."""
    import time

    from klstore.config import ExperimentConfig, ModelConfig
    from klstore.store import check_label, model_label, open_store
    from klstore.worker import Job, Worker, pending_shards, run_id_for, versions

    if args.shard_size <= 0:
        raise KlstoreError(f"--shard-size must be positive, got {args.shard_size}")
    label = check_label(args.label or model_label(args.model), "model label")
    model = ModelConfig(args.model, label, dtype=args.dtype, device=args.device,
                        trust_remote_code=args.trust_remote_code)
    cfg = ExperimentConfig(check_label(args.run, "run name"), args.store, (model,),
                           (args.prompts,) if args.prompts else (), tuple(probes), args.layers, spec,
                           divergences, args.shard_size, source="klstore compute", prompts=tuple(prompts))
    store = open_store(args.store, create=True)  # unwritable: fails before the model loads
    identity = cfg.identity()
    run_id = run_id_for(identity)
    record = {**identity, "store": args.store, "source": cfg.source}
    worker = Worker(args.model, label, args.store, device=args.device, dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code)
    from klstore.layerspec import parse_layers

    parse_layers(args.layers, worker.engine.n_layers, label)
    for probe in probes:  # vectors, sub-layers: checked before anything is written
        worker.engine.prepare(probe, spec)
    job = Job(cfg.probes, cfg.layers, cfg.divergences, cfg.generation)
    store.write_run(run_id, cfg.name, "running", record, versions())
    shards, todo = pending_shards(store, label, run_id, cfg.prompts, cfg.shard_size)
    print(f"run {run_id}: {len(prompts)} prompts in {len(shards)} shards, "
          f"{len(shards) - len(todo)} already done", file=sys.stderr)
    finished = len(prompts) - sum(len(s) for s in todo)
    failed = cells = 0
    start = time.time()
    try:
        for shard in todo:
            result = worker.run_shard(run_id, shard, job)
            finished, failed, cells = finished + result.prompts, failed + result.failed, cells + result.cells
            rate = cells / max(time.time() - start, 1e-9)
            print(f"[{label}] {finished}/{len(prompts)} prompts, {rate:.0f} cells/s", file=sys.stderr)
    except BaseException:
        store.write_run(run_id, cfg.name, "failed", record, versions())
        raise
    store.write_run(run_id, cfg.name, "completed", record, versions())
    print(f"run {run_id} completed: {len(prompts)} prompts ({failed} failed) into {args.store}")
    return 0


def format_table(matrix, divergence_names=None) -> str:
    """Rows = layers, columns = Gen t with its token text; one table per divergence."""
    gen = matrix.generation
    lines = []
    heads = [f"Gen{i} {json.dumps(text, ensure_ascii=False)}" for i, text in enumerate(gen.token_texts)]
    width = max([10] + [len(h) for h in heads])
    for name in divergence_names or matrix.values:
        values = matrix.values[name]
        lines.append(f"{matrix.model} | prompt {matrix.prompt.id} | probe {matrix.probe} | {name} (nats)"
                     + (" | stopped at EOS" if gen.stopped_at_eos else ""))
        lines.append("layer " + " ".join(h.rjust(width) for h in heads))
        for row, layer in enumerate(matrix.layers):
            cells = ("n/a" if v != v else f"{v:.4f}" for v in values[row])
            lines.append(f"{layer:>5} " + " ".join(c.rjust(width) for c in cells))
        lines.append("")
    return "\n".join(lines)


def _nan_to_none(array):
    return [[None if v != v else float(v) for v in row] for row in array.tolist()]


def results_to_json(model: str, results) -> dict:
    prompts = []
    for matrices in results:
        first = matrices[0]
        gen = first.generation
        prompts.append({
            "id": first.prompt.id, "group": first.prompt.group, "text": first.prompt.text,
            "n_prompt_tokens": len(gen.prompt_ids), "stopped_at_eos": gen.stopped_at_eos,
            "tokens": [{"id": t, "text": s, "logprob": float(lp), "entropy": float(h)}
                       for t, s, lp, h in zip(gen.token_ids, gen.token_texts, first.gen_logprob,
                                              first.gen_entropy)],
            "probes": [{
                "probe": m.probe, "params": m.probe_params, "layers": list(m.layers),
                "matrices": {name: _nan_to_none(v) for name, v in m.values.items()},
                "top1_match": m.top1_match.tolist(), "errors": list(m.errors),
            } for m in matrices],
        })
    return {"model": model, "prompts": prompts}


def _write_pngs(path: str, results, divergence_name: str) -> None:
    from klstore import plotting

    target = Path(path)
    if not target.parent.exists():
        raise KlstoreError(f"--png: folder {target.parent} does not exist")
    many = len(results) > 1 or len(results[0]) > 1
    for matrices in results:
        for m in matrices:
            out = target
            if many:
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in m.prompt.id)
                out = target.with_name(f"{target.stem}-{safe}-{m.probe}{target.suffix or '.png'}")
            data = plotting.HeatmapData(
                values=m.values[divergence_name], layers=m.layers,
                columns=plotting.column_labels(m.generation.n, m.generation.token_texts),
                title=f"{m.model} | {m.probe} | {m.prompt.id}", divergence=divergence_name)
            plotting.save(data, out)
            print(f"wrote {out}", file=sys.stderr)


# ------------------------------------------------------------- store commands
def _add_store_commands(sub) -> None:
    def store_arg(p):
        p.add_argument("--store", default=None, metavar="PATH",
                       help="store folder or s3://bucket/prefix (default ./klstore-data)")

    p = sub.add_parser("sql", help="run SQL over the store's views kl, generations, prompts, runs")
    p.add_argument("query", nargs="?", help="a SELECT over kl, generations, prompts, runs")
    store_arg(p)
    p.add_argument("--format", default="table", help="table (default), csv or json")
    p.add_argument("--print-views", action="store_true",
                   help="print the CREATE VIEW statements for the plain duckdb shell")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("runs", help="list runs with status, prompts and size")
    store_arg(p)
    p.add_argument("--format", default="table", help="table (default), csv or json")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("verify", help="check files: unreadable, leftover temporary, duplicate keys")
    store_arg(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compact", help="merge each partition's small files into one")
    store_arg(p)
    p.set_defaults(func=cmd_compact)


def _open_for_reading(path):
    from klstore.store import DEFAULT_STORE, open_store

    return open_store(path or DEFAULT_STORE)


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "csv", "json"):
        raise KlstoreError(f"unknown --format {fmt!r}: choose table, csv or json")


def cmd_sql(args) -> int:
    from klstore import query

    _check_format(args.format)
    store = _open_for_reading(args.store)
    if args.print_views:
        print("\n".join(query.view_statements(store, for_shell=True).values()))
        return 0
    if not args.query:
        raise KlstoreError("no query given (or use --print-views)")
    names, rows = query.sql(store, args.query)
    if names:
        print(query.format_rows(names, rows, args.format))
    return 0


def cmd_runs(args) -> int:
    from klstore import query

    _check_format(args.format)
    runs = query.run_summaries(_open_for_reading(args.store))
    names = ["run_id", "name", "status", "created_at", "prompts", "failed", "kl_rows", "bytes"]
    print(query.format_rows(names, [[r[n] for n in names] for r in runs], args.format))
    return 0


def cmd_verify(args) -> int:
    from klstore import query

    store = _open_for_reading(args.store)
    problems = query.verify(store)
    total = sum(len(v) for v in problems.values())
    for kind, items in problems.items():
        for item in items:
            print(f"{kind}: {item}")
    n_files = sum(len(store.files(t)) for t in ("kl", "generations", "prompts", "runs"))
    print(f"{n_files} files checked: {len(problems['unreadable'])} unreadable, "
          f"{len(problems['temporary'])} temporary, {len(problems['duplicates'])} duplicate keys")
    return 1 if total else 0


def cmd_compact(args) -> int:
    from klstore import query

    merged = query.compact(_open_for_reading(args.store))
    for folder, count in merged:
        print(f"merged {count} files in {folder}")
    print(f"compacted {len(merged)} partitions")
    return 0


# -------------------------------------------------------------------- run
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run an experiment config on Ray (RAY_ADDRESS, or a local Ray)")
    p.add_argument("config", help="experiment config (YAML)")
    p.add_argument("--store", help="override the config's store")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines (default 10)")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from klstore import config as config_module

    cfg = config_module.load(args.config)  # every config error before Ray starts
    store_uri = args.store or cfg.store
    from klstore.store import open_store

    open_store(store_uri, create=True)
    from klstore import runner

    summary = runner.run(cfg, store_uri, progress_every=args.progress_every)
    print(f"run {summary['run_id']} {summary['status']} -> {store_uri}")
    print(cmd_runs_summary(store_uri, summary["run_id"]))
    return 0 if summary["status"] == "completed" else 1


def cmd_runs_summary(store_uri: str, run_id: str) -> str:
    """The printed summary of a run: per model and probe, prompts, cells, mean KL, top-1 rate."""
    from klstore import query

    names, rows = query.sql(store_uri, f"""
        SELECT model, probe, count(DISTINCT prompt_id) AS prompts, count(*) AS cells,
               round(avg(kl), 4) AS mean_kl, round(avg(top1_match::INT), 3) AS top1_rate
        FROM kl WHERE run_id = '{run_id}' GROUP BY ALL ORDER BY ALL""")
    return query.format_rows(names, rows, "table")


# ------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = sub.add_parser("report", help="build the HTML/Markdown report of a store (incremental)")
    p.add_argument("spec", nargs="?", help="report spec (YAML, e.g. reports/default.yaml); "
                                           "default: by model and probe, and by prompt group")
    p.add_argument("--store", help="store folder or s3:// prefix (default: the spec's, else ./klstore-data)")
    p.add_argument("--out", help="output path (default <store>/reports/<spec name>)")
    p.add_argument("--force", action="store_true", help="redraw every figure")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from klstore import reportspec
    from klstore.store import DEFAULT_STORE, open_store

    spec = reportspec.load(args.spec)
    store = open_store(args.store or spec.store or DEFAULT_STORE)
    from klstore import report

    result = report.build(store, spec, out=args.out, force=args.force,
                          log=lambda message: print(message, file=sys.stderr))
    print(result["index"])
    return 0


# -------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from klstore import __version__

    parser = argparse.ArgumentParser(
        prog="klstore", description="Layer x generated-token KL-divergence maps of causal language models.")
    parser.add_argument("--version", action="version", version=f"klstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compute(sub)
    _add_store_commands(sub)
    _add_run(sub)
    _add_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KlstoreError as exc:
        print(f"klstore: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("klstore: interrupted", file=sys.stderr)
        return 130
