"""Numbers -> sentences: what an analyst would say about a figure, and nothing it cannot back.

Reads only a klstore.report.figure.Figure: its grid's arrays, labels and settling summary, its
colour scale and its noise floor; returns the sentences (the site puts them into a new Figure,
`Figure.with_observations`). Units are nats. The rules
(also in docs/reports.md, "Observations"):

- a generated token **stands out** only when its column mean is at least `STANDOUT`
  (1.25) times the runner-up's: a lead within 25% is not a standout;
- the tokens are **alike** only when the largest column mean is at most `ALIKE`
  (1.25) times the smallest; between the two rules the sentence gives the range and
  its ratio, and claims nothing;
- a grid is **flat** when its spread is under 5% of its mean;
- the divergence **falls/rises with depth** when the first and last thirds of the
  listed layers differ by at least 2x;
- every figure names its **settling depth** (the `settling` view: the shallowest layer
  from which the top-1 token of Q stays the generated token through the last layer);
- where a **noise floor** was measured (klstore.report.floor: each model's own), every
  figure names it with its number and how many cells lie below it, and nothing smaller than
  it is called a difference: not a standout's lead, a trend, an outlier, nor a model's or
  group's cell being higher or lower than the other's (such cells are counted as within the
  floor);
- on a **comparison map with bootstrap intervals** (klstore.report.intervals) a cell is a
  difference only when its interval excludes 0 and its size clears the noise floor: only such
  cells are counted as higher or lower, every cell a sentence names comes with its interval,
  and the largest gap, when it is not a difference, is said to be none and why;
- each **fitted lens** of a model (klstore.report.lenses) gets one sentence comparing its
  held-out KL with the logit lens's on the same held-out tokens, layer by layer: the layers
  where it is lower, and those where it is higher, by at least `LENS_EVAL_FLOOR` (0.01 nats:
  lens evaluations have no measured noise floor, klstore.report.floor), with the mean KL of
  both lenses over those layers.
"""

from __future__ import annotations

import numpy as np

from klstore.report.aggregate import nan_mean
from klstore.report.figure import Figure
from klstore.report.floor import LENS_EVAL_FLOOR, UNIT
from klstore.report.floor import text as floor_text
from klstore.report.grid import Grid
from klstore.report.intervals import MIN_PROMPTS, Interval, differences, percent
from klstore.report.lenses import LensFigure

STANDOUT = 1.25  # leader / runner-up, at least
ALIKE = 1.25  # largest / smallest column mean, at most
FLAT = 0.05  # spread / mean, under
TREND = 2.0  # first third / last third (or back), at least


def _cell(grid: Grid, r: int | np.integer, c: int | np.integer) -> str:
    return f"layer {grid.layers[r]}, Gen{c}" if grid.ylabel == "Layer" else f"depth {grid.layers[r]}, Gen{c}"


def _ratio(big: float, small: float) -> float:
    """big / small for non-negative means; infinite when only `small` is (about) zero."""
    if small > 0:
        return big / small
    return float("inf") if big > 0 else 1.0


