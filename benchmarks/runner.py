"""Runner overhead and scaling (issue 6). Prints numbers; asserts nothing.

    python benchmarks/runner.py [--prompts 32]

1. The 32-prompt SmolLM2 sweep (logit_lens + skip, all layers, 5 tokens, kl)
   computed and stored in this process by a Worker (model loading excluded),
   vs. the same sweep through the Ray runner with one actor (timed from the
   moment the actor has loaded its model). Target: runner at most 10% slower.
2. The same sweep with 2 actors vs 1 (scaling on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=8)
    args = parser.parse_args()

    from klstore.config import parse_experiment, read_prompts
    from klstore.core.models import quiet_libraries
    from klstore.run import runner
    from klstore.run.worker import Worker
    from klstore.spec import ComputeSpec

    quiet_libraries()
    root = tempfile.mkdtemp(prefix="klbench-")
    demo = read_prompts(os.path.join(os.path.dirname(__file__), "..", "jobs", "prompts", "demo.jsonl"))
    prompts_path = os.path.join(root, "prompts.jsonl")
    with open(prompts_path, "w") as handle:
        for i in range(args.prompts):
            p = demo[i % len(demo)]
            handle.write(json.dumps({"id": f"b{i:03d}", "text": p.text, "group": p.group}) + "\n")

    def cfg(store, actors):
        return parse_experiment(
            {
                "name": "bench",
                "store": store,
                "models": [{"name": "smollm2-135m", "actors": actors}],
                "prompts": [prompts_path],
                "probes": ["logit_lens", "skip"],
                "layers": "all",
                "generation": {"max_new_tokens": 5},
                "divergences": ["kl"],
                "shard_size": args.shard_size,
            }
        )

    base = cfg(os.path.join(root, "inproc"), 1)
    worker = Worker("smollm2-135m", "smollm2-135m", base.store, device="cpu")
    job = ComputeSpec(base.probes, base.layers, base.divergences, base.generation)
    shards = [base.prompts[i : i + args.shard_size] for i in range(0, len(base.prompts), args.shard_size)]
    worker.run_shard("warmup", shards[0][:1], job)
    t0 = time.perf_counter()
    cells = sum(worker.run_shard("bench", shard, job).cells for shard in shards)
    inproc = time.perf_counter() - t0
    del worker
    print(f"in process (Worker):   {inproc:6.1f} s  {cells / inproc:7.0f} cells/s")

    results = {}
    for actors in (1, 2):
        summary = runner.run(cfg(os.path.join(root, f"ray{actors}"), actors), progress_every=60, num_cpus=2)
        seconds = summary["seconds_after_first_actor_ready"]
        results[actors] = seconds
        print(
            f"Ray runner, {actors} actor(s): {seconds:6.1f} s  {cells / seconds:7.0f} cells/s "
            f"(after the first actor loaded its model; total {summary['seconds']:.1f} s)"
        )
    print(f"runner overhead (1 actor vs in process): {100 * (results[1] / inproc - 1):+.1f}% (target <= +10%)")
    print(f"scaling 1 -> 2 actors on this machine: {results[1] / results[2]:.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
