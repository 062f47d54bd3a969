"""Honest observations and colour scales, on constructed grids (no store, no browser).

The rules under test (docs/reports.md, "Observations"; klstore/report/observe.py): a token stands out
only when its column mean is at least 1.25x the runner-up's; the tokens are alike only when
the largest column mean is at most 1.25x the smallest; otherwise the sentence gives the range.
"""

import json

import numpy as np
import pytest

from klstore.report import floor, interactive, observe, prompts, scale
from klstore.report.figure import Figure
from klstore.report.grid import Grid
from klstore.report.observe import columns_sentence
from klstore.spec import parse_report_spec


def grid(values, kind="aggregate", labels=None, settling=None, counts=None, title="t", columns=None, **more):
    values = np.asarray(values, dtype=float)
    return Grid(
        "g",
        "s",
        title,
        tuple(range(values.shape[0])),
        columns or tuple(f"Gen{i}" for i in range(values.shape[1])),
        values,
        np.full(values.shape, 4) if counts is None else counts,
        4,
        "kl",
        kind,
        labels or {},
        settling=settling,
        **more,
    )


def columns(*means, rows=6):
    """A grid whose column c has mean means[c] (rows vary around it, so it is not flat)."""
    wobble = np.linspace(-0.1, 0.1, rows)[:, None]
    return grid(np.asarray(means, dtype=float)[None, :] * (1 + wobble))


def notes(g):
    """The observations of a grid (no scale, no floor) or of a Figure."""
    return observe.observe(g if isinstance(g, Figure) else Figure(g))


# ------------------------------------------------------------------ standout and alike
def test_a_near_tie_is_not_a_standout():
    """Gen0 leads Gen3 by under 5%: the sentence may not say Gen0 stands out."""
    said = notes(columns(10.0, 4.0, 4.2, 9.6, 4.1))
    assert not any("stands out" in n for n in said)
    line = next(n for n in said if n.startswith("Column means range"))
    assert "Gen0 leads Gen3 by 1.04x, under the 1.25x a standout needs" in line


def test_a_wide_range_is_not_alike():
    """A 1.95x spread between the column means is neither alike nor a standout: numbers only."""
    said = notes(columns(1.95, 1.9, 1.5, 1.2, 1.0))
    assert not any("alike" in n for n in said) and not any("stands out" in n for n in said)
    assert any("Column means range from 1 nats (Gen4) to 1.95 (Gen0), 1.95x" in n for n in said)


@pytest.mark.parametrize(
    "means, sentence",
    [
        ((5.0, 4.0, 1.0), "Gen0 stands out: its mean 5 nats is the highest, 1.25x the runner-up Gen1 (4)."),
        ((4.9, 4.0, 1.0), None),  # 1.225x: just under the margin
        ((1.0, 1.25, 1.1), "The generated tokens are alike: column means range from 1 to 1.25 nats (1.25x)."),
        ((1.0, 1.26, 1.1), None),  # 1.26x: just over the spread
        ((2.0, 0.0), "Gen0 stands out: its mean 2 nats is the highest."),  # the runner-up is 0
    ],
)
def test_the_margins_at_their_edges(means, sentence):
    said = columns_sentence(means)
    if sentence is None:
        assert "stands out" not in said and "alike" not in said and said.startswith("Column means range")
    else:
        assert said == sentence


def test_single_column_and_flat_grids_claim_nothing_about_columns():
    assert columns_sentence([3.0]) is None
    assert notes(grid(np.full((4, 3), 2.0))) == [
        "The grid is flat: every cell is within 0 nats of the others (mean 2 nats)."
    ]


def test_peak_outliers_and_early_ends_are_reported():
    values = np.ones((6, 5))
    values[0, 2] = 30.0
    counts = np.full((6, 5), 4)
    counts[:, 4] = 3
    said = notes(grid(values, counts=counts))
    assert said[0] == "kl peaks at layer 0, Gen2 with 30 nats, 15.3x the grid mean of 1.97 nats."
    assert any(n.startswith("Gen2 stands out") for n in said)
    assert any("1 cell is more than two standard deviations above the mean: layer 0, Gen2 (30)" in n for n in said)
    assert any("of 4, Gen4 by 3" in n for n in said)


