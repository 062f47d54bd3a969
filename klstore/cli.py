"""The `klstore` command line. Commands import heavy libraries inside their bodies,
so `klstore --help` answers instantly. A KlstoreError becomes one line on stderr
and exit status 2; nothing else is caught, so a real bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from klstore import output
from klstore.errors import KlstoreError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`klstore: error: ...`, exit 2) instead of a usage dump."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"klstore: error: {self.prog}: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------- compute
def _finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused with the value named)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_compute(sub) -> None:
    p = sub.add_parser(
        "compute",
        help="compute KL matrices for prompts on one model (one process)",
        description="Generate a continuation per prompt and print layer x token KL matrices.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="built-in name (smollm2-135m, gemma3-270m), Hugging Face repo id, folder or .gguf file",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt text")
    src.add_argument("--prompts", metavar="FILE.jsonl", help='JSON Lines: {"id", "text", "group"?, "source"?}')
    p.add_argument(
        "--probe",
        action="append",
        metavar="NAME",
        help="logit_lens (default), skip, ablate_attn, ablate_mlp, noise, steer, patch; repeat for several",
    )
    p.add_argument("--scale", type=_finite_float, help="noise: std = scale * rms(h) (default 1)")
    p.add_argument("--alpha", type=_finite_float, help="steer: the vector's multiplier (default 1)")
    p.add_argument("--vector", metavar="FILE", help="steer: .pt/.npy/.safetensors, [hidden] or [layers, hidden]")
    p.add_argument("--positive", metavar="FILE.jsonl", help="steer: prompts whose mean activation is added")
    p.add_argument("--negative", metavar="FILE.jsonl", help="steer: prompts whose mean activation is subtracted")
    p.add_argument("--save-vector", metavar="FILE", help="steer: save the vector computed from --positive/--negative")
    p.add_argument("--source", metavar="TEXT", help="patch: the source prompt for --prompt")
    p.add_argument("--layers", default="all", help="layer spec: all, 0,15-21,27, -4--1 (default: all)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=5, help="tokens to generate (default 5)")
    p.add_argument(
        "--divergence", action="append", metavar="NAME", help="kl (default), kl_reverse, js; repeat for several"
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and the noise probe's seed (default 0)")
    p.add_argument("--temperature", type=_finite_float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.add_argument(
        "--tokens",
        action="store_true",
        help="print what each layer predicts (the top-1 token of Q per layer and generated token) "
        "instead of divergences; with --json, the top-k tokens and probabilities",
    )
    _add_options(p)
    p.add_argument(
        "--png",
        metavar="PATH",
        help="write heatmaps; with several prompts or probes, -<prompt id>-<probe> is added to the name",
    )
    p.add_argument(
        "--store",
        metavar="PATH",
        help="write results into this store (folder or s3://bucket/prefix) instead of printing them",
    )
    p.add_argument("--run", default="compute", metavar="NAME", help="run name in the store (default: compute)")
    p.add_argument("--label", help="model label in the store (default: derived from --model)")
    p.add_argument("--shard-size", type=int, default=16, help="prompts per written file (default 16)")
    p.set_defaults(func=cmd_compute)


def _add_options(parser) -> None:
    """One flag per option of the compute value (spec.ComputeSpec: --topk, --clean-pass, ...):
    its Option gives the flag, its help and how the text is parsed; the value is checked with
    the other inputs (`_compute_inputs`), by the same check as the Python API's."""
    from klstore.spec import ComputeSpec

    for name, (info, option) in ComputeSpec.options().items():
        if option.flag is None:
            continue
        if option.repeat:  # given several times: the list (absent: None, and the field's default applies)
            parser.add_argument(
                option.flag, dest=name, type=option.parse, metavar=option.metavar, action="append", help=option.help
            )
        else:
            parser.add_argument(
                option.flag,
                dest=name,
                type=option.parse,
                metavar=option.metavar,
                default=info.get_default(call_default_factory=True),
                help=option.help,
            )