def columns_sentence(col_means, floor: float | None = None) -> str | None:
    """The generated tokens compared by their column means, under the STANDOUT and ALIKE rules;
    a lead or spread smaller than the noise floor `floor` (nats) is no difference."""
    means = np.asarray(col_means, dtype=np.float64)
    shown = [(i, m) for i, m in enumerate(means) if np.isfinite(m)]
    if len(shown) < 2:
        return None
    ranked = sorted(shown, key=lambda item: -item[1])
    (best, top), (second, runner) = ranked[0], ranked[1]
    (low, bottom) = ranked[-1]
    lead = _ratio(top, runner)
    if floor is not None and top - bottom < floor:
        return (
            f"The generated tokens' column means ({bottom:.3g} to {top:.3g} {UNIT}) differ by less than "
            f"the noise floor of {floor_text(floor)}: no token differs from another here."
        )
    if lead >= STANDOUT and floor is not None and top - runner < floor:
        return (
            f"Column means range from {bottom:.3g} {UNIT} (Gen{low}) to {top:.3g} (Gen{best}); Gen{best} "
            f"leads Gen{second} by {top - runner:.3g} {UNIT}, under the noise floor of {floor_text(floor)}: "
            "not a standout."
        )
    if lead >= STANDOUT:
        times = "" if not np.isfinite(lead) else f", {lead:.2f}x the runner-up Gen{second} ({runner:.3g})"
        return f"Gen{best} stands out: its mean {top:.3g} {UNIT} is the highest{times}."
    spread = _ratio(top, bottom)
    if spread <= ALIKE:
        return (
            f"The generated tokens are alike: column means range from {bottom:.3g} to {top:.3g} {UNIT} ({spread:.2f}x)."
        )
    return (
        f"Column means range from {bottom:.3g} {UNIT} (Gen{low}) to {top:.3g} (Gen{best}), {spread:.2f}x; "
        f"Gen{best} leads Gen{second} by {lead:.2f}x, under the {STANDOUT:.2f}x a standout needs."
    )


def settling_sentences(grid: Grid) -> list[str]:
    """The figure's settling depth, from `grid.settling` (klstore.report.settling.attach, or the
    prompt's own: klstore.report.prompts)."""
    info = grid.settling
    if not info:
        return []
    if grid.kind == "prompt":
        return [_prompt_settling(info)]
    if grid.kind == "difference":
        sides = [f"{grid.labels[side]}: {_summary_text(info[side])}" for side in ("a", "b") if info.get(side)]
        return ["Top-1 settling depth: " + "; ".join(sides) + "."] if sides else []
    return [f"Top-1 settling depth: {_summary_text(info)}."]


def _summary_text(info: dict) -> str:
    """'median layer 14 of 30 (depth fraction 0.50) over 120 tokens; 8 never settle'."""
    n, settled = info["n_tokens"], info["n_settled"]
    if not settled:
        return f"none of {n} tokens settles (the last layer's top-1 is never the generated token)"
    where = (
        f"median layer {info['median_layer']:g} of {info['n_layers']} (depth fraction {info['median_fraction']:.2f})"
        if info.get("n_layers")
        else f"median depth fraction {info['median_fraction']:.2f}"
    )
    never = f"; {n - settled} never settle" if settled < n else ""
    return f"{where} over {n} token{'s' if n != 1 else ''}{never}"


def _prompt_settling(info: dict) -> str:
    """'Top-1 settles at layer 12 for Gen0, never for Gen2 (of 30 layers).'"""
    parts = [f"{'never' if layer is None else f'layer {layer}'} for Gen{i}" for i, layer in enumerate(info["layers"])]
    return f"Top-1 settling depth: {', '.join(parts)} (of {info['n_layers']} layers)."


def floor_sentence(figure: Figure) -> str | None:
    """'Noise floor 9.5e-07 nats: 3 of 16 cells below it (marked with a dot).', or None when not measured."""
    grid = figure.grid
    if figure.noise_floor is None:
        return None
    finite = np.isfinite(grid.values)
    n = int((np.asarray(figure.below_floor, dtype=bool) & finite).sum()) if figure.below_floor is not None else 0
    total = int(finite.sum())
    if grid.kind == "difference":
        return (
            f"Noise floor {floor_text(figure.noise_floor)} (the larger of the two sides'): {n} of {total} "
            f"differences below it{' (marked with a dot; not differences)' if n else ''}."
        )
    marked = " (marked with a dot)" if n else ""
    return f"Noise floor {floor_text(figure.noise_floor)}: {n} of {total} cells below it{marked}."


def observe(figure: Figure) -> list[str]:
    """What an analyst would say about the figure's grid, from its numbers, its colour scale and
    its noise floor."""
    grid, floor = figure.grid, figure.noise_floor
    v = grid.values
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return ["No finite values in this grid."] + settling_sentences(grid)
    out = _difference(grid, floor, v, finite) if grid.kind == "difference" else _levels(grid, floor, v, finite)
    note = figure.scale.note() if figure.scale is not None else None
    if note:
        out.append(note)
    said = floor_sentence(figure)
    if said:
        out.append(said)
    return out + settling_sentences(grid)


