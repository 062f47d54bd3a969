"""Lens-fit benchmark (issue 23): klstore's fitted lenses on SmolLM2, their quality, their speed
against tuned-lens 0.2.0's own trainer, and Ray Train's scaling.

    make bench-tunedlens-env                          # tuned-lens 0.2.0 in build/venv-tunedlens (the anchor)
    nice -n 19 python benchmarks/lens_fit.py          # ~32k training tokens; about an hour on 2 busy CPUs
    python benchmarks/lens_fit.py --tokens 8192 --skip-anchor
    python benchmarks/lens_fit.py --quick             # the tests' run: a tiny random Llama, a few hundred tokens

The task: SmolLM2-135M-Instruct (`smollm2-135m`, float32, CPU), the self-distilled corpus
jobs/corpus/smollm2-self.jsonl packed by klstore into sequences of 128 tokens, the last 32
held out. Every lens is evaluated the same way: per layer, the mean forward KL(final || lens)
and the top-1 agreement with the final prediction over the held-out tokens
(klstore.core.fitting.evaluate, the `lens_eval` table's numbers).

1. Quality: `klstore.run.fit.fit` fits the least-squares lens on the first --tokens training
   tokens (train_sequences = tokens / 128), then the tuned lens from it on --tokens tokens
   (tuned-lens's recipe, --tokens-per-step per SGD step). Prints the per-layer held-out table of
   the logit, least-squares and tuned lenses (the fit's own "eval" rows) and the targets: the
   tuned lens's KL is nowhere above the logit lens's by more than 0.01 nats, and its mean over
   the first half of the layers (0-14 on SmolLM2) is at most half the logit lens's.
2. Speed against the anchor: tuned-lens 0.2.0's own trainer (`python -m tuned_lens train`, its
   data loader, optimizer, schedule, bf16 autocast and gradient accumulation unchanged) in its
   own environment on the SAME packed training sequences and token budget: its `Data.load` is
   replaced by one that returns klstore's packed token ids (exported to a .pt), because its CLI
   would pack a .jsonl with its own chunking and train on the held-out text too. Its lens folder
   is then evaluated in klstore. klstore's time to reach tuned-lens's final held-out KL (mean over
   layers) counts Ray's start and the fit from its call to the first lens that reaches it: the
   least-squares lens (when it reaches, smaller least-squares budgets are tried while the ratio
   misses), else the tuned lens at the end of training (an upper bound). Both times exclude the
   held-out evaluation, which tuned-lens's trainer does not do (klstore's fit does; its full
   wall time is printed too). Target: klstore at most a third of tuned-lens's time.
3. Scale: tokens/s of the tuned training (rank 0's progress lines: training steps only, no
   model load, no evaluation) with 1 and 2 Ray Train workers on a small budget.

Runs are sequential and not repeated (a fit takes minutes): load from other processes on the
machine hits whichever runs at the time; the load average is printed at the start and the end.
Prints numbers and PASS/FAIL lines; asserts nothing.

The script is also the anchor's driver: `python benchmarks/lens_fit.py anchor-train ...` runs
under tuned-lens's python and never imports klstore.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TUNEDLENS_PY = REPO / "build" / "venv-tunedlens" / "bin" / "python"
CORPUS = REPO / "jobs" / "corpus" / "smollm2-self.jsonl"
KL_SLACK = 0.01  # nats: the tuned lens may exceed the logit lens by this much at a layer
HALF = 0.5  # the tuned lens's mean over the first half of the layers vs the logit lens's
SPEED_RATIO = 1 / 3  # klstore's time to tuned-lens's held-out KL vs tuned-lens's time
STEP_LINE = re.compile(r"step (\d+)/(\d+): loss ([0-9.eE+-]+|nan), ([0-9]+) tokens/s")


# ====================================================================== the anchor (tuned-lens's python)
def anchor_train(argv: list[str]) -> None:
    """tuned-lens 0.2.0's `train` command on klstore's packed sequences (never imports klstore).

    Only `Data.load` is replaced: it returns the sequences in --ids (a .pt of int64 (n, seq_len))
    as the tokenized dataset the trainer would otherwise build from a .jsonl. Everything else is
    tuned-lens's own: the argument parsing, the model and lens loading, the shuffled data loader,
    SGD with Nesterov momentum, the linear schedule, gradient clipping, bf16 autocast, saving."""
    parser = argparse.ArgumentParser(prog="lens_fit.py anchor-train")
    parser.add_argument("--ids", required=True)
    parser.add_argument("--timing", required=True, help="where to write the trainer's times (JSON)")
    args, train_argv = parser.parse_known_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    import tuned_lens.scripts.ingredients as ing
    from datasets import Dataset
    from tuned_lens.__main__ import main
    from tuned_lens.scripts import train_loop

    ids = torch.load(args.ids, weights_only=True)
    marks: dict[str, float] = {"imported": time.perf_counter() - started}

    def load(self, tokenizer):
        print(f"Dataset: klstore's {ids.shape[0]} packed sequences of {ids.shape[1]} tokens ({args.ids})")
        data = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch", columns=["input_ids"])
        return data, 1.0  # nats per token -> bits per byte: only for Weights & Biases logs (off)

    ing.Data.load = load
    setup = train_loop.Train.setup

    def timed_setup(self):
        out = setup(self)
        marks["setup_done"] = time.perf_counter() - started
        return out

    train_loop.Train.setup = timed_setup
    marks["main_start"] = time.perf_counter() - started
    main(["train", *train_argv])
    marks["done"] = time.perf_counter() - started
    Path(args.timing).write_text(json.dumps(marks))


# ====================================================================== klstore's side
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fit_spec(args, name: str, kind: str, *, tokens: int | None = None, **changes):
    """A FitSpec for this benchmark's corpus and model (klstore.spec.parse_fit)."""
    from klstore.spec import parse_fit

    corpus = {
        "path": str(CORPUS),
        "seq_len": args.seq_len,
        "held_out": args.held_out,
        "train_sequences": max(1, args.tokens // args.seq_len),
    }
    corpus.update(changes.pop("corpus", {}))
    config = {
        "name": name,
        "store": args.store,
        "model": args.model,
        "kind": kind,
        "corpus": corpus,
        "workers": 1,
        "batch_size": args.batch_size,
        "checkpoint_every": 1000,
    }
    if kind == "tuned":
        config["train"] = {"tokens": tokens or args.tokens, "tokens_per_step": args.tokens_per_step}
    config.update(changes)
    return parse_fit(config, f"benchmark fit {name}")


class TimedFit:
    """One `klstore.run.fit.fit` call, with the arrival time of each progress line."""

    def __init__(self, spec, store: str):
        from klstore.run.fit import fit

        self.events: list[tuple[float, str]] = []
        self.cached = False
        started = time.perf_counter()

        def say(message: str) -> None:
            elapsed = time.perf_counter() - started
            self.events.append((elapsed, message))
            self.cached |= "already in the store" in message
            log(f"+{elapsed:6.0f} s {message}")

        self.result = fit(spec, store_uri=store, say=say)
        self.wall_s = time.perf_counter() - started

    def at(self, needle: str, last: bool = False) -> float | None:
        """Seconds from the call to the (first or last) progress line holding `needle`."""
        hits = [t for t, message in self.events if needle in message]
        return (hits[-1] if last else hits[0]) if hits and not self.cached else None

    def rate(self) -> float | None:
        """Training tokens/s from rank 0's last step line."""
        rates = [int(m.group(4)) for _, message in self.events if (m := STEP_LINE.search(message))]
        return float(rates[-1]) if rates and not self.cached else None

    def table(self) -> dict[str, list[tuple[float, float]]]:
        """{lens kind: [(kl, top1) per layer]} from the fit's "eval" rows."""
        out: dict[str, list] = {}
        for row in sorted(self.result["eval"], key=lambda r: (r["lens"], r["layer"])):
            out.setdefault(row["lens"], []).append((row["kl"], row["top1_agreement"]))
        return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def print_table(columns: dict[str, list[tuple[float, float]]]) -> None:
    names = list(columns)
    print(f"{'layer':>5} " + " ".join(f"{name + ' KL':>18} {'top1':>6}" for name in names))
    n_layers = len(next(iter(columns.values())))
    for layer in range(n_layers):
        cells = " ".join(f"{columns[n][layer][0]:>18.4f} {columns[n][layer][1]:>6.3f}" for n in names)
        print(f"{layer:>5} {cells}")
    cells = " ".join(f"{mean(kl for kl, _ in columns[n]):>18.4f} {mean(t for _, t in columns[n]):>6.3f}" for n in names)
    print(f"{'mean':>5} {cells}")


def target(text: str, ok: bool | None, numbers: str) -> bool | None:
    verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    print(f"target: {text}: {verdict} ({numbers})")
    return ok


# ---------------------------------------------------------------------- models for the anchor
def tiny_model(folder: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (tests/conftest.py's `tiny_model_dir`)."""
    import torch
    import transformers

    from klstore.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_folder(model: str) -> Path:
    """The plain Hugging Face folder klstore loads `model` from (a built-in's dequantized cache)."""
    from klstore.core.models import _gguf_cache_folder, resolve

    source = resolve(model)
    folder = _gguf_cache_folder(source) if source.gguf_file else Path(source.location)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no Hugging Face folder for {model} at {folder} (load it in klstore once)")
    return folder


def folder_for_transformers4(source: Path, folder: Path) -> Path:
    """A copy of a transformers-5 model folder that transformers 4.57 reads right (as in
    tests/integration/test_tunedlens_reference.py): weights linked, config.json with `rope_theta`
    beside 5.x's `rope_parameters` (4.57 would silently use 10000), tokenizer_config.json with
    PreTrainedTokenizerFast for 5.x's TokenizersBackend. The source is never written."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.name == "config.json":
            config = json.loads(path.read_text())
            rope = config.get("rope_parameters") or {}
            if rope.get("rope_type", "default") != "default":
                raise SystemExit(f"{source}: rope {rope} needs more than rope_theta for transformers 4.57")
            if "rope_theta" in rope:
                config.setdefault("rope_theta", rope["rope_theta"])
            (folder / path.name).write_text(json.dumps(config))
        elif path.name == "tokenizer_config.json":
            config = json.loads(path.read_text())
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            (folder / path.name).write_text(json.dumps(config))
        else:
            (folder / path.name).symlink_to(path.resolve())
    return folder


def run_anchor(args, spec, work: Path) -> dict:
    """tuned-lens's trainer on the fit's training sequences; returns its times and lens folder."""
    from klstore.run.fit import read_corpus, steps_of

    data = read_corpus(spec)
    ids_path = work / "train_ids.pt"
    import torch

    torch.save(data.train.clone(), ids_path)
    steps, per_step = steps_of(spec)
    model_dir = folder_for_transformers4(hf_folder(args.model), work / "model-tf4")
    out_dir, timing = work / "tunedlens-lens", work / "tunedlens-timing.json"
    command = [
        str(TUNEDLENS_PY),
        "-W",
        "ignore",
        str(Path(__file__).resolve()),
        "anchor-train",
        "--ids",
        str(ids_path),
        "--timing",
        str(timing),
        "--model.name",
        str(model_dir),
        "--precision",
        "float32",
        "--max_length",
        str(spec.corpus.seq_len),
        "--num_steps",
        str(steps),
        "--tokens_per_step",
        str(per_step * spec.corpus.seq_len),
        "--per_gpu_batch_size",
        str(spec.batch_size),
        "--seed",
        str(spec.train.seed),
        "-o",
        str(out_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    log(f"tuned-lens: {steps} steps of {per_step} sequences on {data.train.shape[0]} sequences ({' '.join(command)})")
    started = time.perf_counter()
    out = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (work / "tunedlens.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0 or not (out_dir / "params.pt").is_file():
        tail = (out.stdout + out.stderr)[-3000:]
        raise RuntimeError(f"tuned-lens's trainer failed (exit {out.returncode}):\n{tail}")
    marks = json.loads(timing.read_text())
    log(f"tuned-lens done in {wall:.0f} s")
    return {
        "wall_s": wall,
        "setup_s": marks["setup_done"] - marks["main_start"],
        "train_s": marks["done"] - marks["setup_done"],
        "lens": out_dir,
        "steps": steps,
        "sequences": steps * per_step,
    }


def evaluate_folder(spec, folder: Path) -> tuple[list[tuple[float, float]], float, bool]:
    """A lens folder evaluated in klstore on the held-out split, as a fit evaluates its lenses:
    ([(kl, top1) per layer], seconds, whether its unembedding hash is the model's)."""
    from klstore.core import fitting, lenses
    from klstore.core.adapter import Adapter
    from klstore.core.models import load_model
    from klstore.run.fit import read_corpus

    loaded = load_model(spec.model.name, device="cpu", dtype=spec.model.dtype)
    model = loaded.model
    model.requires_grad_(False)
    adapter = Adapter.discover(model)
    lens = lenses.load(folder)
    lenses.check_fits(lens, adapter.n_layers, model.get_output_embeddings().weight.shape[1], None, str(folder))
    same_hash = lens.unembed_hash == lenses.unembed_hash(model)
    held = read_corpus(spec, loaded.tokenizer).held_out
    batches = [held[i : i + spec.batch_size] for i in range(0, held.shape[0], spec.batch_size)]
    started = time.perf_counter()
    sums = fitting.evaluate(model, adapter, lens, batches)
    return [(s.kl, s.top1) for s in sums], time.perf_counter() - started, same_hash


# ====================================================================== main
def main() -> None:
    if sys.argv[1:2] == ["anchor-train"]:
        anchor_train(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens (least squares and tuned)")
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="tokens per SGD step (both trainers)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (both trainers)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=32, help="held-out sequences")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None, help="keep the fits here (default: a temp dir, removed)")
    parser.add_argument("--skip-anchor", action="store_true", help="no tuned-lens run (no speed target)")
    parser.add_argument("--skip-scale", action="store_true", help="no 1 vs 2 worker runs")
    parser.add_argument("--scale-tokens", type=int, default=1536, help="training tokens of each scale run")
    parser.add_argument("--scale-tokens-per-step", type=int, default=512)
    parser.add_argument("--ladder", type=int, default=2, help="smaller least-squares budgets tried at most")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, a few hundred tokens (the tests)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="klstore-lens-bench-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    if args.quick:
        args.model = str(tiny_model(work / "tiny-llama"))
        args.seq_len, args.held_out, args.batch_size = 32, 4, 2
        args.tokens, args.tokens_per_step = 256, 64
        args.scale_tokens, args.scale_tokens_per_step = 128, 64
        args.ladder = 0
    store = args.store or str(work / "store")
    args.store = store
    anchor_ok = TUNEDLENS_PY.is_file() and (TUNEDLENS_PY.parent.parent / ".installed").is_file()
    print(
        f"lens fit benchmark: model {args.model if not args.quick else 'tiny random Llama (--quick)'}, corpus "
        f"{CORPUS.relative_to(REPO)} (seq_len {args.seq_len}, {args.held_out} held-out sequences), "
        f"{args.tokens} training tokens, {args.tokens_per_step} per step, batch {args.batch_size}"
    )
    print(f"CPUs: {os.cpu_count()}, load average at the start: {os.getloadavg()[0]:.1f}")

    from klstore.run.runner import init_ray

    started = time.perf_counter()
    ray, started_here = init_ray(log_to_driver=False)
    ray_s = time.perf_counter() - started
    try:
        _sections(args, work, store, anchor_ok, ray_s)
    finally:
        if started_here:
            ray.shutdown()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the {os.cpu_count()} CPUs)")


def _sections(args, work: Path, store: str, anchor_ok: bool, ray_s: float) -> None:
    # ------------------------------------------------------------------ 1. quality
    spec = fit_spec(args, "bench-quality", "tuned", init="least_squares")
    quality = TimedFit(spec, store)
    table = quality.table()
    n_layers = len(table["logit"])
    first_half = n_layers // 2
    print(
        f"\n1. quality: held-out KL(final || lens) in nats and top-1 agreement per layer "
        f"({args.held_out} sequences x {args.seq_len} tokens)"
    )
    print_table({kind: table[kind] for kind in ("logit", "least_squares", "tuned")})
    logit, tuned = [kl for kl, _ in table["logit"]], [kl for kl, _ in table["tuned"]]
    excess = [t - lo for t, lo in zip(tuned, logit)]
    worst = max(range(n_layers), key=lambda i: excess[i])
    target(
        f"tuned KL <= logit KL + {KL_SLACK} nats at every layer",
        excess[worst] <= KL_SLACK,
        f"max tuned - logit = {excess[worst]:+.4f} nats at layer {worst}",
    )
    t_half, l_half = mean(tuned[:first_half]), mean(logit[:first_half])
    target(
        f"tuned mean KL over layers 0-{first_half - 1} <= {HALF} x logit's",
        t_half <= HALF * l_half,
        f"{t_half:.4f} vs {l_half:.4f} nats, ratio {t_half / l_half:.3f}",
    )
    ls_s, tuned_s = quality.at("least squares: solved"), quality.at("tokens/s, ETA", last=True)
    print(
        f"klstore fit (1 Ray Train worker): least squares solved at {_seconds(ls_s)}, tuned training done at "
        f"{_seconds(tuned_s)}, fit returned at {quality.wall_s:.0f} s (with the held-out evaluation of 3 lenses); "
        f"Ray's start {ray_s:.1f} s before"
    )
    if quality.cached:
        print(f"note: the fit was already in {store}: nothing was timed (use a fresh --store)")

    # ------------------------------------------------------------------ 2. speed against tuned-lens
    print("\n2. speed against the anchor: tuned-lens 0.2.0's own trainer, the same sequences and token budget")
    speed_line = f"klstore's time to tuned-lens's held-out KL <= {SPEED_RATIO:.2f} x tuned-lens's time"
    if args.skip_anchor or not anchor_ok:
        why = "--skip-anchor" if args.skip_anchor else f"no tuned-lens environment at {TUNEDLENS_PY.parent.parent}"
        print(f"anchor skipped: {why} (make bench-tunedlens-env)")
        target(speed_line, None, f"anchor skipped: {why}")
    else:
        _speed(args, work, store, spec, quality, table, ray_s, speed_line)

    # ------------------------------------------------------------------ 3. scale
    print("\n3. scale: tuned training tokens/s with 1 and 2 Ray Train workers (training steps only)")
    if args.skip_scale:
        print("skipped (--skip-scale)")
        return
    rates = {}
    for workers in (1, 2):
        scale = fit_spec(
            args,
            f"bench-scale-{workers}",
            "tuned",
            tokens=args.scale_tokens,
            init="identity",
            workers=workers,
            corpus={"held_out": 2, "train_sequences": None},
            train={"tokens": args.scale_tokens, "tokens_per_step": args.scale_tokens_per_step},
        )
        timed = TimedFit(scale, store)
        rates[workers] = timed.rate()
        rate = "-" if rates[workers] is None else f"{rates[workers]:.1f}"
        print(
            f"{workers} worker(s): {rate} tokens/s ({args.scale_tokens} tokens, {args.scale_tokens_per_step} per step, "
            f"fit {timed.wall_s:.0f} s in all)"
        )
    if rates[1] and rates[2]:
        cpus = os.cpu_count()
        print(
            f"2 workers vs 1: {rates[2] / rates[1]:.2f}x on {cpus} CPUs shared with other processes (load average "
            f"{os.getloadavg()[0]:.1f}); Ray gives each of 2 workers {max(1, cpus // 2)} CPU(s) and 1 worker all "
            f"{cpus}, so on one machine the workers split the same cores"
        )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _speed(args, work, store, spec, quality, table, ray_s, speed_line) -> None:
    anchor = run_anchor(args, spec, work)
    anchor_eval, eval_s, same_hash = evaluate_folder(spec, anchor["lens"])
    anchor_mean = mean(kl for kl, _ in anchor_eval)
    print(
        f"anchor path: tuned-lens's trainer (python -m tuned_lens train: its loader, optimizer, schedule, "
        f"bf16 autocast), with its Data.load returning klstore's packed sequences (the CLI's .jsonl loader "
        f"would re-pack the text its own way and train on the held-out split too); {anchor['steps']} steps, "
        f"{anchor['sequences']} sequences, from the identity (its default)"
    )
    print(
        f"tuned-lens: {anchor['wall_s']:.0f} s in all (python start to exit; setup: model, data, lens "
        f"{anchor['setup_s']:.0f} s; training and saving {anchor['train_s']:.0f} s); its lens evaluated in klstore "
        f"({eval_s:.0f} s, unembedding hash {'matches' if same_hash else 'DIFFERS from'} the model's)"
    )
    print_table(
        {
            "logit": table["logit"],
            "tuned-lens": anchor_eval,
            "least_squares": table["least_squares"],
            "tuned": table["tuned"],
        }
    )
    # klstore's candidates, cheapest first: least squares on --tokens, then (if it misses) the tuned lens
    reach = None
    ls_mean, tuned_mean = mean(kl for kl, _ in table["least_squares"]), mean(kl for kl, _ in table["tuned"])
    ls_s, tuned_s = quality.at("least squares: solved"), quality.at("tokens/s, ETA", last=True)
    if ls_mean <= anchor_mean and ls_s is not None:
        reach = (ray_s + ls_s, f"least squares on {spec.corpus.train_sequences * spec.corpus.seq_len} tokens")
        budget = spec.corpus.train_sequences
        for _ in range(args.ladder):
            if reach[0] <= SPEED_RATIO * anchor["wall_s"] or budget // 2 < max(1, spec.batch_size):
                break
            budget //= 2
            rung = fit_spec(args, f"bench-ls-{budget}", "least_squares", corpus={"train_sequences": budget})
            timed = TimedFit(rung, store)
            rung_mean = mean(kl for kl, _ in timed.table()["least_squares"])
            solved = timed.at("least squares: solved")
            hit = rung_mean <= anchor_mean and solved is not None
            print(
                f"least squares on {budget * spec.corpus.seq_len} tokens: mean held-out KL {rung_mean:.4f} "
                f"({'reaches' if hit else 'misses'} tuned-lens's {anchor_mean:.4f}), solved at {_seconds(solved)}"
            )
            if not hit:
                break
            reach = (ray_s + solved, f"least squares on {budget * spec.corpus.seq_len} tokens")
    elif tuned_mean <= anchor_mean and tuned_s is not None:
        reach = (ray_s + tuned_s, f"tuned on {spec.train.tokens} tokens, end of training (an upper bound)")
    print(
        f"mean held-out KL over the {len(anchor_eval)} layers: tuned-lens {anchor_mean:.4f}, klstore least squares "
        f"{ls_mean:.4f}, klstore tuned {tuned_mean:.4f} nats"
    )
    if reach is None:
        target(speed_line, False, f"klstore did not reach {anchor_mean:.4f} nats within {spec.train.tokens} tokens")
        return
    ratio = reach[0] / anchor["wall_s"]
    print(
        f"klstore: {reach[0]:.0f} s to reach it ({reach[1]}; Ray's start {ray_s:.0f} s + the fit from its call; "
        f"no held-out evaluation); tuned-lens: {anchor['wall_s']:.0f} s"
    )
    target(speed_line, ratio <= SPEED_RATIO, f"{reach[0]:.0f} s vs {anchor['wall_s']:.0f} s, ratio {ratio:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
