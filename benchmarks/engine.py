"""Engine benchmark (issue 5): klstore's layer sweep vs. a naive hand-written baseline.

    python benchmarks/engine.py                  # SmolLM2-135M, 16 prompts x 30 layers x 5 tokens
    python benchmarks/engine.py --gemma-memory   # peak memory: Gemma-3-270M, 64 tokens, logit_lens
    python benchmarks/engine.py --config qwen2-1.5b --device cuda   # random weights, realistic size

For every probe it prints cells per second for klstore and for the naive
baseline run in the same process, their ratio, klstore's achieved GFLOP/s
(FLOPs counted by torch's FlopCounterMode) against a large plain torch.matmul
timed in the same process, and the process's peak resident memory.

The naive baseline is what a user writes by hand: `generate()`, then per layer
one full hooked forward (full-vocabulary logits at every position) for
interventions, or one hooked forward decoding every layer at full vocabulary
at every position for the logit lens; divergences from klstore.divergence.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

PROBES = ("logit_lens", "skip", "ablate_attn", "ablate_mlp", "noise", "steer", "patch")
CONFIGS = {  # random-weight models of realistic size (Qwen2-style)
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(device, dtype, n=2048, reps=5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


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
        return [sub.register_forward_hook(
            lambda m, a, o: (torch.zeros_like(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else torch.zeros_like(o))]

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
        handles = [b.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
                   for b in blocks]
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

    from klstore.spec import GenerationSpec, Prompt
    from klstore.spec import ProbeSpec

    device = engine.device
    peak = matmul_gflops(device, engine.loaded.dtype)
    print(f"plain torch.matmul 2048^3 ({engine.loaded.dtype}): {peak:.1f} GFLOP/s")
    print(f"{'probe':12} {'klstore cells/s':>16} {'naive cells/s':>14} {'ratio':>6} {'GFLOP/s':>8} "
          f"{'of matmul':>9} {'peak RSS GiB':>12}")
    spec_for = {"logit_lens": ProbeSpec("logit_lens"), "skip": ProbeSpec("skip"),
                "ablate_attn": ProbeSpec("ablate_attn"), "ablate_mlp": ProbeSpec("ablate_mlp"),
                "noise": ProbeSpec("noise", {"scale": 4.0, "seed": 0}),
                "steer": ProbeSpec("steer", {"alpha": 4.0, "vector": steer_file}),
                "patch": ProbeSpec("patch")}
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
        print(f"{name:12} {fast:16.0f} {slow:14.0f} {fast / slow:5.1f}x {gflops:8.1f} "
              f"{gflops / peak:8.0%} {peak_rss_gib():12.2f}", flush=True)


def gemma_memory():
    from klstore.core.engine import Engine
    from klstore.spec import GenerationSpec, Prompt
    from klstore.core.models import load_model, quiet_libraries
    from klstore.spec import ProbeSpec

    quiet_libraries()
    loaded = load_model("gemma3-270m", device="cpu")
    model_gib = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**30
    after_load = peak_rss_gib()
    engine = Engine(loaded)
    prompt = Prompt("story", "Write a long story about a dragon who learns to paint. Once upon a time,")
    t0 = time.perf_counter()
    result = engine.run(prompt, [ProbeSpec("logit_lens")], "all", ("kl", "js"), GenerationSpec(max_new_tokens=64))[0]
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    full = len(result.layers) * result.generation.n * 262144 * 4 / 2**30
    print(f"Gemma-3-270M logit_lens, {len(result.layers)} layers x {result.generation.n} tokens in {seconds:.1f} s")
    print(f"model parameters: {model_gib:.2f} GiB; peak RSS after load {after_load:.2f} GiB, after run {peak:.2f} GiB")
    print(f"peak - model = {peak - model_gib:.2f} GiB (target <= 1 GiB); an unchunked float32 "
          f"[layers x tokens x vocab] tensor alone would be {full:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--probes", default=",".join(PROBES))
    parser.add_argument("--gemma-memory", action="store_true")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="random-weight model of this size instead of SmolLM2")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.gemma_memory:
        gemma_memory()
        return

    import tempfile

    from klstore.core.engine import Engine
    from klstore.spec import Prompt
    from klstore.core.models import from_objects, load_model, pick_device_dtype, quiet_libraries
    from klstore.spec import read_prompts

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
    prompts = [Prompt(f"b{i}", demo[i % len(demo)].text, source=demo[(i + 1) % len(demo)].text)
               for i in range(args.prompts)]
    hidden = loaded.model.get_output_embeddings().weight.shape[1]
    steer_file = os.path.join(tempfile.mkdtemp(), "v.pt")
    torch.save(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), steer_file)
    print(f"{loaded.label}: {engine.n_layers} layers, {args.prompts} prompts x {args.n} tokens, "
          f"device {loaded.device}, {torch.get_num_threads()} threads")
    bench_probes(engine, prompts, args.n, args.probes.split(","), steer_file)


if __name__ == "__main__":
    main()