# ------------------------------------------------------------------ settling depth
def test_every_kind_of_figure_names_its_settling_depth():
    aggregate = grid(
        np.arange(12.0).reshape(4, 3),
        settling={"n_tokens": 30, "n_settled": 24, "median_layer": 14.0, "median_fraction": 0.5, "n_layers": 30},
    )
    assert notes(aggregate)[-1] == (
        "Top-1 settling depth: median layer 14 of 30 (depth fraction 0.50) over 30 tokens; 6 never settle."
    )
    mixed = grid(
        np.arange(12.0).reshape(4, 3),
        settling={"n_tokens": 2, "n_settled": 2, "median_layer": 3.0, "median_fraction": 0.25, "n_layers": None},
    )
    assert notes(mixed)[-1] == "Top-1 settling depth: median depth fraction 0.25 over 2 tokens."
    prompt = grid(np.arange(12.0).reshape(4, 3), kind="prompt", settling={"layers": [2, None, 3], "n_layers": 4})
    assert (
        notes(prompt)[-1] == "Top-1 settling depth: layer 2 for Gen0, never for Gen1, layer 3 for Gen2 (of 4 layers)."
    )
    summary = {"n_tokens": 5, "n_settled": 0, "median_layer": None, "median_fraction": None, "n_layers": 4}
    difference = grid(
        np.arange(12.0).reshape(4, 3) - 5,
        kind="difference",
        labels={"a": "m1", "b": "m2"},
        settling={"a": summary, "b": None},
    )
    assert notes(difference)[-1] == (
        "Top-1 settling depth: m1: none of 5 tokens settles (the last layer's top-1 is never the generated token)."
    )


