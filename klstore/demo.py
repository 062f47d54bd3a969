"""`make demo`: the whole pipeline on the built-in default.

A local Ray (or the cluster named by RAY_ADDRESS) runs jobs/demo.yaml: both
offline demo models, 24 prompts in 3 groups, probes logit_lens, skip and noise, all
layers, 5 generated tokens, into ./klstore-data; then a summary query, and
per-model, per-probe mean heatmaps under ./klstore-data/demo/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from klstore.errors import KlstoreError

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "jobs" / "demo.yaml"


def mean_heatmaps(store_uri: str, run_id: str, out_dir: Path) -> list[Path]:
    """One mean-KL heatmap per model and probe of the run, straight from the store."""
    import numpy as np

    from klstore import plotting, query

    out_dir.mkdir(parents=True, exist_ok=True)
    _, rows = query.sql(store_uri, f"""
        SELECT model, probe, layer, gen_idx, avg(kl) AS mean_kl, count(kl) AS n
        FROM kl WHERE run_id = '{run_id}' GROUP BY ALL ORDER BY model, probe, layer, gen_idx""")
    written = []
    grids: dict[tuple[str, str], list] = {}
    for model, probe, layer, gen_idx, mean_kl, n in rows:
        grids.setdefault((model, probe), []).append((layer, gen_idx, mean_kl, n))
    for (model, probe), cells in grids.items():
        layers = sorted({c[0] for c in cells})
        n_cols = max(c[1] for c in cells) + 1
        values = np.full((len(layers), n_cols), np.nan)
        counts = np.zeros((len(layers), n_cols), dtype=int)
        for layer, gen_idx, mean_kl, n in cells:
            values[layers.index(layer), gen_idx] = mean_kl
            counts[layers.index(layer), gen_idx] = n
        path = out_dir / f"{model}-{probe}-mean.png"
        plotting.save(plotting.HeatmapData(
            values=values, layers=tuple(layers), columns=plotting.column_labels(n_cols),
            title=f"{model} | {probe} | all prompts (n={int(counts.max())})", counts=counts), path)
        written.append(path)
    return written


def main() -> int:
    from klstore import config as config_module
    from klstore import runner
    from klstore.cli import cmd_runs_summary

    try:
        cfg = config_module.load(DEMO_CONFIG)
        summary = runner.run(cfg, progress_every=15)
        print(cmd_runs_summary(summary["store"], summary["run_id"]))
        for path in mean_heatmaps(summary["store"], summary["run_id"], Path(summary["store"]) / "demo"):
            print(f"wrote {path}")
    except KlstoreError as exc:
        print(f"klstore: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
