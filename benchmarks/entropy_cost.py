"""What storing the entropy of Q (kl rows' `q_entropy`, issue 25) costs a logit-lens sweep.

    python benchmarks/entropy_cost.py                       # SmolLM2-135M, 16 prompts x 8 tokens
    python benchmarks/entropy_cost.py --model gemma3-270m   # a 262k vocabulary: the head pass dominates

The same engine runs the same logit-lens sweep (all layers, forward KL, top-5 lens tokens: the
fused head pass of core/unembed.py) with H(Q) on, as klstore always runs it, and off
(`unembed.run(entropy=False)`, patched in for this benchmark only), alternating, `--repeat`
times each. It prints the best and the median wall time of each and the ratio of the bests (the
runs least disturbed by other work on a shared machine); the target is at most 5%
extra. The row-chunked path (kl_reverse, js) gets H(Q) from the log Q it builds anyway.

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("-n", type=int, default=8, help="generated tokens per prompt")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import torch

    from klstore.config import read_prompts
    from klstore.core import unembed
    from klstore.core.engine import Engine
    from klstore.core.models import load_model, quiet_libraries
    from klstore.spec import ComputeSpec, GenerationSpec, Prompt

    quiet_libraries()
    loaded = load_model(args.model, device="cpu")
    engine = Engine(loaded)
    demo = read_prompts(os.path.join(os.path.dirname(__file__), "..", "jobs", "prompts", "demo.jsonl"))
    prompts = [Prompt(f"b{i}", demo[i % len(demo)].text) for i in range(args.prompts)]
    compute = ComputeSpec(probes=["logit_lens"], generation=GenerationSpec(max_new_tokens=args.n))
    with_entropy = unembed.run
    without = functools.partial(unembed.run, entropy=False)
    print(
        f"{loaded.label}: {engine.n_layers} layers, {args.prompts} prompts x {args.n} tokens, logit lens, "
        f"{torch.get_num_threads()} threads"
    )
    engine.compute(prompts[:2], compute)  # warm-up
    times: dict[str, list[float]] = {"with H(Q)": [], "without": []}
    for _ in range(args.repeat):
        for label, run in (("with H(Q)", with_entropy), ("without", without)):
            unembed.run = run  # type: ignore[assignment]
            try:
                start = time.perf_counter()
                results = engine.compute(prompts, compute)
                times[label].append(time.perf_counter() - start)
            finally:
                unembed.run = with_entropy  # type: ignore[assignment]
            bad = [r for r in results if isinstance(r, Exception)]
            if bad:
                raise SystemExit(f"a prompt failed: {bad[0]}")
    on, off = min(times["with H(Q)"]), min(times["without"])
    cells = sum(len(r[0].layers) * r[0].generation.n for r in results)
    print(f"{'':10} {'best s':>8} {'median s':>9} {'cells/s':>9}   (runs: s)")
    for label, values in times.items():
        best, median = min(values), statistics.median(values)
        print(f"{label:10} {best:8.3f} {median:9.3f} {cells / best:9.0f}   ({', '.join(f'{v:.3f}' for v in values)})")
    # the best of each: the runs least disturbed by other work on the machine
    print(f"extra time for H(Q), best against best: {100 * (on / off - 1):+.1f}% (target: at most +5%)")


if __name__ == "__main__":
    main()