def _compute_inputs(args):
    """Validate everything that needs no model, so bad input fails before a slow load.
    Returns (ComputeSpec, prompts)."""
    if args.tokens and args.store:
        raise KlstoreError(
            "--tokens prints a table; with --store the lens tokens go to the store (query the lens_tokens view)"
        )
    from klstore.spec import ComputeSpec

    options = ComputeSpec.check_options(
        {
            name: getattr(args, name)
            for name, (_, option) in ComputeSpec.options().items()
            if option.flag is not None and getattr(args, name) is not None
        }
    )
    if args.tokens and not options["topk"]:
        raise KlstoreError("--tokens needs lens tokens: drop --topk 0")
    from klstore.config import check_outputs, read_prompts
    from klstore.spec import (
        GenerationSpec,
        ProbeSpec,
        Prompt,
        check_device,
        check_divergences,
        check_dtype,
        check_patch_sources,
        parse_layers,
    )

    check_dtype(args.dtype)
    check_device(args.device)
    spec = GenerationSpec(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        seed=args.seed,
        temperature=args.temperature,
        chat=args.chat,
    )
    divergences = check_divergences(args.divergence or ["kl"])
    probes = [ProbeSpec(name, _probe_params(name, args)) for name in dict.fromkeys(args.probe or ["logit_lens"])]
    check_outputs(probes)
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        if not args.prompt.strip():
            raise KlstoreError("prompt is empty")
        prompts = [Prompt("prompt", args.prompt, source=args.source)]
    check_patch_sources(probes, prompts)
    parse_layers(args.layers)  # syntax only; the range is checked against the model
    return ComputeSpec(probes, args.layers, divergences, spec, **options), prompts


def _probe_params(name: str, args) -> dict:
    """Probe parameters from the command line (only those the probe takes)."""
    if name == "noise":
        return {"scale": 1.0 if args.scale is None else args.scale, "seed": args.seed}
    if name == "steer":
        given = {
            "alpha": args.alpha,
            "vector": args.vector,
            "positive": args.positive,
            "negative": args.negative,
            "save": args.save_vector,
        }
        return {k: v for k, v in given.items() if v is not None}
    return {}


def cmd_compute(args) -> int:
    """`klstore.load(...)`, then `Lens.compute_value` and printing (`--json`, `--tokens`, tables,
    `Result.savefig` for `--png`), or `Lens.compute_into` with `--store`."""
    compute, prompts = _compute_inputs(args)
    png = _png_target(args.png)
    from klstore import api
    from klstore.core.models import resolve
    from klstore.run import lenses
    from klstore.run.preflight import check_model

    compute = lenses.resolve(compute, lenses.store_for_ids(args.store))
    # layers, generation length against the context, steering vectors: as `klstore run` before Ray
    check_model(args.model, resolve(args.model).label, compute, args.trust_remote_code)
    label = None
    if args.store:  # what fails without the model fails before its load
        from klstore.config import default_label
        from klstore.spec import check_label
        from klstore.store import open_store

        if args.shard_size <= 0:
            raise KlstoreError(f"--shard-size must be positive, got {args.shard_size}")
        label = check_label(args.label or default_label(args.model), "model label")
        check_label(args.run, "run name")
        open_store(args.store, create=True)  # an unwritable store: before the model loads
    lens = api.load(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, label=label
    )
    if args.store:
        return _compute_into_store(args, lens, compute, prompts)
    res = lens.compute_value(prompts, compute, progress=False)
    decode = lens.engine.tokenizer.decode
    if args.json:
        print(
            json.dumps(
                output.results_to_json(lens.loaded.label, res.results, decode if args.tokens else None), indent=1
            )
        )
    else:
        for matrices in res.results:
            for matrix in matrices:
                print(output.format_tokens(matrix, decode) if args.tokens else output.format_table(matrix))
    if png:
        _write_pngs(png, res)
    for err in res.errors:
        print(f"klstore: warning: {err}", file=sys.stderr)
    return 1 if res.errors else 0


def _compute_into_store(args, lens, compute, prompts) -> int:
    """compute --store: a one-model run executed in this process (`Lens.compute_into`), through
    the same run plan (run id, shards, resume, run row) as `klstore run` of the equivalent config."""
    summary = lens.compute_into(
        args.store,
        prompts,
        compute,
        run=args.run,
        shard_size=args.shard_size,
        prompt_path=args.prompts,
        source="klstore compute",
    )
    failed = summary["failed"]
    print(f"run {summary['run_id']} completed: {summary['prompts']} prompts ({failed} failed) into {args.store}")
    if failed:
        print(
            f"klstore: {failed} of {summary['prompts']} prompts failed; their errors are in the "
            "prompts table (status, error)",
            file=sys.stderr,
        )
    return 1 if failed == summary["prompts"] else 0


