"""The patch sweep on a long prompt: positions from the patched one on only (a clean prefix KV
cache) vs the whole sequence, in the same process (issue 13: at least 3x on 200 tokens).

    python benchmarks/patch.py [--repeat 3]

SmolLM2-135M on CPU, one ~230-token prompt (its source differs in one word), 30 layers x 5
generated tokens. Times `Engine.probe` alone (the sweep, unembedding and divergences) with and
without the prefix cache on the same trace, alternating, best of `--repeat`; prints both, the
ratio and the largest |difference| of the KL values. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from klstore.core import sweeps  # noqa: E402
from klstore.core.engine import Engine  # noqa: E402
from klstore.core.models import load_model  # noqa: E402
from klstore.spec import GenerationSpec, ProbeSpec, Prompt  # noqa: E402

TEXT = (
    "The history of the city goes back many centuries, and its people have seen wars, famines and long years of peace. "
) * 9 + "In the end, the capital of France is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    engine = Engine(load_model("smollm2-135m", device="cpu"))
    prompt = Prompt("long", TEXT, source=TEXT.replace("France", "Italy"))
    spec, probe = GenerationSpec(5), ProbeSpec("patch")
    ids = engine.encode(prompt, spec)
    trace = engine.trace(engine.generate(ids, spec))
    t0 = time.perf_counter()
    with torch.no_grad():
        cached = engine.probe_context(probe, prompt, trace.generation, spec)
        cached.prefix_cache = sweeps.prefix_cache(engine.runtime, trace.input_ids[0, : cached.patch_position].tolist())
    context_s = time.perf_counter() - t0
    whole = dataclasses.replace(cached, from_position=False)
    cached = dataclasses.replace(cached, from_position=True)
    layers = tuple(range(engine.n_layers))
    best, values = {"whole sequence": float("inf"), "from the patched position": float("inf")}, {}
    for _ in range(args.repeat):
        for name, context in (("whole sequence", whole), ("from the patched position", cached)):
            t0 = time.perf_counter()
            result = engine.probe(trace, probe, layers, ("kl",), prompt, context=context)
            best[name] = min(best[name], time.perf_counter() - t0)
            values[name] = result.values["kl"]
    print(
        f"patch sweep, {len(ids)}-token prompt, {engine.n_layers} layers x {trace.generation.n} tokens "
        f"(best of {args.repeat}, same process, {torch.get_num_threads()} threads):"
    )
    for name, seconds in best.items():
        print(f"  {name:26s} {seconds:7.2f} s")
    diff = float(np.abs(values["whole sequence"] - values["from the patched position"]).max())
    choice = sweeps.from_position(
        engine.runtime,
        sweeps.SweepRows(trace, probe, layers, dataclasses.replace(cached, from_position=None, prefix_cache=None)),
    )
    print(
        f"  the engine's own choice for this prompt (sweeps.from_position): "
        f"{'from the patched position' if choice else 'whole sequence'}"
    )
    print(
        f"  speed-up {best['whole sequence'] / best['from the patched position']:.1f}x (target >= 3x); "
        f"max |diff| {diff:.2g} nats; the context (source pass + prefix cache) took {context_s:.2f} s once"
    )


if __name__ == "__main__":
    main()
