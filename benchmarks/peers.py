"""Peer benchmark (issue 13): klstore and nnsight compute the same cells in one process.

    make bench                              # nnsight==0.8.1 in its own environment (build/venv-bench), then this
    python benchmarks/peers.py              # 8 prompts x 30 layers x 5 generated tokens = 1,200 cells per probe
    python benchmarks/peers.py --tutorial   # also nnsight in its tutorial form (below)
    python benchmarks/peers.py --quick      # 2 prompts x 4 layers x 2 tokens, once (the tests' run)
    python benchmarks/peers.py --fast       # also klstore's opt-in speed modes (cached clean pass, bf16 products)

The task: SmolLM2-135M-Instruct (the offline demo model) in float32 on the CPU, the first
8 prompts of jobs/prompts/demo.jsonl, greedy continuation, probes `logit_lens` and `skip`
(block l bypassed: its output := its input), forward KL(P_t || Q_{l,t}) in nats.
Compute only: the model is loaded once, before any clock starts; nnsight wraps a copy
of it (the same weights; its wrapper hooks every module, which would slow klstore on a
shared object). Each side's time covers tokenizing, generating, the clean pass,
the probe and the divergences, i.e. prompt texts -> a [layers x tokens] KL matrix per prompt.
Every measurement is repeated (`--repeat`, best of 5 by default), the sides alternating,
so load from other processes hits both alike.

Two forms of the peer run against the same model (nnsight 0.8.1, its own API throughout):
- `nnsight`: the fastest form found, as a competent user would tune it:
  - generation: one `model.generate` with one invoke per prompt (a left-padded batch);
  - logit_lens: one trace with one invoke per prompt that saves every block's output at the
    positions predicting Gen t (the last n positions: the batch is left-padded) and the
    clean logits (`logits_to_keep=n`); the saved states are then decoded with the model's
    own final norm and head;
  - skip: per prompt one trace with one invoke per layer (`layer.output = layer.input`;
    nnsight's `.skip()` refuses a batch whose invokes skip different layers) and
    `logits_to_keep=n`, so the head runs only at the positions predicting Gen t;
- `nnsight (tutorial form)`, with --tutorial: as nnsight's logit-lens tutorial writes it: the head decodes
  every layer inside the trace at every position (`lm.lm_head(lm.model.norm(layer.output))`)
  and the model's logits come at every position; the positions predicting Gen t are
  taken afterwards. Skip as above without `logits_to_keep`.
Both compute KL with torch.nn.functional.kl_div(log Q, log P, log_target=True) summed over
the vocabulary. klstore runs with its defaults, so it also computes each cell's top-1
match, top-5 lens tokens and the generated token's rank, which the peer does not.

It prints the times, the ratios, the max |difference| between the KL matrices and, on the
first `--reference` prompts, each side's max |difference| from the independent float64
implementation in tests/reference.py. Without nnsight it prints klstore's numbers alone
and says that nnsight is missing. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

NNSIGHT_PIN = "nnsight==0.8.1"  # keep equal to NNSIGHT_SPEC in the Makefile
PROBES = ("logit_lens", "skip")


# ------------------------------------------------------------------ nnsight
def nnsight_generate(lm, prompts_ids: list[list[int]], n: int, eos: set[int], pad: int) -> list[list[int]]:
    """Greedy continuations (EOS kept, nothing after it), one invoke per prompt."""
    with lm.generate(max_new_tokens=n, do_sample=False, pad_token_id=pad) as tracer:
        for ids in prompts_ids:
            with tracer.invoke(ids):
                pass
        with tracer.invoke():
            out = tracer.result.save()
    width = max(len(ids) for ids in prompts_ids)  # left-padded prompts, then the new tokens
    generated = []
    for row in out[:, width:].tolist():
        tokens = []
        for token in row:
            tokens.append(token)
            if token in eos:
                break
        generated.append(tokens)
    return generated


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dimension, as an nnsight user writes it."""
    return torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


