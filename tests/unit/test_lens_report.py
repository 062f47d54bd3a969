"""The Lenses section's sentences and figure on constructed evaluations (no store; the store
path is in tests/integration/test_report_lenses.py)."""

import io

import numpy as np
import pytest

from klstore.report import lineplot
from klstore.report.floor import LENS_EVAL_FLOOR
from klstore.report.lenses import Curve, LensFigure, short_id
from klstore.report.observe import layer_ranges, lens_sentences
from klstore.report.site import lens_lines


def curve(kind, lens_id, kl, layers=None):
    kl = np.asarray(kl, dtype=float)
    layers = tuple(range(len(kl))) if layers is None else tuple(layers)
    return Curve(kind, lens_id, "fit", layers, kl, np.full(kl.shape, 0.5), 100)


def figure(*curves):
    return LensFigure("f", "m", "ab" * 32, tuple(curves))


@pytest.mark.parametrize(
    "layers, text",
    [([3], "layer 3"), ([0, 1, 2], "layers 0-2"), ([5, 0, 1, 3], "layers 0-1, 3 and 5"), ([2, 4], "layers 2 and 4")],
)
def test_layer_ranges(layers, text):
    assert layer_ranges(layers) == text


def test_a_difference_of_exactly_the_threshold_counts_and_one_just_under_does_not():
    logit = curve("logit", "logit", [1.0, 1.0, 1.0])
    tuned = curve("tuned", "a" * 16, [1.0 - LENS_EVAL_FLOOR, 1.0 - 0.999 * LENS_EVAL_FLOOR, 1.5])
    (said, _) = lens_sentences(figure(logit, tuned))
    assert said == (
        f"tuned lens {'a' * 8}\u2026: held-out KL below the logit lens's at layer 0 (mean 0.99 vs 1 nats); "
        "above the logit lens's at layer 2 (mean 1.5 vs 1 nats); within 0.01 nats of it at layer 1."
    )


def test_only_layers_both_lenses_evaluate_are_compared():
    logit = curve("logit", "logit", [5.0, 4.0, np.nan])
    tuned = curve("tuned", "b" * 16, [1.0, 1.0, 0.5, 0.1], layers=[0, 1, 2, 3])
    assert lens_sentences(figure(logit, tuned))[0] == (
        f"tuned lens {'b' * 8}\u2026: held-out KL below the logit lens's at layers 0-1 (mean 1 vs 4.5 nats)."
    )


def test_without_a_logit_lens_or_a_fitted_lens_nothing_is_compared():
    assert lens_sentences(figure(curve("tuned", "c" * 16, [1.0]))) == [
        "The logit lens is not evaluated on this held-out split: the fitted lenses are not compared with it."
    ]
    assert lens_sentences(figure(curve("logit", "logit", [1.0]))) == [
        "Only the logit lens is evaluated on this held-out split (100 tokens)."
    ]


def test_short_ids_and_labels():
    assert short_id("0123456789abcdef") == "01234567\u2026" and short_id("logit") == "logit"
    assert curve("least_squares", "0123456789abcdef", [1.0]).label == "least_squares 01234567\u2026"
    assert curve("logit", "logit", [1.0]).name == "the logit lens"


def test_gaps_and_values_below_the_axis_bottom_are_drawn():
    """NaN is a gap in the line; zero and negative float error sit on the log axis's bottom."""
    data = figure(curve("logit", "logit", [2.0, np.nan, 0.0, -1e-9]), curve("tuned", "d" * 16, [1.0, 0.5, 0.2, 0.1]))
    fig = lineplot.draw(lens_lines(data))
    fig.savefig(io.BytesIO(), format="svg")
    lines = {line.get_gid(): line for line in fig.axes[0].lines}
    np.testing.assert_array_equal(lines["series-0"].get_ydata(), [2.0, np.nan, LENS_EVAL_FLOOR, LENS_EVAL_FLOOR])
    np.testing.assert_array_equal(lines["below-y-min-0"].get_xdata(), [2, 3])
    assert "below-y-min-1" not in lines and fig.axes[0].get_ylim()[0] < LENS_EVAL_FLOOR
    assert "drawn at 0.01" in fig.axes[0].get_title()
    # redrawn into the same Figure (as the drawing processes do): only the new lines
    again = lineplot.draw(lens_lines(figure(curve("logit", "logit", [3.0, 2.0]))), figure=fig)
    assert again is fig and [line.get_gid() for line in fig.axes[0].lines] == ["series-0"]
    assert "drawn at" not in fig.axes[0].get_title()
