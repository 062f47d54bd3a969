"""Engine benchmark (issue 5): klstore's layer sweep vs. a naive hand-written baseline.

    python benchmarks/engine.py                  # SmolLM2-135M, 16 prompts x 30 layers x 5 tokens
    python benchmarks/engine.py --gemma-memory [--divergences kl]   # peak memory: Gemma-3-270M, 64 tokens, logit_lens
    python benchmarks/engine.py --config qwen2-1.5b --device cuda   # random weights, realistic size

For every probe it prints cells per second for klstore and for the naive
baseline run in the same process, their ratio, klstore's achieved GFLOP/s
(FLOPs counted by torch's FlopCounterMode) against a large plain torch.matmul
timed in the same process, and the process's peak resident memory.

The naive baseline is what a user writes by hand: `generate()`, then per layer
one full hooked forward (full-vocabulary logits at every position) for
interventions, or one hooked forward decoding every layer at full vocabulary
at every position for the logit lens; divergences from klstore.divergence.
With --roofline it prints instead, per probe (logit_lens, skip, patch by default), where
the time goes: the engine's phases run one by one from the outside (generation, clean
trace, layer sweep, unembedding, divergences, top-1 and lens tokens, writing the rows
into a temporary store), each phase's FLOPs and its fraction of the matmul rate, the
FLOP lower bound of the work the cells require, and the fraction of the plain matmul
FLOP/s that the whole computation achieves against that bound:

    python benchmarks/engine.py --roofline       # 8 prompts x 30 layers x 5 tokens (1,200 cells)

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

PROBES = ("logit_lens", "skip", "ablate_attn", "ablate_mlp", "noise", "steer", "patch")
CONFIGS = {  # random-weight models of realistic size (Qwen2-style)
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(device, dtype, n=2048, reps=5) -> float:
    """GFLOP/s of a plain n x n x n matmul: the yardstick (benchmarks/gpu_check.py uses it too)."""
    return _shape_gflops(device, dtype, n, n, n, reps)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ naive
def _naive_hook(engine, spec, layer, prompt, n_prompt, source_last):
    """A forward hook doing the probe's change to block `layer`, as a user would write it."""
    from klstore.core.probes import noise_tensor, rms

    block = engine.adapter.blocks[layer]
    if spec.name == "skip":

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return [block.register_forward_hook(hook, with_kwargs=True)]
    if spec.name in ("ablate_attn", "ablate_mlp"):
        sub = engine.adapter.sublayer(block, spec.name.removeprefix("ablate_"), layer)
        return [
            sub.register_forward_hook(
                lambda m, a, o: (
                    (torch.zeros_like(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else torch.zeros_like(o)
                )
            )
        ]

    def change(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if spec.name == "noise":
            noise = noise_tensor(spec.params["seed"], prompt.id, layer, h.shape[1:]).to(h.device)
            h = h + spec.params["scale"] * rms(h).to(h.dtype) * noise.to(h.dtype)
        elif spec.name == "steer":
            h = h + spec.params["alpha"] * engine._steer_cache[spec.key()][layer].to(h.device, h.dtype)
        elif spec.name == "patch":
            h = h.clone()
            h[0, n_prompt - 1] = source_last[layer].to(h.dtype)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return [block.register_forward_hook(change)]


@torch.no_grad()
def naive_cells(engine, prompt, spec, n_new, source_last=None):
    """One prompt the naive way; returns the number of cells computed."""
    from klstore.core import divergence

    model, tok = engine.model, engine.tokenizer
    ids = torch.tensor([tok(prompt.text)["input_ids"]], device=engine.device)
    out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
    seq = out[:, :-1]
    n_prompt, n_gen = ids.shape[1], out.shape[1] - ids.shape[1]
    pos = torch.arange(n_prompt - 1, n_prompt - 1 + n_gen, device=engine.device)
    clean = model(seq).logits[0].float().log_softmax(-1)[pos]
    blocks = engine.adapter.blocks
    if spec.name == "logit_lens":
        captured = []
        handles = [
            b.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
            for b in blocks
        ]
        model(seq)
        for h in handles:
            h.remove()
        for hidden in captured:  # decode every layer at full vocabulary, every position
            logq = engine.adapter.logits(hidden[0]).log_softmax(-1)[pos]
            divergence.kl(clean, logq)
        return len(blocks) * n_gen
    for layer in range(len(blocks)):
        handles = _naive_hook(engine, spec, layer, prompt, n_prompt, source_last)
        logq = model(seq).logits[0].float().log_softmax(-1)[pos]
        for h in handles:
            h.remove()
        divergence.kl(clean, logq)
    return len(blocks) * n_gen


def bench_probes(engine, prompts, n_new, probes, steer_file):
    from torch.utils.flop_counter import FlopCounterMode

    from klstore.spec import GenerationSpec, ProbeSpec, Prompt

    device = engine.device
    peak = matmul_gflops(device, engine.loaded.dtype)
    print(f"plain torch.matmul 2048^3 ({engine.loaded.dtype}): {peak:.1f} GFLOP/s")
    print(
        f"{'probe':12} {'klstore cells/s':>16} {'naive cells/s':>14} {'ratio':>6} {'GFLOP/s':>8} "
        f"{'of matmul':>9} {'peak RSS GiB':>12}"
    )
    spec_for = {
        "logit_lens": ProbeSpec("logit_lens"),
        "skip": ProbeSpec("skip"),
        "ablate_attn": ProbeSpec("ablate_attn"),
        "ablate_mlp": ProbeSpec("ablate_mlp"),
        "noise": ProbeSpec("noise", {"scale": 4.0, "seed": 0}),
        "steer": ProbeSpec("steer", {"alpha": 4.0, "vector": steer_file}),
        "patch": ProbeSpec("patch"),
    }
    gen = GenerationSpec(max_new_tokens=n_new)
    for name in probes:
        spec = spec_for[name]
        engine.prepare(spec, gen)
        engine.run(prompts[0], [spec], "all", ("kl",), gen)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        results = engine.run_many(prompts, [spec], "all", ("kl",), gen)
        cells = sum(r[0].values["kl"].size for r in results)
        _sync(device)
        fast = cells / (time.perf_counter() - t0)
        with FlopCounterMode(display=False) as counter:
            engine.run_many(prompts, [spec], "all", ("kl",), gen)
        gflops = counter.get_total_flops() / (cells / fast) / 1e9
        t0 = time.perf_counter()
        naive = 0
        for prompt in prompts:
            source = None
            if name == "patch":  # the naive user also runs the source prompt once
                source = engine.last_position_outputs(engine.encode(Prompt(prompt.id, prompt.source), gen))
            naive += naive_cells(engine, prompt, spec, n_new, source)
        _sync(device)
        slow = naive / (time.perf_counter() - t0)
        print(
            f"{name:12} {fast:16.0f} {slow:14.0f} {fast / slow:5.1f}x {gflops:8.1f} "
            f"{gflops / peak:8.0%} {peak_rss_gib():12.2f}",
            flush=True,
        )


# ------------------------------------------------------------------ roofline
ROOFLINE_PROBES = ("logit_lens", "skip", "patch")
PHASES = (
    "generation",
    "clean trace",
    "layer sweep",
    "unembedding",
    "divergences",
    "top-1, lens tokens",
    "other",
    "writing rows",
)


class _Clock:
    """Exclusive seconds per phase. `with clock("name"):` charges the block's time to that
    phase, minus the time of phases nested inside it (the innermost phase gets each second).
    Given a running torch FlopCounterMode, it charges the FLOPs counted to phases alike."""

    def __init__(self, device, counter=None):
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.flops = dict.fromkeys(PHASES, 0)
        self._counter = counter
        self._stack: list = []
        self._since = 0.0
        self._flops_since = 0

    def _switch(self):
        _sync(self.device)
        now = time.perf_counter()
        counted = self._counter.get_total_flops() if self._counter is not None else 0
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
            self.flops[self._stack[-1]] += counted - self._flops_since
        self._since, self._flops_since = now, counted

    def __call__(self, phase):
        clock = self

        class _Span:
            def __enter__(self):
                clock._switch()
                clock._stack.append(phase)

            def __exit__(self, *exc):
                clock._switch()
                clock._stack.pop()

        return _Span()

    @property
    def current(self):
        return self._stack[-1] if self._stack else None


def required_flops(engine, probe: str, generations, layers, source_lengths) -> dict:
    """The FLOPs the cells require at least, by part (what the engine performs is counted by
    torch's FlopCounterMode instead, phase by phase).

    Only weight matmuls count, a multiply-add as 2 FLOPs: a block costs 2 x its parameters
    per position it runs on. Attention scores (QK^T, AV), norms, activations and the
    divergences' elementwise work are left out (attention is under 1% of a block's FLOPs at
    these lengths). Per prompt, with T = prompt + n - 1 teacher-forced positions (each
    prompt's own, no padding), n cells per layer, V x H the head:
      clean pass    2 * (block parameters) * T, once: generation and the clean trace run the
                    same blocks on the same tokens, so one of them could give both;
      layer sweep   for a row intervening at layer l, the blocks above l (ablate_*: block l
                    too), 2 * params(k) per position, at every position (skip: block l's
                    output changes everywhere) or, for patch, only at the n positions from the
                    patched one on (the earlier ones stay clean); patch also needs the source
                    prompt's clean pass;
      unembedding   2 * V * H per cell (KL needs Q's whole vocabulary), plus the n positions
                    giving P_t.
    """
    per_block = [sum(p.numel() for p in block.parameters()) for block in engine.adapter.blocks]
    total = sum(per_block)
    vocab, hidden = engine.model.get_output_embeddings().weight.shape
    need = dict.fromkeys(("clean pass", "layer sweep", "unembedding"), 0.0)
    for gen, source_len in zip(generations, source_lengths):
        n = gen.n
        positions = len(gen.prompt_ids) + n - 1
        need["clean pass"] += 2.0 * total * positions
        need["unembedding"] += 2.0 * vocab * hidden * n * (1 + len(layers))
        if probe == "logit_lens":
            continue
        above = [2.0 * sum(per_block[l + 1 :]) for l in layers]
        if probe in ("ablate_attn", "ablate_mlp"):  # block l itself runs again, a sub-layer zeroed
            above = [a + 2.0 * per_block[l] for a, l in zip(above, layers)]
        need["layer sweep"] += sum(above) * (n if probe == "patch" else positions)
        if probe == "patch":
            need["layer sweep"] += 2.0 * total * source_len
    return need


@contextlib.contextmanager
def instrumented(engine, clock):
    """Time engine.run_many's phases from the outside: the engine's own methods, wrapped on
    this instance (and the divergence functions on their module) for the duration.

      generation   engine.generate_batch (encoding the prompts goes to "other")
      clean trace  engine.trace_batch, including its head at the n reference positions
      layer sweep  producing each chunk of sweeps.final_hidden (the intervened forwards;
                   logit lens: stacking recorded states), and engine.probe_context (patch:
                   the source prompt's pass)
      unembedding  klstore.core.unembed.run (the forward-KL runs: final norm, head, and in
                   the same vocabulary-chunked pass log-sum-exp, KL, rank and top-k), or on
                   the row-chunked path engine.adapter.log_probs (final norm, head, log_softmax)
      divergences  klstore.core.divergence's compute functions (the row-chunked path)
      top-1, lens tokens   the rest of readout.matrices: on the row-chunked path top-1, rank
                   and top-k; on both, the copies to numpy and the KLMatrix
      other        the rest of engine.run_many (end-to-end time minus all of the above)
    """
    from klstore.core import divergence, readout, sweeps, unembed

    def timed(phase, fn, unless=()):
        def wrapper(*args, **kwargs):
            if clock.current in unless:
                return fn(*args, **kwargs)
            with clock(phase):
                return fn(*args, **kwargs)

        return wrapper

    def sweep(fn):
        def wrapper(*args, **kwargs):
            pieces = fn(*args, **kwargs)
            while True:
                with clock("layer sweep"):
                    piece = next(pieces, None)
                if piece is None:
                    return
                yield piece

        return wrapper

    patched = [
        (engine, "generate_batch", timed("generation", engine.generate_batch)),
        (engine, "trace_batch", timed("clean trace", engine.trace_batch)),
        (engine, "probe_context", timed("layer sweep", engine.probe_context)),
        (sweeps, "final_hidden", sweep(sweeps.final_hidden)),
        (readout, "matrices", timed("top-1, lens tokens", readout.matrices)),
        (unembed, "run", timed("unembedding", unembed.run)),
        (engine.adapter, "log_probs", timed("unembedding", engine.adapter.log_probs, unless=("clean trace",))),
    ]
    patched += [
        (divergence, name, timed("divergences", getattr(divergence, name)))
        for name in ("compute", "compute_rows", "kl_rows")
    ]
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in patched]
    try:
        for obj, name, fn in patched:
            setattr(obj, name, fn)
        yield
    finally:
        for obj, name, before in saved:
            if before is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, before)


_MISSING = object()


def phase_run(engine, prompts, spec, layers, gen_spec, clock, divergences=("kl",)):
    """One engine.run_many with its phases timed (`instrumented`), then the worker's writes
    of its results into a temporary store. Returns the results."""
    import tempfile

    from klstore.run import records
    from klstore.store import open_store

    with instrumented(engine, clock), clock("other"):
        results = engine.run_many(prompts, [spec], layers, divergences, gen_spec)
    outcomes = [records.PromptOutcome(p, tuple(r)) for p, r in zip(prompts, results)]
    with tempfile.TemporaryDirectory() as tmp, clock("writing rows"):
        store = open_store(tmp, create=True)
        where = dict(model=engine.loaded.label, run_id="bench")
        store.write("kl", records.kl_rows(outcomes, spec.name), "part-bench.parquet", probe=spec.name, **where)
        store.write("generations", records.generation_rows(outcomes), "part-bench.parquet", **where)
        store.write("prompts", records.prompt_rows(outcomes), "part-bench.parquet", **where)
    return results


def roofline(engine, prompts, n_new, probes, repeat=3):
    from torch.utils.flop_counter import FlopCounterMode

    from klstore.core import readout
    from klstore.spec import GenerationSpec, ProbeSpec, Prompt, parse_layers

    device, dtype = engine.device, engine.loaded.dtype
    gen = GenerationSpec(max_new_tokens=n_new)
    layers = parse_layers("all", engine.n_layers, engine.loaded.label)
    vocab, hidden = engine.model.get_output_embeddings().weight.shape
    peak = matmul_gflops(device, dtype)
    head_rows = max(1, readout.cells_per_chunk(vocab, engine.chunk_bytes))
    head_shape = _shape_gflops(device, dtype, head_rows, hidden, vocab)
    print(
        f"yardstick: plain torch.matmul 2048^3 ({dtype}) {peak:.1f} GFLOP/s; the head's own shape "
        f"({head_rows} x {hidden}) @ ({hidden} x {vocab}) {head_shape:.1f} GFLOP/s"
    )
    cells_total = None
    for name in probes:
        spec = ProbeSpec(name)
        engine.prepare(spec)
        results = phase_run(engine, prompts, spec, layers, gen, _Clock(device))  # warm-up, writing too
        for r in results:
            if isinstance(r, Exception):
                raise r
        cells_total = sum(r[0].values["kl"].size for r in results)
        generations = [r[0].generation for r in results]
        # Each repetition: the yardstick, the plain end-to-end run, the instrumented run. Each
        # figure is its best over the repetitions, so a burst of load from other processes
        # hits none of them; the phases of the instrumented run with the least total are shown.
        e2e, best = float("inf"), None
        for _ in range(repeat):
            peak = max(peak, matmul_gflops(device, dtype))
            _sync(device)
            t0 = time.perf_counter()
            engine.run_many(prompts, [spec], layers, ("kl",), gen)
            _sync(device)
            e2e = min(e2e, time.perf_counter() - t0)
            clock = _Clock(device)
            phase_run(engine, prompts, spec, layers, gen, clock)
            if best is None or sum(clock.seconds.values()) < sum(best.values()):
                best = dict(clock.seconds)
        with FlopCounterMode(display=False) as counter:  # FLOPs performed, by phase (not timed)
            counted = _Clock(device, counter)
            phase_run(engine, prompts, spec, layers, gen, counted)
        done = counted.flops
        sources = [len(engine.encode(Prompt(p.id, p.source), gen)) if name == "patch" else 0 for p in prompts]
        need = required_flops(engine, name, generations, layers, sources)
        compute = sum(v for k, v in best.items() if k != "writing rows")
        total = sum(best.values())
        print(
            f"\n{name}: {cells_total} cells; engine.run_many end-to-end {e2e:.3f} s, instrumented "
            f"{compute:.3f} s ({(compute - e2e) / e2e:+.0%}; the phases below), {total:.3f} s with writing "
            f"the rows (best of {repeat}; matmul yardstick {peak:.1f} GFLOP/s)"
        )
        print(f"  {'phase':20} {'s':>7} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8} {'of matmul':>9}")
        for phase in PHASES:
            sec, flops = best[phase], done[phase]
            rate = f"{flops / sec / 1e9:8.1f} {flops / sec / 1e9 / peak:9.0%}" if flops and sec else f"{'':8} {'':9}"
            print(f"  {phase:20} {sec:7.3f} {sec / total:6.0%} {flops / 1e9:7.1f} {rate}")
        dominant = max(PHASES, key=best.get)
        bound = sum(need.values())
        floor = bound / (peak * 1e9)
        print(f"  dominant phase: {dominant} ({best[dominant] / total:.0%} of the phases' time)")
        performed = sum(done.values())
        print(
            f"  FLOPs performed (torch's FlopCounterMode: every matmul, attention too): {performed / 1e9:.1f} G; "
            f"{performed / e2e / 1e9:.1f} GFLOP/s = {performed / e2e / 1e9 / peak:.0%} of matmul end-to-end"
        )
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in need.items() if v)
        print(
            f"  lower bound (work the cells require): {bound / 1e9:.1f} GFLOP ({parts}); at "
            f"{peak:.0f} GFLOP/s that is {floor:.3f} s"
        )
        print(
            f"  achieved: {bound / e2e / 1e9:.1f} GFLOP/s = {floor / e2e:.0%} of the plain matmul rate "
            f"(lower bound / end-to-end time)"
        )
    print(
        f"\nthe matmul yardstick is the best of its measurements so far, {peak:.1f} GFLOP/s at the end; "
        f"a probe's fractions use the value printed with it; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )


def _shape_gflops(device, dtype, m, k, n, reps=5) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def gemma_memory(divergences=("kl", "js")):
    from klstore.core.engine import Engine
    from klstore.core.models import load_model, quiet_libraries
    from klstore.spec import GenerationSpec, ProbeSpec, Prompt

    quiet_libraries()
    loaded = load_model("gemma3-270m", device="cpu")
    model_gib = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**30
    after_load = peak_rss_gib()
    engine = Engine(loaded)
    prompt = Prompt("story", "Write a long story about a dragon who learns to paint. Once upon a time,")
    t0 = time.perf_counter()
    result = engine.run(
        prompt, [ProbeSpec("logit_lens")], "all", tuple(divergences), GenerationSpec(max_new_tokens=64)
    )[0]
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    full = len(result.layers) * result.generation.n * 262144 * 4 / 2**30
    print(
        f"Gemma-3-270M logit_lens, {len(result.layers)} layers x {result.generation.n} tokens, "
        f"{'+'.join(divergences)} in {seconds:.1f} s"
    )
    print(f"model parameters: {model_gib:.2f} GiB; peak RSS after load {after_load:.2f} GiB, after run {peak:.2f} GiB")
    print(
        f"peak - model = {peak - model_gib:.2f} GiB (target <= 1 GiB); an unchunked float32 "
        f"[layers x tokens x vocab] tensor alone would be {full:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, help="default 16 (8 with --roofline)")
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--probes", help=f"default {','.join(PROBES)} ({','.join(ROOFLINE_PROBES)} with --roofline)")
    parser.add_argument("--gemma-memory", action="store_true")
    parser.add_argument(
        "--divergences",
        default="kl,js",
        help="--gemma-memory: kl alone takes the head pass (core/unembed.py), kl,js the row path",
    )
    parser.add_argument("--roofline", action="store_true", help="time per phase and FLOP bounds instead")
    parser.add_argument("--repeat", type=int, default=3, help="--roofline: best of this many runs")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="random-weight model of this size instead of SmolLM2")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.gemma_memory:
        gemma_memory(tuple(args.divergences.split(",")))
        return
    if args.prompts is None:
        args.prompts = 8 if args.roofline else 16
    if args.probes is None:
        args.probes = ",".join(ROOFLINE_PROBES if args.roofline else PROBES)

    import tempfile

    from klstore.config import read_prompts
    from klstore.core.engine import Engine
    from klstore.core.models import from_objects, load_model, pick_device_dtype, quiet_libraries
    from klstore.spec import Prompt

    quiet_libraries()
    smollm2 = load_model("smollm2-135m", device=args.device)
    if args.config:
        import transformers

        device, dtype = pick_device_dtype(args.device)
        config = transformers.Qwen2Config(max_position_embeddings=4096, **CONFIGS[args.config])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
        loaded = from_objects(args.config, model, smollm2.tokenizer)
    else:
        loaded = smollm2
    engine = Engine(loaded)
    demo = read_prompts(os.path.join(os.path.dirname(__file__), "..", "jobs", "prompts", "demo.jsonl"))
    prompts = [
        Prompt(f"b{i}", demo[i % len(demo)].text, source=demo[(i + 1) % len(demo)].text) for i in range(args.prompts)
    ]
    hidden = loaded.model.get_output_embeddings().weight.shape[1]
    steer_file = os.path.join(tempfile.mkdtemp(), "v.pt")
    torch.save(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), steer_file)
    print(
        f"{loaded.label}: {engine.n_layers} layers, {args.prompts} prompts x {args.n} tokens, "
        f"device {loaded.device}, {torch.get_num_threads()} threads"
    )
    if args.roofline:
        roofline(engine, prompts, args.n, args.probes.split(","), args.repeat)
    else:
        bench_probes(engine, prompts, args.n, args.probes.split(","), steer_file)


if __name__ == "__main__":
    main()
