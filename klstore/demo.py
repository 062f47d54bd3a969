"""`make demo`: the whole pipeline on the built-in default.

A local Ray (or the cluster named by RAY_ADDRESS) runs jobs/demo.yaml: both
offline demo models, 24 prompts in 3 groups, probes logit_lens, skip and noise,
all layers, 5 generated tokens, into ./klstore-data; then a summary query, and
the default report (reports/default.yaml), whose index.html path it prints last.
"""

from __future__ import annotations

import sys
from pathlib import Path

from klstore.errors import KlstoreError

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "jobs" / "demo.yaml"
DEMO_REPORT = REPO / "reports" / "default.yaml"


def main() -> int:
    from klstore.cli import cmd_runs_summary
    from klstore.config import load_config, load_report_spec
    from klstore.report import site
    from klstore.run import runner
    from klstore.store import open_store

    try:
        cfg = load_config(DEMO_CONFIG)
        summary = runner.run(cfg, progress_every=15)
        print(cmd_runs_summary(summary["store"], summary["run_id"]))
        built = site.build(
            open_store(summary["store"]),
            load_report_spec(DEMO_REPORT),
            log=lambda message: print(message, file=sys.stderr),
        )
        print(f"report: {built['index']}")
    except KlstoreError as exc:
        print(f"klstore: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
