"""GPU check (issue 12): one command for the first machine with a CUDA device.

    python benchmarks/gpu_check.py --device cuda                 # SmolLM2 + a random 1.5B Qwen2-shaped model
    python benchmarks/gpu_check.py --device cpu --big tiny       # the same figures on a CPU, small (tested)

It prints, in one run:
1. bf16 vs fp32 agreement of the KL matrices (logit_lens and skip, all layers) on SmolLM2
   and on a random-weight model (`--big`): max |difference| and its percentiles, in nats;
2. the logit-lens sweep's achieved FLOP/s (FLOPs counted by torch's FlopCounterMode) against
   a large bf16 (CUDA) or fp32 (CPU) matmul in the same process: the MFU;
3. peak memory (CUDA: max allocated; CPU: peak resident set) against the model's size;
4. throughput in cells per second at batch sizes 1, 4 and 16;
5. the batch noise floor in bf16 and fp32: max |KL(in a batch of 16) - KL(alone)| (what each
   run records in runs.noise_floor);
6. with two or more CUDA devices: SmolLM2 split over all of them (`device_map="balanced"`)
   against the whole model on one device, for logit_lens, skip and patch (max |difference|);
7. the opt-in speed modes on the float32 model (matmul_precision high = TF32 on NVIDIA GPUs,
   medium, clean_pass cached): speed-up over the default and max |difference| from it;
8. lens fits in one process: tuned-lens training tokens/s and Jacobian-lens prompts/s
   (docs/lenses.md; Ray Train adds workers, not speed per worker).
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from engine import matmul_gflops  # noqa: E402  (benchmarks/engine.py: the same yardstick)

BIG = {  # random-weight Qwen2-shaped models
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}
TEXTS = [
    "The capital of France is",
    "Once upon a time, there was",
    "2 + 2 =",
    "The opposite of hot is",
    "In 1492, Columbus",
    "Water boils at",
    "The largest planet is",
    "My favourite colour is",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompts(n: int):
    from klstore.spec import Prompt

    return [Prompt(f"g{i}", TEXTS[i % len(TEXTS)]) for i in range(n)]


def _engine(loaded):
    from klstore.core.engine import Engine

    return Engine(loaded)


def _smollm2(device: str, dtype: str):
    from klstore.core.models import load_model

    return load_model("smollm2-135m", device=device, dtype=dtype)


def _random_model(name: str, device: str, dtype: torch.dtype, tokenizer):
    import transformers

    from klstore.core.models import from_objects

    config = transformers.Qwen2Config(**BIG[name], max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return from_objects(name, model.to(device=device, dtype=dtype), tokenizer)


class _ClampedTokenizer:
    """SmolLM2's tokenizer with ids folded into a smaller random model's vocabulary."""

    def __init__(self, tokenizer, vocab: int):
        self.inner, self.vocab = tokenizer, vocab
        self.eos_token_id = tokenizer.eos_token_id % vocab
        self.chat_template = None
        self.pad_token_id = None

    def __call__(self, text):
        return {"input_ids": [i % self.vocab for i in self.inner(text)["input_ids"]]}

    def decode(self, ids):
        return self.inner.decode(ids)


def _matrices(engine, prompts, n_new, probes, batch_size=16):
    from klstore.spec import GenerationSpec, ProbeSpec

    specs = [ProbeSpec(p) for p in probes]
    results = engine.run_many(prompts, specs, "all", ("kl",), GenerationSpec(n_new), batch_size=batch_size)
    out = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        out.append(result)
    return out


def agreement(name: str, fp32_loaded, bf16_loaded, prompts, n_new) -> None:
    """bf16 vs fp32 KL on the same tokens: the fp32 run's generations are reused, so the cells match."""
    from klstore.spec import ProbeSpec

    fp32 = _matrices(_engine(fp32_loaded), prompts, n_new, ("logit_lens", "skip"))
    bf16_engine = _engine(bf16_loaded)
    diffs = []
    for matrices in fp32:
        trace = bf16_engine.trace(matrices[0].generation)  # teacher-forced on the fp32 continuation
        for m in matrices:
            other = bf16_engine.probe(trace, ProbeSpec(m.probe), m.layers, ("kl",), m.prompt)  # same cells
            diffs.append(np.abs(other.values["kl"] - m.values["kl"]).ravel())
    d = np.concatenate(diffs)
    p50, p90, p99 = np.percentile(d, [50, 90, 99])
    print(
        f"bf16 vs fp32 [{name}]: {d.size} cells, max |dKL| {d.max():.4g} nats; "
        f"p50 {p50:.3g}, p90 {p90:.3g}, p99 {p99:.3g}; {100 * (d > 0.01).mean():.1f}% of cells above 0.01"
    )


