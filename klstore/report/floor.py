"""The noise floor in a report: which floors a figure answers to, and which cells lie below it.

Every worker records the floor it measured in its shard attempt's row, `shards.noise_floor`
(nats; docs/store.md, "Noise floor"): the largest |divergence difference| between a prompt computed in
its batch and computed alone. A cell value, or a difference between models or groups, smaller
than that is not a measurement.

- `load` reads the floor of every (model, run) the report's selection reads from: the largest
  `shards.noise_floor` of that model's shards in that run, so that a model answers to its own
  workers' floors, not to another model's of the same run. A run none of whose shards recorded
  one (stores from before `shards.noise_floor`, or without their `shards` files) answers with
  its `runs.noise_floor` (the largest over all its models); null where neither is there (runs
  with no shard of two or more prompts, older stores).
- A figure's floor (`for_grid`) is the largest over the (model, run) pairs its rows come from:
  one model's runs for a per-model figure, every listed model's for one across models, both
  sides' for a difference (the larger floor of the two), the prompt's own run for a per-prompt
  map. None when none of those measured one: then nothing is marked.
- `below(values, floor)`: the cells to mark, |value| < floor (finite values only).
- `LENS_EVAL_FLOOR`: the fixed threshold the Lenses section compares lenses by (no run
  measures a floor for lens evaluations; see its comment).

Pure numpy and one SQL query; never imports matplotlib or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNIT = "nats"
NOT_MEASURED = "not measured"
# The threshold for lens evaluations (`lens_eval`, klstore.report.lenses), which have no measured
# floor: `shards.noise_floor` compares a prompt computed in its batch with the same prompt alone, a
# measurement of a kl run, not of a lens fit's held-out evaluation (a mean over the held-out tokens,
# the same tokens for every lens of the fit, summed in float64). Two lenses' held-out KL at a layer
# count as different only when they differ by at least this much; it is also the bottom of the
# lens figure's log axis (smaller values are drawn on it).
LENS_EVAL_FLOOR = 0.01  # nats


@dataclass(frozen=True)
class Floors:
    """(model, run_id) -> that model's noise floor in that run (None: not measured), for the
    pairs a report reads."""

    runs: dict

    def of(self, models, run_id: str | None = None) -> float | None:
        """The largest measured floor over these models' runs (only `run_id` when given); None
        when none of them measured one."""
        wanted = set(models)
        found = [
            floor
            for (model, run), floor in self.runs.items()
            if model in wanted and (run_id is None or run == run_id) and floor is not None
        ]
        return max(found) if found else None

    def per_model(self) -> dict:
        """model -> (its floor or None, runs that measured one, runs): the summary's numbers."""
        out = {}
        for model in sorted({m for m, _ in self.runs}):
            mine = [floor for (m, _), floor in self.runs.items() if m == model]
            measured = [f for f in mine if f is not None]
            out[model] = (max(measured) if measured else None, len(measured), len(mine))
        return out

    def key(self) -> list:
        """A JSON-able form, for the report's cache keys (a floor recorded later redraws)."""
        return sorted([m, r, f] for (m, r), f in self.runs.items())


def load(con, selection) -> Floors:
    """The floors of the (model, run) pairs with kl rows in `selection` (a report Filter): each
    pair's largest finite `shards.noise_floor`; `runs.noise_floor` for a run with no shard floor
    at all (of any model); None where neither is there (module docstring)."""
    rows = con.execute(
        f"""
        WITH pairs AS (SELECT DISTINCT model, run_id FROM kl WHERE {selection.sql}),
        measured AS (SELECT model, run_id, max(noise_floor) AS floor FROM shards
                     WHERE isfinite(noise_floor) GROUP BY ALL),
        measured_runs AS (SELECT DISTINCT run_id FROM measured),
        run_floors AS (SELECT run_id, max(noise_floor) AS floor FROM runs
                       WHERE isfinite(noise_floor) GROUP BY ALL)
        SELECT p.model, p.run_id, CASE WHEN mr.run_id IS NULL THEN r.floor ELSE m.floor END
        FROM pairs p LEFT JOIN measured m USING (model, run_id)
        LEFT JOIN measured_runs mr USING (run_id) LEFT JOIN run_floors r USING (run_id)""",
        selection.params,
    ).fetchall()
    return Floors({(str(m), str(r)): (None if f is None or not np.isfinite(f) else float(f)) for m, r, f in rows})


def for_grid(grid, floors: Floors) -> float | None:
    """The floor a figure answers to: the largest over the (model, run) pairs its rows come from."""
    models = [model for model, _ in grid.inputs]
    if not models and grid.labels.get("model"):
        models = [grid.labels["model"]]
    return floors.of(models, grid.labels.get("run_id") if grid.kind == "prompt" else None)


def below(values, floor: float | None) -> np.ndarray:
    """Cells whose |value| lies below the floor (finite values; none when there is no floor)."""
    v = np.asarray(values, dtype=np.float64)
    if floor is None:
        return np.zeros(v.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.isfinite(v) & (np.abs(v) < floor)


def text(floor: float | None) -> str:
    """'9.5e-07 nats' or 'not measured'."""
    return NOT_MEASURED if floor is None else f"{floor:.2g} {UNIT}"


WHAT = (
    "the largest |divergence difference| between a prompt computed in its batch and computed alone, over the runs shown"
)


def summary_line(floors: Floors) -> str:
    """The report summary's sentence on the floor of each model."""
    per_model = floors.per_model()
    if not any(floor is not None for floor, _, _ in per_model.values()):
        return (
            "Noise floor: not measured (the runs shown record none: written before klstore measured it, "
            "or with no shard of two or more prompts); no cell is marked."
        )
    parts = []
    for model, (floor, measured, runs) in per_model.items():
        part = f"{model} {text(floor)}"
        if floor is not None and measured < runs:
            part += f" (measured in {measured} of {runs} runs)"
        parts.append(part)
    return (
        f"Noise floor: {', '.join(parts)} ({WHAT}). Cells whose value, or whose difference between models "
        "or groups, lies below it are marked with a dot and not counted as differences."
    )
