"""Peer benchmark (issue 13): klstore and nnsight compute the same cells in one process.

    make bench                          # nnsight==0.8.1 in its own environment (build/venv-bench), then this
    python benchmarks/peers.py          # 8 prompts x 30 layers x 5 generated tokens = 1,200 cells per probe
    python benchmarks/peers.py --quick  # 2 prompts x 4 layers x 2 tokens, one repetition (the tests' smoke run)

The task: SmolLM2-135M-Instruct (the offline demo model) in float32 on the CPU, the first
8 prompts of jobs/prompts/demo.jsonl, greedy continuation, probes `logit_lens` and `skip`
(block l bypassed: its output := its input), forward KL(P_t || Q_{l,t}) in nats.
Compute only: the model is loaded once, before any clock starts, and both sides use
that same model object. Each side's time covers tokenizing, generating, the clean pass,
the probe and the divergences, i.e. prompt texts -> a [layers x tokens] KL matrix per prompt.
Every measurement is repeated (`--repeat`, best of 3 by default), the sides alternating,
so load from other processes hits both alike.

The nnsight side is written as a competent nnsight user would (nnsight's own API, the
fastest form found; nnsight 0.8.1):
- generation: one `model.generate` with one invoke per prompt (left-padded batch);
- logit_lens: one trace with one invoke per prompt that saves every block's output at the
  positions predicting Gen t (the last n positions: the batch is left-padded) and the
  clean logits; those are then decoded with the model's own final norm and head;
- skip: per prompt one trace with one invoke per layer (`layer.output = layer.input`;
  nnsight's `.skip()` refuses a batch in which invokes skip different layers) and
  `logits_to_keep=n`, so the head runs only at the positions predicting Gen t;
- KL: torch.nn.functional.kl_div(log Q, log P, log_target=True), summed over the vocabulary.

It prints both times, their ratio, the max |difference| between the two KL matrices
and, on the first `--reference` prompts, each side's max |difference| from the
independent float64 implementation in tests/reference.py. Without nnsight it prints
klstore's numbers alone and says that nnsight is missing. Prints numbers; asserts nothing.
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
def nnsight_cells(lm, probe: str, prompts_ids: list[list[int]], layers: list[int], n: int,
                  eos: set[int], pad: int) -> tuple[list[np.ndarray], list[list[int]]]:
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
                    saved.append((torch.stack([blocks[l].output[0, -keep:] for l in layers]),  # (L, keep, H)
                                  lm.output.logits[0]))  # (keep, V)
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


# ------------------------------------------------------------------ klstore
def klstore_cells(engine, probe: str, prompts, layers: tuple[int, ...], n: int, **options) -> list[np.ndarray]:
    from klstore.spec import GenerationSpec, ProbeSpec

    results = engine.run_many(prompts, [ProbeSpec(probe)], layers, ("kl",), GenerationSpec(max_new_tokens=n),
                              **options)
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
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per side")
    parser.add_argument("--reference", type=int, default=2,
                        help="prompts also checked against the float64 reference (0: none)")
    parser.add_argument("--probes", default=",".join(PROBES))
    parser.add_argument("--quick", action="store_true",
                        help="2 prompts x layers 0-3 x 2 tokens, once, no float64 reference")
    parser.add_argument("--no-peer", action="store_true", help="klstore alone even if nnsight is installed")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.layers, args.n, args.repeat, args.reference = 2, "0-3", 2, 1, 0

    from klstore.core.engine import Engine
    from klstore.core.models import load_model, quiet_libraries
    from klstore.spec import Prompt, parse_layers, read_prompts

    quiet_libraries()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    engine = Engine(loaded)
    layers = parse_layers(args.layers, engine.n_layers, loaded.label)
    demo = read_prompts(os.path.join(REPO, "jobs", "prompts", "demo.jsonl"))
    prompts = [Prompt(p.id, p.text, p.group) for p in demo[:args.prompts]]
    prompts_ids = [engine.encode(p, _gen(args.n)) for p in prompts]
    probes = args.probes.split(",")
    cells = len(prompts) * len(layers) * args.n

    lm = None
    peer = "nnsight not installed"
    if not args.no_peer:
        try:
            import nnsight
            from nnsight import TransformersModel
        except ImportError:
            print(f"nnsight is missing: klstore's numbers only (`make bench` installs {NNSIGHT_PIN} "
                  "into build/venv-bench)")
        else:
            peer = f"nnsight {nnsight.__version__}"
            if f"nnsight=={nnsight.__version__}" != NNSIGHT_PIN:
                print(f"note: the benchmark's peer is pinned at {NNSIGHT_PIN}; this is {peer}")
    print(f"{loaded.label} float32 on CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{len(prompts)} prompts x {len(layers)} layers x {args.n} tokens = {cells} cells per probe; "
          f"best of {args.repeat}; peer: {peer}", flush=True)

    # klstore first on the bare model, then again once nnsight has wrapped it (its hooks sit on
    # every module), so the ratio is taken under the same conditions.
    run_k = {probe: (lambda probe=probe: klstore_cells(engine, probe, prompts, layers, args.n)) for probe in probes}
    bare = {}
    for probe in probes:
        run_k[probe]()  # warm-up
        bare[probe] = best_of(args.repeat, run_k[probe])
    if peer.startswith("nnsight "):
        lm = TransformersModel(loaded.model, tokenizer=loaded.tokenizer, task="text-generation")
        lm.tokenizer.padding_side = "left"
        eos, pad = engine._eos, engine._pad_id

    rows = []
    for probe in probes:
        k_time, k_cells = bare[probe]
        if lm is None:
            rows.append((probe, k_time, None, None, None, k_cells, None))
            continue
        run_n = lambda probe=probe: nnsight_cells(lm, probe, prompts_ids, list(layers), args.n, eos, pad)  # noqa: E731
        _, generated = run_n()  # warm-up
        mine = [r.token_ids for r in engine.generate_batch(prompts_ids, _gen(args.n))]
        if [tuple(g) for g in generated] != [tuple(g) for g in mine]:
            print(f"warning: nnsight's greedy continuations differ from klstore's for {probe}")
        k_best, n_best = float("inf"), float("inf")
        n_cells = None
        for _ in range(args.repeat):  # alternate, so both sides see the same load
            k_best = min(k_best, best_of(1, run_k[probe])[0])
            t, (n_cells, _) = best_of(1, run_n)
            n_best = min(n_best, t)
        rows.append((probe, k_time, k_best, n_best, max_diff(k_cells, n_cells), k_cells, n_cells))

    print(f"\n{'probe':11} {'klstore s':>9} {'(wrapped)':>9} {'nnsight s':>9} {'ratio':>6} "
          f"{'max|klstore-nnsight|':>20}")
    for probe, k_time, k_wrapped, n_time, diff, _, _ in rows:
        if n_time is None:
            print(f"{probe:11} {k_time:9.3f} {'-':>9} {'-':>9} {'-':>6} {'-':>20}")
        else:
            print(f"{probe:11} {k_time:9.3f} {k_wrapped:9.3f} {n_time:9.3f} {n_time / min(k_time, k_wrapped):5.2f}x "
                  f"{diff:20.2e}")
    print("klstore s: on the bare model; (wrapped): the same after nnsight wrapped it, alternating with nnsight; "
          "ratio = nnsight / the faster klstore time")

    if args.reference:
        count = min(args.reference, len(prompts))
        model64 = copy.deepcopy(loaded.model).double()
        generated = [r.token_ids for r in engine.generate_batch(prompts_ids[:count], _gen(args.n))]
        print(f"\nfloat64 reference (tests/reference.py) on the first {count} prompts:")
        for probe, _, _, _, _, k_cells, n_cells in rows:
            ref = reference_cells(model64, probe, prompts_ids[:count], generated, list(layers))
            line = f"  {probe:11} max|klstore - float64| {max_diff(k_cells[:count], ref):.2e}"
            if n_cells is not None:
                line += f"   max|nnsight - float64| {max_diff(n_cells[:count], ref):.2e}"
            print(line)
    return 0


def _gen(n: int):
    from klstore.spec import GenerationSpec

    return GenerationSpec(max_new_tokens=n)


if __name__ == "__main__":
    raise SystemExit(main())