# ------------------------------------------------------------------ colour scales
# Gemma-3-270m's logit lens, kl averaged over the 24 demo prompts (klstore compute --model gemma3-270m
# --prompts jobs/prompts/demo.jsonl --json, rows = layers 0..17): layer 0 washes out the rest.
GEMMA_LOGIT_LENS = np.array(
    [
        [65.2, 61.6, 142.4, 139.2, 124.1],
        [28.0, 22.0, 27.8, 29.2, 29.3],
        [24.0, 21.4, 24.2, 25.9, 26.8],
        [24.3, 20.8, 25.2, 26.3, 27.3],
        [19.7, 17.5, 19.7, 22.6, 23.7],
        [15.0, 12.0, 13.4, 16.3, 15.8],
        [15.4, 13.5, 16.7, 17.7, 16.8],
        [12.4, 10.5, 13.2, 13.8, 13.6],
        [11.9, 10.1, 12.6, 13.3, 13.0],
        [11.2, 9.3, 11.6, 11.7, 12.5],
        [6.8, 6.1, 7.6, 7.0, 8.0],
        [7.8, 5.0, 6.2, 6.8, 7.8],
        [5.7, 6.2, 5.5, 5.3, 5.9],
        [4.3, 4.3, 3.4, 3.3, 4.4],
        [3.4, 2.5, 2.1, 2.7, 3.6],
        [2.6, 1.5, 1.8, 2.0, 1.9],
        [0.8, 0.4, 0.5, 0.7, 0.5],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


def test_robust_scale_clips_one_outlying_layer_and_counts_the_cells():
    linear = scale.choose(GEMMA_LOGIT_LENS, "linear", False)
    robust = scale.choose(GEMMA_LOGIT_LENS, "robust", False)
    assert (linear.lo, linear.hi, linear.n_above) == (0.0, 142.4, 0)
    q1, q3 = np.percentile(GEMMA_LOGIT_LENS, [25, 75])
    assert robust.hi == pytest.approx(q3 + 3 * (q3 - q1)) == pytest.approx(65.9, abs=0.05)
    assert robust.above[0].tolist() == [False, False, True, True, True] and not robust.above[1:].any()
    assert robust.note() == "3 cells above the colour scale's top of 65.9 nats (drawn in the top colour and marked)."
    # every other layer now spans 44% of the colours instead of 21%
    assert GEMMA_LOGIT_LENS[1:].max() / robust.hi > 2 * GEMMA_LOGIT_LENS[1:].max() / linear.hi
    # why not a plain high percentile: the 99th lies inside layer 0
    assert np.percentile(GEMMA_LOGIT_LENS, 99) > 124


def test_robust_scale_leaves_a_grid_without_outliers_alone():
    smooth = np.linspace(12, 0, 30)[:, None] * np.ones((1, 5))
    assert scale.bounds(smooth, "robust", False) == scale.bounds(smooth, "linear", False) == (0.0, 12.0)
    assert scale.choose(smooth, "robust", False).note() is None


def test_log_scale_spans_four_decades_and_floors_zeros():
    values = np.array([[100.0, 1.0], [0.001, 0.0]])
    log = scale.choose(values, "log", False)
    assert log.log and log.hi == 100.0 and log.lo == pytest.approx(0.01)
    assert log.n_below == 2 and log.n_above == 0
    assert "2 cells below the log scale's floor of 0.01 nats" in log.note()


def test_differences_are_symmetric_and_never_log():
    values = np.array([[-1.0, 0.5], [0.2, 40.0], [0.1, -0.3], [0.4, 0.2]])
    for kind in scale.SCALES:
        chosen = scale.choose(values, kind, True)
        assert chosen.lo == -chosen.hi and not chosen.log
    assert scale.choose(values, "linear", True).hi == 40.0
    assert scale.choose(values, "robust", True).above[1, 1]


def test_shared_bounds_mark_cells_against_the_section_scale():
    chosen = scale.choose(np.array([[1.0, 5.0]]), "robust", False, shared=(0.0, 4.0))
    assert (chosen.lo, chosen.hi, chosen.n_above) == (0.0, 4.0, 1)


def test_report_spec_color_scale_default_and_error():
    from klstore.errors import KlstoreError

    assert parse_report_spec({}).color_scale == scale.DEFAULT_SCALE == "robust"
    with pytest.raises(KlstoreError, match=r"^s.yaml: color_scale must be linear, log or robust, got 'loud'$"):
        parse_report_spec({"color_scale": "loud"}, "s.yaml")


# ------------------------------------------------------------------ figure JSON
def test_script_json_cannot_close_its_script_element():
    hostile = {"t": "</script><script>alert(1)</script> & <!-- \u2028"}
    text = interactive.script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == hostile


def test_store_text_in_figures_is_escaped_and_tokens_visible():
    values = np.array([[1.0, 2.0]])
    topk = np.empty((1, 2), dtype=object)
    topk[0, 0] = [(" <i>", 0.5), ("\n", 0.25)]
    hover = {
        "topk": topk,
        "gen_rank": np.array([[1.0, np.nan]]),
        "gen_logq": np.array([[-0.7, np.nan]]),
        "top1_match": np.array([[True, None]], dtype=object),
        "tokens": ["<script>", " "],
    }
    g = grid(
        values,
        kind="prompt",
        labels={"model": "m", "probe": "p", "prompt_id": "<b>x</b>"},
        title="m | p | <img src=x onerror=alert(1)>",
        columns=("Gen0\n<script>", "Gen1\n\u2423"),
        hover=hover,
    )
    fig = interactive.figure(Figure(g))
    assert fig["layout"]["title"]["text"] == "m | p | &lt;img src=x onerror=alert(1)&gt;"
    assert fig["layout"]["xaxis"]["ticktext"] == ["Gen0<br>&lt;script&gt;", "Gen1<br>\u2423"]
    hover = fig["data"][0]["customdata"][0][0]
    assert 'generated Gen0: "&lt;script&gt;", rank 1 under Q' in hover
    assert '1. "\u2423&lt;i&gt;"  0.500<br>2. "\\n"  0.250' in hover
    assert "top-k tokens not stored" in fig["data"][0]["customdata"][0][1]
    assert "<i>" not in json.dumps(fig).replace("<i>click", "")


def test_aggregate_hover_counts_prompts_and_links_the_largest():
    values = np.array([[1.0, 3.0]])
    at = np.empty((1, 2), dtype=object)
    at[0, 1] = {"model": "m", "run_id": "r", "prompt_id": "p<7>"}
    hover = {"aggregate": "mean", "mean": values, "median": values / 2, "max": values * 3, "max_at": at}
    g = grid(values, labels={"model": "m", "probe": "p"}, counts=np.array([[12, 11]]), hover=hover)
    fig = interactive.figure(Figure(g), {("m", "r", "p<7>"): "prompts/x.html"})
    hover = fig["data"][0]["customdata"][0]
    assert "12 prompts" in hover[0] and "11 prompts" in hover[1]
    assert "mean 3 · median 1.5" in hover[1] and "largest 9: prompt p&lt;7&gt;" in hover[1]
    assert fig["links"] == [[None, "prompts/x.html"]]


# ------------------------------------------------------------------ example picks
def test_examples_come_from_every_group_in_turn():
    rows = [prompts.PromptRow(f"{g}-{i}", g, "r") for g in ("c", "a", "b") for i in range(3)]
    order = [r.prompt_id for r in prompts.round_robin(rows)]
    assert order[:3] == ["a-0", "b-0", "c-0"] and order[3:6] == ["a-1", "b-1", "c-1"] and len(order) == 9
    uneven = [prompts.PromptRow("x-0", "x", "r")] + [prompts.PromptRow(f"y-{i}", "y", "r") for i in range(3)]
    assert [r.prompt_id for r in prompts.round_robin(uneven)] == ["x-0", "y-0", "y-1", "y-2"]
    # two examples for each of three (model, probe) listings: every group appears
    assert [r.prompt_id for r in prompts.round_robin(rows, 1)][:3] == ["b-0", "c-0", "a-0"]
    picked = {r.prompt_group for k in range(3) for r in prompts.round_robin(rows, k)[:2]}
    assert picked == {"a", "b", "c"}


# ------------------------------------------------------------------ noise floor
FLOOR_GRID = np.array([[2.0, 1e-7, np.nan], [-3e-7, 0.5, 1e-6], [0.0, -2.0, 9.99e-7]])


def floored(values, noise_floor, kind="aggregate", labels=None, chosen=None) -> Figure:
    """The figure of a grid under this noise floor (and colour scale `chosen`)."""
    g = grid(values, kind=kind, labels=labels)
    shown = Figure.of(g, chosen, noise_floor)
    np.testing.assert_array_equal(shown.below_floor, floor.below(g.values, noise_floor))
    return shown


def test_below_marks_finite_cells_whose_magnitude_is_under_the_floor():
    marked = floor.below(FLOOR_GRID, 1e-6)
    # 1e-6 itself is not below; NaN is never marked
    assert marked.tolist() == [[False, True, False], [True, False, False], [True, False, True]]
    assert not floor.below(FLOOR_GRID, None).any() and floor.below(FLOOR_GRID, None).shape == (3, 3)
    assert floor.below(FLOOR_GRID, 0.0).sum() == 0


def test_a_figure_answers_to_the_largest_floor_of_the_runs_behind_it():
    floors = floor.Floors({("a", "r1"): 1e-6, ("a", "r2"): None, ("b", "r3"): 4e-6, ("c", "r4"): None})
    assert floors.of(["a"]) == 1e-6 and floors.of(["a", "b"]) == 4e-6 and floors.of(["c"]) is None
    assert floors.of(["a"], run_id="r2") is None  # a per-prompt map: its own run only
    diff = grid(
        np.zeros((2, 2)), kind="difference", labels={"probe": "p", "a": "a", "b": "b"}, inputs=(("a", "p"), ("b", "p"))
    )
    assert floor.for_grid(diff, floors) == 4e-6  # the larger of the two sides
    page = grid(np.zeros((2, 2)), kind="prompt", labels={"model": "a", "run_id": "r1"}, inputs=(("a", "p"),))
    assert floor.for_grid(page, floors) == 1e-6
    assert floors.per_model() == {"a": (1e-6, 1, 2), "b": (4e-6, 1, 1), "c": (None, 0, 1)}
    assert floor.summary_line(floors).startswith(
        "Noise floor: a 1e-06 nats (measured in 1 of 2 runs), b 4e-06 nats, c not measured ("
    )
    assert floor.summary_line(floor.Floors({("a", "r2"): None})).startswith("Noise floor: not measured (")


def test_observations_name_the_floor_and_count_the_cells_below_it():
    values = np.array([[30.0, 28.0, 26.0], [10.0, 9.0, 11.0], [3e-7, 1e-7, 2e-6]])
    said = notes(floored(values, 9.5e-7))
    assert "Noise floor 9.5e-07 nats: 2 of 9 cells below it (marked with a dot)." in said
    assert not any("noise floor" in n.lower() for n in notes(grid(values)))  # not measured: nothing said
    assert notes(floored(np.full((2, 2), 1e-7) * [[1, 2], [3, 4]], 1e-6))[0] == (
        "Every cell is below the noise floor of 1e-06 nats (the largest is 4e-07 nats): "
        "no value here is distinguishable from 0."
    )


def test_a_lead_smaller_than_the_floor_is_no_standout_trend_or_outlier():
    means = (4e-6, 1e-6, 1.1e-6)  # a 3.6x lead, but by 2.9e-6 nats
    assert columns_sentence(means).startswith("Gen0 stands out")
    assert columns_sentence(means, 1e-5).startswith("The generated tokens' column means")
    lead = columns_sentence((5.0, 4.0, 1.0), 2.0)  # 1.25x and 4 nats of spread, but a lead of 1 < 2
    assert "under the noise floor of 2 nats: not a standout" in lead
    # a 2.1x fall with depth, but by 0.95 nats; Gen1 leads by 0.64 nats; 6 cells below a floor of 1
    trend = np.array([[1.8] * 3, [1.8] * 3, [1.2, 5.0, 1.2], [1.2] * 3, [0.85] * 3, [0.85] * 3])
    assert any("falls with depth" in n for n in notes(grid(trend)))
    assert any("Gen1 stands out" in n for n in notes(grid(trend)))
    quiet = notes(floored(trend, 1.0))
    assert not any("falls with depth" in n or "stands out" in n for n in quiet)
    assert "Noise floor 1 nats: 6 of 18 cells below it (marked with a dot)." in quiet
    assert any("1 cell is more than two standard deviations" in n for n in quiet)  # 5.0: 3.5 nats above the mean
    # an outlier two standard deviations above the mean, but only 0.62 nats above it
    lone = np.ones((6, 4))
    lone[0, 0], lone[5, 3] = 0.0, 1.6
    assert any("standard deviations above the mean" in n for n in notes(grid(lone)))
    quiet = notes(floored(lone, 0.9))
    assert quiet[0].startswith("kl peaks at") and not any("standard deviations" in n for n in quiet)


def test_differences_below_the_floor_are_not_called_differences():
    labels = {"a": "m1", "b": "m2"}
    values = np.array([[0.5, -0.2, 1e-7], [-2e-7, 3e-7, 0.0]])
    said = notes(floored(values, 1e-6, "difference", labels))
    assert said[0] == (
        "m1 is higher than m2 in 1 of 6 cells and lower in 1; 4 differ by less than the noise floor "
        "of 1e-06 nats; the mean difference is +0.05 nats."
    )
    assert notes(grid(values, "difference", labels))[0].startswith("m1 is higher than m2 in 3 of 6 cells")
    assert (
        "Noise floor 1e-06 nats (the larger of the two sides'): 4 of 6 differences below it "
        "(marked with a dot; not differences)."
    ) in said
    tiny = notes(floored(values * 1e-6, 1e-6, "difference", labels))
    assert tiny[0].startswith("m1 and m2 differ by less than the noise floor of 1e-06 nats in every cell")
    assert not any("higher" in n for n in tiny)


def test_marked_cells_get_a_dot_in_png_svg_and_a_marker_and_hover_in_the_interactive_figure():
    from klstore.report import plotting, site

    values = np.array([[2.0, 1e-7], [-3e-7, 0.5]])
    g = floored(values, 1e-6, "difference", {"a": "m1", "b": "m2"}, scale.choose(values, "robust", True))
    fig = plotting.draw(site.heatmap_data(g))
    dots = next(c for c in fig.axes[0].collections if c.get_gid() == "below-noise-floor")
    np.testing.assert_allclose(dots.get_offsets(), [[1 - 0.36, 0 + 0.3], [0 - 0.36, 1 + 0.3]])
    assert fig.axes[0].get_xlim() == (-0.5, 1.5) and fig.axes[0].get_ylim() == (1.5, -0.5)  # limits kept
    assert fig.axes[0].get_title() == "t\n\u2022 below the noise floor (1e-06 nats)"
    data = interactive.figure(g)["data"]
    marker = next(t for t in data if t.get("name") == "below the noise floor")
    assert (marker["x"], marker["y"]) == ([1 - 0.36, 0 - 0.36], [0.3, 1.3]) and marker["hoverinfo"] == "skip"
    hover = data[0]["customdata"]
    assert [["below the noise floor (1e-06 nats)" in h for h in row] for row in hover] == [[False, True], [True, False]]
    assert "not a difference" in hover[0][1]
    plain = Figure(grid(values, "difference", {"a": "m1", "b": "m2"}))  # not measured: no marks anywhere
    drawn = plotting.draw(site.heatmap_data(plain)).axes[0].collections
    assert not any(c.get_gid() == "below-noise-floor" for c in drawn)
    assert [t.get("name") for t in interactive.figure(plain)["data"]] == [None]