def _png_target(path: str | None):
    """Check --png before any work: a writable folder, or a file name with a figure suffix.
    Returns (folder, stem or None for a folder, suffix)."""
    if path is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    target = Path(path)
    if target.is_dir() or path.endswith(("/", os.sep)):
        folder, stem, suffix = target, None, ".png"
    else:
        folder, stem, suffix = target.parent, target.stem, target.suffix.lower() or ".png"
        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix.lstrip(".") not in formats:
            raise KlstoreError(
                f"--png {path}: unknown figure format {suffix!r} "
                f"(use one of {', '.join('.' + f for f in sorted(formats))})"
            )
    from klstore.config import write_problem

    problem = write_problem(folder)
    if problem is not None:
        raise KlstoreError(f"--png: folder {folder} {problem}")
    return folder, stem, suffix


def _png_name(target, prompt_id: str, probe: str, many: bool) -> Path:
    """One figure's path. Several figures get -<prompt id>-<hash of the id>-<probe>, so ids
    that differ only in characters a file name cannot hold (a/b, a_b) never collide."""
    folder, stem, suffix = target
    if stem is not None and not many:
        return folder / f"{stem}{suffix}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prompt_id)[:60]
    digest = hashlib.sha256(prompt_id.encode()).hexdigest()[:8]
    name = f"{safe}-{digest}-{probe}{suffix}"
    return folder / (f"{stem}-{name}" if stem is not None else name)


def _write_pngs(target, res) -> None:
    many = len(res.results) > 1 or len(res.results[0]) > 1
    for index, matrices in enumerate(res.results):
        for m in matrices:
            out = _png_name(target, m.prompt.id, m.probe, many)
            res.savefig(out, index, m.probe, lens=m.lens_id)
            print(f"wrote {out}", file=sys.stderr)