def _difference(grid: Grid, floor: float | None, v, finite) -> list[str]:
    if grid.interval is not None:
        return _interval_difference(grid, grid.interval, floor, v, finite)
    mean, lo, hi = float(finite.mean()), float(finite.min()), float(finite.max())
    a, b = grid.labels["a"], grid.labels["b"]
    r, c = np.unravel_index(np.nanargmax(np.abs(np.where(np.isfinite(v), v, 0))), v.shape)
    if floor is None:
        higher = int((finite > 0).sum())
        out = [
            f"{a} is higher than {b} in {higher} of {finite.size} cells; the mean difference is {mean:+.3g} {UNIT}.",
            f"The largest gap is at {_cell(grid, r, c)}: {v[r, c]:+.3g} {UNIT}.",
        ]
    else:  # a difference smaller than the floor is no difference
        higher, lower = int((finite >= floor).sum()), int((finite <= -floor).sum())
        within = finite.size - higher - lower
        if abs(v[r, c]) < floor:
            return [
                f"{a} and {b} differ by less than the noise floor of {floor_text(floor)} in every cell "
                f"(the largest |difference| is {abs(v[r, c]):.3g} {UNIT}, at {_cell(grid, r, c)}): "
                "the two are the same here, as far as this run can measure."
            ]
        mean_text = (
            f"the mean difference is {mean:+.3g} {UNIT}"
            if abs(mean) >= floor
            else f"the mean difference, {mean:+.3g} {UNIT}, is within the noise floor"
        )
        out = [
            f"{a} is higher than {b} in {higher} of {finite.size} cells and lower in {lower}; "
            f"{within} differ by less than the noise floor of {floor_text(floor)}; {mean_text}.",
            f"The largest gap is at {_cell(grid, r, c)}: {v[r, c]:+.3g} {UNIT}.",
        ]
    if hi - lo <= FLAT * max(abs(mean), 1e-12) or max(abs(lo), abs(hi)) < 1e-3:
        out.append("The difference is flat: the two are practically the same here.")
    return out


def _interval_difference(grid: Grid, ci: Interval, floor: float | None, v, finite) -> list[str]:
    """A difference map with bootstrap intervals: only cells whose interval excludes 0 and whose
    |difference| clears the noise floor are differences (intervals.differences); every cell
    named gets its interval, and one whose interval includes 0 is said not to be a difference."""
    a, b = grid.labels["a"], grid.labels["b"]
    level = percent(ci.level)
    real = differences(v, ci, floor)
    has = np.isfinite(v)
    missing = has & ~(np.isfinite(ci.low) & np.isfinite(ci.high))  # too few prompts for an interval
    unsure = has & ~missing & ~ci.excludes_zero()  # the interval includes 0
    small = has & ci.excludes_zero() & ~real  # the interval excludes 0, but under the floor
    higher, lower = int((real & (v > 0)).sum()), int((real & (v < 0)).sum())
    floor_part = "" if floor is None else f" and its size clears the noise floor of {floor_text(floor)}"
    what = f"(a cell counts when its {level} interval excludes 0{floor_part})"
    r, c = np.unravel_index(np.argmax(np.where(has, np.abs(np.where(has, v, 0)), -1)), v.shape)
    if not real.any():
        out = [
            f"No cell shows a difference between {a} and {b} {what}: {_reasons(unsure, missing, small, level)}. "
            f"The largest |difference| is {abs(v[r, c]):.3g} {UNIT}, at {_cell(grid, r, c)} ({ci.cell(r, c)})."
        ]
    else:
        out = [
            f"{a} is higher than {b} in {higher} of {finite.size} cells and lower in {lower} {what}; "
            f"{_reasons(unsure, missing, small, level)}: not differences.",
        ]
        rr, cc = np.unravel_index(np.argmax(np.where(real, np.abs(np.where(has, v, 0)), -1)), v.shape)
        out.append(f"The largest difference is at {_cell(grid, rr, cc)}: {v[rr, cc]:+.3g} {UNIT} ({ci.cell(rr, cc)}).")
        if not real[r, c]:
            why = (
                "its interval includes 0"
                if unsure[r, c]
                else "it has no interval"
                if missing[r, c]
                else f"it lies below the noise floor of {floor_text(floor)}"
            )
            out.append(
                f"The largest gap, {v[r, c]:+.3g} {UNIT} at {_cell(grid, r, c)} ({ci.cell(r, c)}), is not a "
                f"difference: {why}."
            )
    out.append(
        f"Intervals: {ci.method()}; cells marked with a dot are not differences. "
        f"The mean difference over the {finite.size} cells is {float(finite.mean()):+.3g} {UNIT}."
    )
    return out