def mfu(loaded, prompts, n_new, matmul_n: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    engine = _engine(loaded)
    _matrices(engine, prompts[:1], n_new, ("logit_lens",))  # warm-up
    with FlopCounterMode(display=False) as counter:
        _matrices(engine, prompts, n_new, ("logit_lens",))
    flops = counter.get_total_flops()
    _sync(loaded.device)
    t0 = time.perf_counter()
    _matrices(engine, prompts, n_new, ("logit_lens",))
    _sync(loaded.device)
    seconds = time.perf_counter() - t0
    peak = matmul_gflops(loaded.device, loaded.dtype, n=matmul_n) * 1e9
    print(
        f"MFU [{loaded.label}, logit_lens, {str(loaded.dtype).replace('torch.', '')}]: "
        f"{flops / seconds / 1e9:.1f} GFLOP/s achieved vs {peak / 1e9:.1f} GFLOP/s plain matmul "
        f"({100 * flops / seconds / peak:.0f}%; {flops / 1e9:.2f} GFLOP in {seconds:.2f} s)"
    )


def memory(loaded, prompts, n_new) -> None:
    size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        _matrices(_engine(loaded), prompts, n_new, ("logit_lens", "skip"))
        peak, what = torch.cuda.max_memory_allocated(), "peak GPU memory allocated"
    else:
        _matrices(_engine(loaded), prompts, n_new, ("logit_lens", "skip"))
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory (process)"
    print(
        f"memory [{loaded.label}]: {what} {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB model "
        f"(model + {(peak - size) / 2**30:.2f} GiB)"
    )


def throughput(loaded, n_prompts, n_new) -> None:
    engine = _engine(loaded)
    prompts = _prompts(n_prompts)
    parts = []
    for batch in (1, 4, 16):
        _sync(loaded.device)
        t0 = time.perf_counter()
        results = _matrices(engine, prompts, n_new, ("logit_lens",), batch_size=batch)
        _sync(loaded.device)
        cells = sum(m.values["kl"].size for r in results for m in r)
        parts.append(f"batch {batch}: {cells / (time.perf_counter() - t0):.0f}")
    print(f"throughput [{loaded.label}, logit_lens, cells/s]: " + ", ".join(parts))


def lens_fit(loaded, seq_len: int = 64, jlens_len: int = 24, dim_batch: int = 64) -> None:
    """Tuned-lens training (the frozen model's forward, the loss over every layer, the backward
    into the translators) in tokens/s, and the Jacobian lens's estimator (one forward and
    ceil(d / dim_batch) backward passes of dim_batch rows) in prompts/s."""
    from klstore.core import fitting, jacobian, lenses
    from klstore.core.adapter import Adapter

    model = loaded.model.requires_grad_(False)
    adapter = Adapter.discover(model)
    vocab, d_model = model.get_output_embeddings().weight.shape
    ids = torch.randint(1, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    translators = fitting.Translators(lenses.identity_lens("tuned", adapter.n_layers, d_model)).to(loaded.device)

    def step():
        outputs, final_logp = fitting.block_states(model, adapter, ids)
        translators(adapter, outputs, final_logp).backward()

    step()  # warm-up
    _sync(loaded.device)
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    _sync(loaded.device)
    tokens_per_s = 2 * seq_len / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    jacobian.prompt_jacobian(model, adapter, ids[:, :jlens_len], skip=16, dim_batch=dim_batch)
    _sync(loaded.device)
    prompts_per_s = 1 / (time.perf_counter() - t0)
    print(
        f"lens fit [{loaded.label}]: tuned-lens training {tokens_per_s:.0f} tokens/s (sequences of {seq_len}), "
        f"Jacobian lens {prompts_per_s:.3g} prompts/s ({jlens_len} tokens, dim_batch {dim_batch})"
    )


def noise_floor(loaded, prompts, n_new) -> None:
    """max |KL batched - KL alone| over every cell of the first prompt (runs.noise_floor's rule)."""
    from klstore.run.worker import max_gap

    engine = _engine(loaded)
    batched = _matrices(engine, prompts, n_new, ("logit_lens", "skip"), batch_size=16)[0]
    alone = _matrices(engine, prompts[:1], n_new, ("logit_lens", "skip"), batch_size=1)[0]
    worst = max_gap(batched, alone)
    print(
        f"noise floor [{loaded.label}, {str(loaded.dtype).replace('torch.', '')}]: max |KL(batch of 16) - "
        f"KL(alone)| = {worst:.3g} nats"
    )


def speed_modes(loaded, prompts, n_new, repeat: int = 2) -> None:
    """The opt-in speed modes against the default on a float32 model: best-of-`repeat` time
    ratio and max |dKL|, per probe (what a run with the mode records in its noise floor)."""
    from klstore.spec import GenerationSpec, ProbeSpec

    engine = _engine(loaded)
    modes = {
        "matmul_precision high": dict(matmul_precision="high"),
        "matmul_precision medium": dict(matmul_precision="medium"),
        "clean_pass cached": dict(clean_pass="cached"),
    }
    for probe in ("logit_lens", "skip"):

        def run(probe=probe, **options):
            best, out = float("inf"), None
            for _ in range(repeat):
                _sync(loaded.device)
                t0 = time.perf_counter()
                out = engine.run_many(prompts, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(n_new), **options)
                _sync(loaded.device)
                best = min(best, time.perf_counter() - t0)
            return best, [r[0].values["kl"] for r in out]

        base_s, base = run()
        parts = []
        for mode, options in modes.items():
            seconds, values = run(**options)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(values, base))
            parts.append(f"{mode} {base_s / seconds:.2f}x, max |dKL| {diff:.2g}")
        print(f"speed modes [{loaded.label}, {probe}, float32, default {base_s:.2f} s]: " + "; ".join(parts))


def split_check(n_new: int) -> None:
    """The model split over every visible CUDA device against the whole model on one."""
    from klstore.core.models import load_model
    from klstore.spec import GenerationSpec, ProbeSpec, Prompt

    if torch.cuda.device_count() < 2:
        print(f"split over devices: skipped ({torch.cuda.device_count()} CUDA device(s); needs 2 or more)")
        return
    whole = _engine(load_model("smollm2-135m", device="cuda:0", dtype="float32"))
    split = _engine(load_model("smollm2-135m", device="cuda", dtype="float32", device_map="balanced"))
    prompt = Prompt("s", TEXTS[0], source=TEXTS[1])
    placed = sorted({str(d) for d in split.model.hf_device_map.values()})
    for probe in ("logit_lens", "skip", "patch"):
        a = whole.run(prompt, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(n_new))[0]
        b = split.run(prompt, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(n_new))[0]
        diff = float(np.abs(a.values["kl"] - b.values["kl"]).max())
        print(
            f"split over devices {'+'.join(placed)} [{probe}]: max |dKL| vs one device {diff:.3g} nats "
            f"(same tokens: {a.generation.token_ids == b.generation.token_ids})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--big", choices=[*BIG, "none"], default="qwen2-1.5b")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=5)
    args = parser.parse_args()

    from klstore.core.models import quiet_libraries

    quiet_libraries()
    device = torch.device(args.device)
    prompts = _prompts(args.prompts)
    print(
        f"klstore GPU check on {device} (torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
        + ")"
    )
    smol32, smol16 = _smollm2(args.device, "float32"), _smollm2(args.device, "bfloat16")
    agreement("smollm2-135m", smol32, smol16, prompts, args.tokens)
    fast = smol16 if device.type == "cuda" else smol32
    mfu(fast, prompts, args.tokens, matmul_n=8192 if device.type == "cuda" else 1024)
    memory(fast, prompts, args.tokens)
    throughput(fast, args.prompts, args.tokens)
    noise_floor(smol32, prompts, args.tokens)
    if device.type == "cuda":
        noise_floor(smol16, prompts, args.tokens)
    speed_modes(smol32, prompts, args.tokens)
    if device.type == "cuda":  # on a CPU, SmolLM2's J-lens prompt alone takes minutes: the small model's line
        lens_fit(fast)
    split_check(args.tokens)
    if args.big != "none":
        tokenizer = _ClampedTokenizer(smol32.tokenizer, BIG[args.big]["vocab_size"])
        big32 = _random_model(args.big, args.device, torch.float32, tokenizer)
        big16 = _random_model(args.big, args.device, torch.bfloat16, tokenizer)
        agreement(args.big, big32, big16, prompts, args.tokens)
        del big32
        chosen = big16 if device.type == "cuda" else _random_model(args.big, args.device, torch.float32, tokenizer)
        mfu(chosen, prompts, args.tokens, matmul_n=8192 if device.type == "cuda" else 1024)
        memory(chosen, prompts, args.tokens)
        throughput(chosen, args.prompts, args.tokens)
        lens_fit(chosen)


if __name__ == "__main__":
    main()