@torch.no_grad()
def nnsight_cells(
    lm, probe: str, prompts_ids: list[list[int]], layers: list[int], n: int, eos: set[int], pad: int
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Prompt ids -> per prompt the (len(layers), n_gen) KL matrix, and the generated tokens."""
    generated = nnsight_generate(lm, prompts_ids, n, eos, pad)
    sequences = [ids + gen[:-1] for ids, gen in zip(prompts_ids, generated)]
    counts = [len(gen) for gen in generated]
    keep = max(counts)
    blocks = lm.model.layers
    norm, head = lm.model.norm._module, lm.lm_head._module  # the model's own modules, outside a trace
    saved: list = []
    with lm.trace(logits_to_keep=keep) as tracer:  # the clean pass, every prompt in one batch
        for seq in sequences:
            with tracer.invoke(seq):
                if probe == "logit_lens":
                    saved.append(
                        (
                            torch.stack([blocks[l].output[0, -keep:] for l in layers]),  # (L, keep, H)
                            lm.output.logits[0],
                        )
                    )  # (keep, V)
                else:
                    saved.append(lm.output.logits[0])
    matrices = []
    for i, seq in enumerate(sequences):
        m = counts[i]
        if probe == "logit_lens":
            hidden, clean = saved[i]
            logp = clean[-m:].float().log_softmax(-1)
            logq = head(norm(hidden[:, -m:])).float().log_softmax(-1)  # (L, m, V)
        else:
            logp = saved[i][-m:].float().log_softmax(-1)
            rows: list = []
            with lm.trace(logits_to_keep=m) as tracer:
                for layer in layers:
                    with tracer.invoke(seq):
                        blocks[layer].output = blocks[layer].input
                        rows.append(lm.output.logits[0])
            logq = torch.stack(rows).float().log_softmax(-1)  # (L, m, V)
        matrices.append(_kl(logp.unsqueeze(0), logq).numpy())
    return matrices, generated


@torch.no_grad()
def nnsight_cells_documented(
    lm, probe: str, prompts_ids: list[list[int]], layers: list[int], n: int, eos: set[int], pad: int
) -> tuple[list[np.ndarray], list[list[int]]]:
    """`nnsight_cells` in the form of nnsight's own logit-lens tutorial: the head decodes every
    layer inside the trace at every position, and the model's logits are computed at every
    position; the positions predicting Gen t are taken afterwards."""
    generated = nnsight_generate(lm, prompts_ids, n, eos, pad)
    sequences = [ids + gen[:-1] for ids, gen in zip(prompts_ids, generated)]
    blocks = lm.model.layers
    saved: list = []
    with lm.trace() as tracer:
        for seq in sequences:
            with tracer.invoke(seq):
                if probe == "logit_lens":
                    lens = [lm.lm_head(lm.model.norm(blocks[l].output))[0] for l in layers]  # each (T, V)
                    saved.append((torch.stack(lens), lm.output.logits[0]))
                else:
                    saved.append(lm.output.logits[0])
    matrices = []
    for i, seq in enumerate(sequences):
        m = len(generated[i])
        if probe == "logit_lens":
            lens, clean = saved[i]
            logp = clean[-m:].float().log_softmax(-1)
            logq = lens[:, -m:].float().log_softmax(-1)
        else:
            logp = saved[i][-m:].float().log_softmax(-1)
            rows: list = []
            with lm.trace() as tracer:
                for layer in layers:
                    with tracer.invoke(seq):
                        blocks[layer].output = blocks[layer].input
                        rows.append(lm.output.logits[0])
            logq = torch.stack(rows)[:, -m:].float().log_softmax(-1)
        matrices.append(_kl(logp.unsqueeze(0), logq).numpy())
    return matrices, generated


# ------------------------------------------------------------------ klstore
def klstore_cells(engine, probe: str, prompts, layers: tuple[int, ...], n: int, **options) -> list[np.ndarray]:
    from klstore.spec import GenerationSpec, ProbeSpec

    results = engine.run_many(prompts, [ProbeSpec(probe)], layers, ("kl",), GenerationSpec(max_new_tokens=n), **options)
    out = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        out.append(result[0].values["kl"])
    return out


def reference_cells(model64, probe: str, prompts_ids, generated, layers) -> list[np.ndarray]:
    """The float64 reference of tests/reference.py (one hooked full forward per layer)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from reference import reference_matrices

    out = []
    for ids, gen in zip(prompts_ids, generated):
        values, _ = reference_matrices(model64, list(ids) + list(gen[:-1]), len(ids), len(gen), probe, layers)
        out.append(values["kl"].numpy())
    return out


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))