def _reasons(unsure, missing, small, level: str) -> str:
    """'4 cells have a 95% interval that includes 0, 1 has none (fewer than 2 prompts with a
    value on a side) and 1 lies below the noise floor'."""
    n_unsure, n_missing, n_small = int(unsure.sum()), int(missing.sum()), int(small.sum())
    parts = [f"{n_unsure} cell{'s have' if n_unsure != 1 else ' has'} a {level} interval that includes 0"]
    if n_missing:
        parts.append(
            f"{n_missing} {'have' if n_missing != 1 else 'has'} none "
            f"(fewer than {MIN_PROMPTS} prompts with a value on a side)"
        )
    if n_small:
        parts.append(f"{n_small} {'lie' if n_small != 1 else 'lies'} below the noise floor")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _levels(grid: Grid, floor: float | None, v, finite) -> list[str]:
    mean, std, lo, hi = float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max())
    spread = hi - lo
    if floor is not None and np.abs(finite).max() < floor:
        return [
            f"Every cell is below the noise floor of {floor_text(floor)} (the largest is {np.abs(finite).max():.3g} "
            f"{UNIT}): no value here is distinguishable from 0."
        ]
    if spread <= FLAT * max(abs(mean), 1e-12) or spread < 1e-6 or (floor is not None and spread < floor):
        within = "" if floor is None or spread >= floor else f", under the noise floor of {floor_text(floor)}"
        return [
            f"The grid is flat: every cell is within {spread:.3g} {UNIT} of the others{within} "
            f"(mean {mean:.3g} {UNIT})."
        ]
    masked = np.where(np.isfinite(v), v, np.nan)
    r, c = np.unravel_index(np.nanargmax(np.where(np.isfinite(v), v, -np.inf)), v.shape)
    out = [
        f"{grid.divergence} peaks at {_cell(grid, r, c)} with {v[r, c]:.3g} {UNIT}, "
        f"{v[r, c] / mean:.1f}x the grid mean of {mean:.3g} {UNIT}."
    ]
    if v.shape[1] > 1:
        sentence = columns_sentence(nan_mean(masked, axis=0), floor)  # a row without values: NaN,
        out += [sentence] if sentence else []  # never averaged in
    out += _rows(grid, floor, nan_mean(masked, axis=1))
    beyond = 0.0 if floor is None else floor  # an outlier stands more than the floor above the mean
    high = np.isfinite(v) & (v > mean + 2 * std) & (v - mean >= beyond)
    outliers = np.argwhere(high) if std > 0 else np.empty((0, 2), int)  # (row, column) pairs
    if len(outliers):
        listed = "; ".join(f"{_cell(grid, r, c)} ({v[r, c]:.3g})" for r, c in outliers[:5])
        more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
        out.append(
            f"{len(outliers)} cell{'s are' if len(outliers) > 1 else ' is'} more than two standard "
            f"deviations above the mean: {listed}{more}."
        )
    if grid.kind == "aggregate" and grid.counts.size and grid.counts.max() > grid.counts.min():
        full = int(grid.counts.max())
        short = sorted({int(c) for c in np.where(grid.counts.min(axis=0) < full)[0]})
        parts = ", ".join(f"Gen{c} by {int(grid.counts[:, c].min())}" for c in short[:5])
        out.append(f"Not every prompt reached every token (early end of sequence): of {full}, {parts}.")
    return out