# ------------------------------------------------------------- store commands
def _add_store_commands(sub) -> None:
    def store_arg(p):
        p.add_argument(
            "--store", default=None, metavar="PATH", help="store folder or s3://bucket/prefix (default ./klstore-data)"
        )

    p = sub.add_parser("sql", help="run SQL over the store's views kl, generations, prompts, runs")
    p.add_argument("query", nargs="?", help="a SELECT over kl, generations, prompts, runs")
    store_arg(p)
    p.add_argument("--format", default="table", help="table (default), csv or json")
    p.add_argument(
        "--print-views", action="store_true", help="print the CREATE VIEW statements for the plain duckdb shell"
    )
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("runs", help="list runs with status, prompts and size")
    store_arg(p)
    p.add_argument("--format", default="table", help="table (default), csv or json")
    p.add_argument(
        "--shards",
        metavar="RUN",
        help="for one run (its id, or a name: its newest run): throughput per node and per actor, "
        "and the failed and lost shard attempts",
    )
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "verify",
        help="check every file against its record (SHA-256) and page checksums; "
        "temporary files, duplicates, strange folders",
    )
    store_arg(p)
    p.add_argument(
        "--quarantine",
        action="store_true",
        help="move bad and temporary files to <store>/_quarantine/ (never deleted); "
        "the next run or resume recomputes what they held",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="record files that have none (stores written before records), after checking them",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compact", help="merge each partition's small files into one")
    store_arg(p)
    p.set_defaults(func=cmd_compact)


def _open_for_reading(path):
    from klstore.spec import DEFAULT_STORE
    from klstore.store import open_store

    return open_store(path or DEFAULT_STORE)


def _check_format(fmt: str) -> None:
    if fmt not in output.FORMATS:
        raise KlstoreError(f"unknown --format {fmt!r}: choose table, csv or json")


def cmd_sql(args) -> int:
    from klstore.store import views

    _check_format(args.format)
    store = _open_for_reading(args.store)
    if args.print_views:
        print("\n".join(views.view_statements(store).values()))
        return 0
    if not args.query:
        raise KlstoreError("no query given (or use --print-views)")
    names, rows = views.sql(store, args.query)
    if names:
        print(output.format_rows(names, rows, args.format))
    return 0


def cmd_runs(args) -> int:
    from klstore.store import upkeep

    _check_format(args.format)
    if args.shards:
        sections = upkeep.shard_summaries(_open_for_reading(args.store), args.shards)
        for title, (names, rows) in sections.items():
            if args.format == "table":
                print(f"{title}:")
            print(output.format_rows(names, rows, args.format) if rows else "(none)")
        return 0
    runs = upkeep.run_summaries(_open_for_reading(args.store))
    names = ["run_id", "name", "status", "created_at", "prompts", "failed", "kl_rows", "bytes"]
    print(output.format_rows(names, [[r[n] for n in names] for r in runs], args.format))
    return 0


def cmd_verify(args) -> int:
    from klstore.store import upkeep

    store = _open_for_reading(args.store)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    result = upkeep.verify(store, quarantine=args.quarantine, record=args.record, log=say)
    problems = result["problems"]
    for kind, items in problems.items():
        for item in items:
            print(f"{kind}: {item}")
    for path in result["quarantined"]:
        print(f"quarantined: {path}")
    if result["recorded"]:
        print(f"recorded: {result['recorded']} files")
    counts = {kind: len(items) for kind, items in problems.items()}
    counts["duplicates"] = result["duplicate_rows"]
    if args.record:
        counts["unrecorded"] = 0
    print(
        f"{result['files']} files checked ({result['bytes'] / 2**20:.1f} MiB): "
        + ", ".join(f"{n} {upkeep.PROBLEMS[kind]}" for kind, n in counts.items())
    )
    fixed = set(upkeep.QUARANTINED) if args.quarantine else set()
    remaining = sum(n for kind, n in counts.items() if kind not in fixed)
    return 1 if remaining else 0


def cmd_compact(args) -> int:
    from klstore.store import upkeep

    merged = upkeep.compact(_open_for_reading(args.store), log=lambda m: print(m, file=sys.stderr))
    for folder, count in merged:
        print(f"merged {count} files in {folder}")
    print(f"compacted {len(merged)} partitions")
    return 0


# --------------------------------------------------------------- datasets
def _add_dataset_commands(sub) -> None:
    p = sub.add_parser(
        "export", help="write one run as a dataset folder (Parquet, card, checksums) that `datasets` loads"
    )
    p.add_argument("run", help="the run's id, or its name (its newest run)")
    p.add_argument("--to", required=True, metavar="DIR", help="a new or empty folder (or an export of the same run)")
    p.add_argument("--store", metavar="PATH", help="store folder or s3:// prefix (default ./klstore-data)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="bring an exported run into a store, under the same run id")
    p.add_argument("folder", metavar="DIR", help="a folder written by `klstore export`")
    p.add_argument("--store", metavar="PATH", help="store folder or s3:// prefix (default ./klstore-data)")
    p.set_defaults(func=cmd_import)


def cmd_export(args) -> int:
    from klstore import api

    result = api.export_run(args.run, args.to, store=args.store, log=lambda m: print(m, file=sys.stderr))
    counts = ", ".join(f"{table} {rows}" for table, rows in result["rows"].items())
    print(f"exported run {result['run_id']} to {result['folder']}: {result['files']} files; rows: {counts}")
    return 0


def cmd_import(args) -> int:
    from klstore import api

    result = api.import_run(args.folder, store=args.store, log=lambda m: print(m, file=sys.stderr))
    counts = ", ".join(f"{table} {rows}" for table, rows in result["rows"].items())
    print(f"imported run {result['run_id']} into {result['store']}: {result['files']} files; rows: {counts}")
    return 0


# -------------------------------------------------------------------- run
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run an experiment config on Ray (RAY_ADDRESS, or a local Ray)")
    p.add_argument("config", help="experiment config (YAML)")
    p.add_argument("--store", help="override the config's store")
    p.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines (default 10)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the work (prompts, shards, cells, kl rows, actors, store size) and what the store "
        "already holds of this run; compute and write nothing",
    )
    p.add_argument(
        "--shared-store",
        action="store_true",
        help="the local-folder store is mounted by every node of the cluster (NFS and the like); "
        "same as `shared_store: true` in the config",
    )
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from klstore.config import load_config

    cfg = load_config(args.config)  # every config error before Ray starts
    if args.shared_store:
        cfg = cfg.model_copy(update={"shared_store": True})
    from klstore.core.models import quiet_libraries

    quiet_libraries()
    from klstore.run.preflight import check_experiment

    # unknown models, layers beyond a model's depth, a generation longer than its context,
    # steering vectors of another shape: before Ray starts, as `klstore compute` checks them
    check_experiment(cfg)
    store_uri = args.store or cfg.store
    if args.dry_run:
        return _dry_run(cfg, store_uri)
    from klstore.store import open_store

    open_store(store_uri, create=True)
    from klstore.run import runner

    summary = runner.run(cfg, store_uri, progress_every=args.progress_every)
    print(f"run {summary['run_id']} {summary['status']} -> {store_uri}")
    print(cmd_runs_summary(store_uri, summary["run_id"]))
    failed, total = summary["failed_prompts"], summary["prompts"]
    if summary["status"] != "completed":
        print(
            f"klstore: run {summary['run_id']} failed: "
            + "; ".join(f"{k}: {v}" for k, v in summary["failed_models"].items()),
            file=sys.stderr,
        )
        return 1
    if failed:
        print(
            f"klstore: {failed} of {total} prompt x model results failed; see "
            "`klstore sql \"SELECT model, prompt_id, error FROM prompts WHERE status <> 'ok'\"`",
            file=sys.stderr,
        )
    return 1 if total and failed == total else 0


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def _dry_run(cfg, store_uri: str) -> int:
    """`klstore run --dry-run`: the run's numbers (run.plan.RunPlan.estimate), nothing computed or written."""
    from klstore.run import runner
    from klstore.run.plan import RunPlan, check_cluster

    plan = RunPlan(cfg, store_uri, write=False)
    nodes, where = runner.planning_nodes()
    check_cluster(cfg, store_uri, nodes)
    est = plan.estimate(nodes, where)
    print(f"dry run of {est.run_id} into {store_uri}: nothing is computed or written")
    print(f"cluster: {est.nodes} node(s), {est.cpus:g} CPUs, {est.gpus:g} GPUs: {est.cluster}")
    names = [
        "model",
        "prompts",
        "shards",
        "shards_in_store",
        "layers",
        "cells",
        "kl_rows",
        "kl_rows_in_store",
        "actors",
        "actors_started",
    ]
    unknown = "unknown"
    rows = [
        [
            m.label,
            m.prompts,
            m.shards,
            m.shards_done,
            unknown if m.layers is None else m.layers,
            unknown if m.cells is None else m.cells,
            unknown if m.kl_rows is None else m.kl_rows,
            m.kl_rows_in_store,
            m.actors,
            m.actors_started,
        ]
        for m in est.models
    ]
    print(output.format_rows(names, rows, "table"))
    print(
        f"cells = prompts x layers x max_new_tokens ({cfg.generation.max_new_tokens}) x probes "
        f"({len(cfg.probes)}), one kl row each: an upper bound, since generation may stop early at an "
        "end-of-sequence token"
    )
    source = (
        f"measured on this store's {est.bytes_measured_on} kl rows"
        if est.bytes_measured_on
        else f"the README's measurement for topk {cfg.compute.topk}; the store has no kl rows yet"
    )
    if est.kl_bytes is None:
        print(
            f"expected kl size: unknown (a model's depth is unknown before it loads); "
            f"{est.bytes_per_kl_row:.1f} bytes per kl row ({source})"
        )
    else:
        print(
            f"expected kl size: {_size(est.kl_bytes)} for {est.kl_rows} kl rows at "
            f"{est.bytes_per_kl_row:.1f} bytes per row ({source})"
        )
    return 0


def cmd_runs_summary(store_uri: str, run_id: str) -> str:
    """The printed summary of a run: per model and probe, prompts, cells, mean KL, top-1 rate."""
    from klstore.store import upkeep

    names, rows = upkeep.run_totals(store_uri, run_id)
    return output.format_rows(names, rows, "table")


# ------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = sub.add_parser("report", help="build the HTML/Markdown report of a store (incremental)")
    p.add_argument(
        "spec",
        nargs="?",
        help="report spec (YAML, e.g. reports/default.yaml); default: by model and probe, and by prompt group",
    )
    p.add_argument("--store", help="store folder or s3:// prefix (default: the spec's, else ./klstore-data)")
    p.add_argument("--out", help="output path (default <store>/reports/<spec name>)")
    p.add_argument("--force", action="store_true", help="redraw every figure")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from klstore.config import load_report_spec
    from klstore.spec import DEFAULT_STORE
    from klstore.store import open_store

    spec = load_report_spec(args.spec)
    store = open_store(args.store or spec.store or DEFAULT_STORE)
    from klstore.report import site

    result = site.build(
        store, spec, out=args.out, force=args.force, log=lambda message: print(message, file=sys.stderr)
    )
    print(result["index"])
    return 0


# -------------------------------------------------------------------- lens
def _add_lens(sub) -> None:
    p = sub.add_parser("lens", help="fit trained lenses and list them (docs/lenses.md)")
    lens_sub = p.add_subparsers(dest="lens_command", required=True)
    fit = lens_sub.add_parser("fit", help="fit a lens (tuned, least_squares) over Ray Train workers")
    fit.add_argument("config", help="lens-fit config (YAML; see jobs/lens-demo.yaml)")
    fit.add_argument("--store", help="override the config's store")
    fit.add_argument(
        "--dry-run", action="store_true", help="print the fit's id, steps and tokens; compute and write nothing"
    )
    fit.set_defaults(func=cmd_lens_fit)
    listing = lens_sub.add_parser("list", help="the lenses in the store, with their held-out KL")
    listing.add_argument("--store", help="store folder or s3://bucket/prefix (default ./klstore-data)")
    listing.add_argument("--format", default="table", help="table (default), csv or json")
    listing.set_defaults(func=cmd_lens_list)
    evaluation = lens_sub.add_parser("eval", help="the held-out KL per layer of a model's lenses (lens_eval)")
    evaluation.add_argument("--store", help="store folder or s3://bucket/prefix (default ./klstore-data)")
    evaluation.add_argument("--model", help="only this model label")
    evaluation.add_argument("--format", default="table", help="table (default), csv or json")
    evaluation.set_defaults(func=cmd_lens_eval)


def cmd_lens_fit(args) -> int:
    from klstore.config import load_fit

    spec = load_fit(args.config)  # every config error before Ray starts
    from klstore.run import fit

    fit.check(spec)
    if args.dry_run:
        store = args.store or spec.store
        line = f"dry run of lens fit {fit.fit_id_for(spec)} into {store}: {spec.kind} lens of {spec.model.name}"
        if spec.kind == "tuned":
            steps, per_step = fit.steps_of(spec)
            line += f", {steps} step(s) of {per_step} sequence(s) x {spec.corpus.seq_len} tokens"
        print(line + f", {spec.workers} worker(s); nothing is computed or written")
        return 0
    from klstore.core.models import quiet_libraries

    quiet_libraries()
    result = fit.fit(spec, args.store)
    names = ["lens", "lens_id", "layer", "kl", "top1_agreement", "tokens"]
    print(output.format_rows(names, [[row[n] for n in names] for row in result["eval"]], "table"))
    for lens in result["lenses"]:
        if lens["kind"] != "logit":
            print(f"{lens['kind']} lens {lens['id']}: klstore compute --lens {lens['id']} ...")
    return 0


def cmd_lens_list(args) -> int:
    from klstore.store import upkeep

    _check_format(args.format)
    names, rows = upkeep.lens_summaries(_open_for_reading(args.store))
    print(output.format_rows(names, rows, args.format) if rows else "(no lenses)")
    return 0


def cmd_lens_eval(args) -> int:
    from klstore.store import upkeep

    _check_format(args.format)
    names, rows = upkeep.lens_eval_table(_open_for_reading(args.store), args.model)
    print(output.format_rows(names, rows, args.format) if rows else "(no lens_eval rows)")
    return 0


# -------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from klstore import __version__

    parser = _Parser(
        prog="klstore", description="Layer x generated-token KL-divergence maps of causal language models."
    )
    parser.add_argument("--version", action="version", version=f"klstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compute(sub)
    _add_store_commands(sub)
    _add_dataset_commands(sub)
    _add_run(sub)
    _add_report(sub)
    _add_lens(sub)
    return parser


# Options whose value may start with '-' (a layer spec such as -4--1, a number such as
# -inf): argparse would take the value for an option, so `--layers -4--1` is joined to
# `--layers=-4--1` (and `--alpha -inf` to `--alpha=-inf`, then refused as not finite).
_DASHED_VALUES = ("--layers", "--alpha", "--scale", "--temperature", "--seed")
_NEGATIVE_SPEC = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_dashed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in _DASHED_VALUES:
            value = next(args, None)
            if value is not None and _NEGATIVE_SPEC.match(value):
                out.append(f"{arg}={value}")
            else:
                out.extend(a for a in (arg, value) if a is not None)
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_dashed_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except KlstoreError as exc:
        print(f"klstore: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("klstore: interrupted", file=sys.stderr)
        return 130