def best_of(repeat: int, fn):
    """(best seconds, last result) over `repeat` calls."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--layers", default="all", help="klstore layer spec (default all)")
    parser.add_argument("-n", type=int, default=5, help="generated tokens")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs per side")
    parser.add_argument(
        "--reference", type=int, default=2, help="prompts also checked against the float64 reference (0: none)"
    )
    parser.add_argument("--probes", default=",".join(PROBES))
    parser.add_argument(
        "--quick", action="store_true", help="2 prompts x layers 0-3 x 2 tokens, once, no float64 reference"
    )
    parser.add_argument("--no-peer", action="store_true", help="klstore alone even if nnsight is installed")
    parser.add_argument("--tutorial", action="store_true", help="also nnsight in its tutorial form (slow)")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="also klstore's opt-in speed modes: clean_pass cached, matmul_precision medium, both",
    )
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.layers, args.n, args.repeat, args.reference = 2, "0-3", 2, 1, 0

    from klstore.config import read_prompts
    from klstore.core.engine import Engine
    from klstore.core.models import load_model, quiet_libraries
    from klstore.spec import Prompt, parse_layers

    quiet_libraries()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    engine = Engine(loaded)
    layers = parse_layers(args.layers, engine.n_layers, loaded.label)
    demo = read_prompts(os.path.join(REPO, "jobs", "prompts", "demo.jsonl"))
    prompts = [Prompt(p.id, p.text, p.group) for p in demo[: args.prompts]]
    prompts_ids = [engine.encode(p, _gen(args.n)) for p in prompts]
    probes = args.probes.split(",")
    cells = len(prompts) * len(layers) * args.n

    lm = None
    peer = None
    if not args.no_peer:
        try:
            import nnsight
            from nnsight import TransformersModel
        except ImportError:
            print(
                f"nnsight is missing: klstore's numbers only (`make bench` installs {NNSIGHT_PIN} "
                "into build/venv-bench)"
            )
        else:
            peer = f"nnsight {nnsight.__version__}"
            if f"nnsight=={nnsight.__version__}" != NNSIGHT_PIN:
                print(f"note: the benchmark's peer is pinned at {NNSIGHT_PIN}; this is {peer}")
    print(
        f"{loaded.label} float32 on CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"{len(prompts)} prompts x {len(layers)} layers x {args.n} tokens = {cells} cells per probe; "
        f"best of {args.repeat}; peer: {peer or 'none'}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )

    forms = {}
    if peer is not None:
        # nnsight wraps its own copy of the model (the same weights): its wrapper hooks every
        # module, which would slow klstore's forwards on a shared object by about 15% here.
        lm = TransformersModel(copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, task="text-generation")
        lm.tokenizer.padding_side = "left"
        forms = {"nnsight": nnsight_cells}
        if args.tutorial:
            forms["nnsight (tutorial form)"] = nnsight_cells_documented

    fast = (
        {
            "cached": dict(clean_pass="cached"),
            "medium": dict(matmul_precision="medium"),
            "cached+medium": dict(clean_pass="cached", matmul_precision="medium"),
        }
        if args.fast
        else {}
    )
    table = []  # (probe, klstore s, {form: (s, max|diff|)}, klstore cells, nnsight cells, {mode: (s, cells)})
    for probe in probes:
        runs = {"klstore": lambda probe=probe: (klstore_cells(engine, probe, prompts, layers, args.n), None)}
        runs.update(
            {
                f"klstore {mode}": (
                    lambda probe=probe, options=options: (
                        klstore_cells(engine, probe, prompts, layers, args.n, **options),
                        None,
                    )
                )
                for mode, options in fast.items()
            }
        )
        runs.update(
            {
                form: (
                    lambda fn=fn, probe=probe: fn(
                        lm, probe, prompts_ids, list(layers), args.n, engine.runtime.eos, engine.runtime.pad_id
                    )
                )
                for form, fn in forms.items()
            }
        )
        mine = [r.token_ids for r in engine.generate_batch(prompts_ids, _gen(args.n))]
        for form, run in runs.items():
            _, generated = run()  # warm-up
            if generated is not None and [tuple(g) for g in generated] != [tuple(g) for g in mine]:
                print(f"warning: {form}'s greedy continuations differ from klstore's ({probe})")
        best, results = dict.fromkeys(runs, float("inf")), {}
        for _ in range(args.repeat):  # the sides alternate, so every side sees the same load
            for form, run in runs.items():
                seconds, (results[form], _) = best_of(1, run)
                best[form] = min(best[form], seconds)
        k_cells = results["klstore"]
        table.append(
            (
                probe,
                best["klstore"],
                {form: (best[form], max_diff(k_cells, results[form])) for form in forms},
                k_cells,
                results.get("nnsight"),
                {mode: (best[f"klstore {mode}"], results[f"klstore {mode}"]) for mode in fast},
            )
        )

    header = f"{'probe':11} {'klstore s':>9}"
    for form in forms or ["nnsight"]:
        header += f" {form + ' s':>{max(9, len(form) + 2)}} {'ratio':>6} {'max|diff|':>9}"
    print("\n" + header)
    for probe, k_time, peers_out, _, _, _ in table:
        line = f"{probe:11} {k_time:9.3f}"
        if not peers_out:
            line += f" {'-':>9} {'-':>6} {'-':>9}"
        for form, (seconds, diff) in peers_out.items():
            line += f" {seconds:{max(9, len(form) + 2)}.3f} {seconds / k_time:5.2f}x {diff:9.1e}"
        print(line)
    if forms:
        print(
            "ratio = peer time / klstore time (above 1: klstore is faster); max|diff|: the largest |KL "
            "difference| between klstore's and the peer's matrices, nats"
        )
    if fast:
        print("\nklstore's opt-in speed modes (docs/engine.md), same run:")
        print(f"{'probe':11} {'mode':14} {'s':>7} {'vs default':>10} {'vs nnsight':>10} {'max|diff| vs default':>21}")
        for probe, k_time, peers_out, k_cells, _, modes in table:
            for mode, (seconds, cells_) in modes.items():
                versus = f"{peers_out['nnsight'][0] / seconds:9.2f}x" if "nnsight" in peers_out else f"{'-':>10}"
                print(
                    f"{probe:11} {mode:14} {seconds:7.3f} {k_time / seconds:9.2f}x {versus} "
                    f"{max_diff(k_cells, cells_):21.1e}"
                )

    if args.reference:
        count = min(args.reference, len(prompts))
        model64 = copy.deepcopy(loaded.model).double()
        generated = [r.token_ids for r in engine.generate_batch(prompts_ids[:count], _gen(args.n))]
        print(f"\nfloat64 reference (tests/reference.py) on the first {count} prompts:")
        for probe, _, _, k_cells, n_cells, modes in table:
            ref = reference_cells(model64, probe, prompts_ids[:count], generated, list(layers))
            line = f"  {probe:11} max|klstore - float64| {max_diff(k_cells[:count], ref):.2e}"
            if n_cells is not None:
                line += f"   max|nnsight - float64| {max_diff(n_cells[:count], ref):.2e}"
            for mode, (_, cells_) in modes.items():
                line += f"   {mode}: {max_diff(cells_[:count], ref):.2e}"
            print(line)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the {os.cpu_count()} CPUs)")
    return 0


def _gen(n: int):
    from klstore.spec import GenerationSpec

    return GenerationSpec(max_new_tokens=n)


if __name__ == "__main__":
    raise SystemExit(main())
