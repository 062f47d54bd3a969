"""`make demo`: the built-in end-to-end run on the offline demo models.

Computes logit_lens and skip KL matrices for the first prompts of each group in
jobs/prompts/demo.jsonl on SmolLM2-135M and Gemma-3-270M, prints them, and
writes one heatmap PNG per model, prompt and probe under ./klstore-data/demo/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from klstore.errors import KlstoreError

REPO = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO / "jobs" / "prompts" / "demo.jsonl"
DEMO_MODELS = ("smollm2-135m", "gemma3-270m")


def run(out_dir: Path = Path("klstore-data/demo"), per_group: int = 2) -> list[Path]:
    from klstore import plotting
    from klstore.cli import _quiet_libraries, format_table
    from klstore.engine import Engine, GenerationSpec
    from klstore.models import load
    from klstore.probes import ProbeSpec
    from klstore.prompts import load_prompts

    _quiet_libraries()
    prompts, taken = [], {}
    for prompt in load_prompts(DEMO_PROMPTS):
        if taken.get(prompt.group, 0) < per_group:
            taken[prompt.group] = taken.get(prompt.group, 0) + 1
            prompts.append(prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DEMO_MODELS:
        print(f"== loading {name}", flush=True)
        engine = Engine(load(name))
        for prompt in prompts:
            results = engine.run(prompt, [ProbeSpec("logit_lens"), ProbeSpec("skip")], "all",
                                 ("kl",), GenerationSpec(max_new_tokens=5))
            for matrix in results:
                print(format_table(matrix), flush=True)
                path = out_dir / f"{name}-{prompt.id}-{matrix.probe}.png"
                plotting.save(plotting.HeatmapData(
                    values=matrix.values["kl"], layers=matrix.layers,
                    columns=plotting.column_labels(matrix.generation.n, matrix.generation.token_texts),
                    title=f"{name} | {matrix.probe} | {prompt.id}"), path)
                written.append(path)
    print(f"wrote {len(written)} heatmaps under {out_dir}/")
    return written


def main() -> int:
    try:
        run()
    except KlstoreError as exc:
        print(f"klstore: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