def _rows(grid: Grid, floor: float | None, row_means) -> list[str]:
    """The layers with the highest means, and a trend with depth where the thirds differ by TREND."""
    if len(row_means) <= 2:
        return []
    top = np.argsort(-np.nan_to_num(row_means, nan=-np.inf))[:3]
    names = ", ".join(f"{grid.layers[i]} ({row_means[i]:.3g})" for i in top)
    noun = "Layers" if grid.ylabel == "Layer" else "Depths"
    out = [f"{noun} with the highest mean {grid.divergence}: {names}."]
    third = max(1, len(row_means) // 3)
    early, late = float(nan_mean(row_means[:third], axis=0)), float(nan_mean(row_means[-third:], axis=0))
    if (
        early > 0
        and late > 0
        and max(early, late) / min(early, late) >= TREND
        and (floor is None or abs(early - late) >= floor)
    ):
        trend = "falls" if early > late else "rises"
        out.append(
            f"{grid.divergence} {trend} with depth: {early:.3g} {UNIT} on average in the first third "
            f"of the listed layers, {late:.3g} in the last third."
        )
    return out


# ------------------------------------------------------------------ lenses
def layer_ranges(layers) -> str:
    """'layer 3', 'layers 0-14, 16 and 20-22' (sorted, runs of consecutive layers joined)."""
    layers = sorted(int(layer) for layer in layers)
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"layer{'s' if len(layers) > 1 else ''} {text}"


def lens_sentences(figure: LensFigure) -> list[str]:
    """One sentence per fitted lens: where its held-out KL differs from the logit lens's by at
    least LENS_EVAL_FLOOR, lower and higher, with both lenses' means over those layers; then the
    threshold."""
    floor = f"{LENS_EVAL_FLOOR:g} {UNIT}"
    fitted = [curve for curve in figure.curves if not curve.is_logit]
    logit = figure.logit
    if not fitted:
        return [f"Only the logit lens is evaluated on this held-out split ({figure.tokens} tokens)."]
    if logit is None:
        return ["The logit lens is not evaluated on this held-out split: the fitted lenses are not compared with it."]
    out = []
    for curve in fitted:
        ours, _ = curve.at(curve.layers)
        base, _ = logit.at(curve.layers)
        both = np.isfinite(ours) & np.isfinite(base)
        if not both.any():
            out.append(f"{curve.name}: no layer has a held-out KL from both it and the logit lens.")
            continue
        layers = np.asarray(curve.layers)
        diff = np.where(both, ours - base, 0.0)
        lower, higher = both & (diff <= -LENS_EVAL_FLOOR), both & (diff >= LENS_EVAL_FLOOR)
        if not lower.any() and not higher.any():
            out.append(
                f"{curve.name}: held-out KL within {floor} of the logit lens's at every layer both evaluate "
                f"({layer_ranges(layers[both])})."
            )
            continue
        parts: list[str] = []
        for mask, word in ((lower, "below"), (higher, "above")):
            if mask.any():
                parts.append(
                    f"{'held-out KL ' if not parts else ''}{word} the logit lens's at {layer_ranges(layers[mask])} "
                    f"(mean {ours[mask].mean():.3g} vs {base[mask].mean():.3g} {UNIT})"
                )
        within = both & ~lower & ~higher
        if within.any():
            parts.append(f"within {floor} of it at {layer_ranges(layers[within])}")
        out.append(f"{curve.name}: {'; '.join(parts)}.")
    out.append(
        f"Differences under {floor} are not counted: lens evaluations have no measured noise floor, "
        "so this fixed threshold stands in for one."
    )
    return out
