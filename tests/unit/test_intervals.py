"""Bootstrap intervals (klstore.report.intervals) against a plain numpy bootstrap loop written
here from the documented method, and the marking rule on constructed grids: a cell is a
difference only when its interval excludes 0 and its size clears the noise floor, and no
sentence, hover line or figure calls a cell whose interval includes 0 a difference.

The plain loop draws the same resample indices by construction (stream k of a seed is
numpy.random.default_rng([seed, k]); replicate b is its b-th `integers(0, n, size=n)`), so the
intervals agree to float rounding (the vectorised code sums through a matrix product)."""

import warnings

import numpy as np
import pytest

from klstore.report import floor, interactive, intervals, observe, plotting, scale, site
from klstore.report.figure import Figure
from klstore.report.grid import Grid
from klstore.report.intervals import Sample, bootstrap_difference

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def plain_bootstrap(a, b, paired, level=0.95, resamples=500, seed=0, statistic="mean"):
    """The textbook loop: resample prompts, take the statistic per cell (NaN-ignoring), subtract;
    percentiles of the finite replicates per cell; NaN where a side has < 2 prompts with a value."""
    stat = {"mean": np.nanmean, "median": np.nanmedian}[statistic]
    na, nb = len(a), len(b)
    first = np.random.default_rng([seed, 0])
    second = first if paired else np.random.default_rng([seed, 1])
    reps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells of a replicate: NaN
        if paired:
            for _ in range(resamples):
                idx = first.integers(0, na, size=na)
                reps.append(stat(a[idx], axis=0) - stat(b[idx], axis=0))
        else:
            ra = [stat(a[first.integers(0, na, size=na)], axis=0) for _ in range(resamples)]
            rb = [stat(b[second.integers(0, nb, size=nb)], axis=0) for _ in range(resamples)]
            reps = [x - y for x, y in zip(ra, rb)]
    reps = np.array(reps)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    low, high = np.full(reps.shape[1:], np.nan), np.full(reps.shape[1:], np.nan)
    for cell in np.ndindex(reps.shape[1:]):
        column = reps[(slice(None), *cell)]
        column = column[np.isfinite(column)]
        enough = np.isfinite(a[(slice(None), *cell)]).sum() >= 2 and np.isfinite(b[(slice(None), *cell)]).sum() >= 2
        if column.size and enough:
            low[cell], high[cell] = np.percentile(column, q)
    return low, high


def data(n=12, shape=(4, 3), seed=1):
    rng = np.random.default_rng(seed)
    a = rng.lognormal(0.0, 0.8, (n, *shape))
    b = a * rng.lognormal(0.0, 0.3, (n, *shape)) + rng.normal(0.0, 0.2, (n, *shape))
    return a, b


@pytest.mark.parametrize("statistic", ["mean", "median"])
@pytest.mark.parametrize("paired", [True, False])
def test_intervals_equal_a_plain_bootstrap_loop(paired, statistic):
    a, b = data()
    if not paired:
        b = b[:9]  # unpaired sides need not have the same prompts
    got = bootstrap_difference(a, b, paired=paired, resamples=500, seed=3, statistic=statistic)
    low, high = plain_bootstrap(a, b, paired, resamples=500, seed=3, statistic=statistic)
    np.testing.assert_allclose(got.low, low, **TIGHT)
    np.testing.assert_allclose(got.high, high, **TIGHT)
    assert (got.paired, got.resamples, got.seed, got.n_a, got.n_b) == (paired, 500, 3, 12, len(b))
    assert (got.low < got.high).all()


def test_missing_values_are_left_out_as_on_the_map():
    """Prompts without a value in a cell (early end of sequence) are left out of that cell; a
    replicate with no value is left out of the percentiles; a side with fewer than 2 prompts
    with a value gives no interval."""
    a, b = data(n=10)
    a[:7, 0, 2] = np.nan  # 3 prompts reach this cell on side a: replicates without any are dropped
    a[1:, 1, 2] = np.nan  # 1 prompt: no interval
    b[:, 2, 2] = np.nan  # none on side b
    for paired in (True, False):
        got = bootstrap_difference(a, b, paired=paired, level=0.9, resamples=400, seed=5)
        low, high = plain_bootstrap(a, b, paired, level=0.9, resamples=400, seed=5)
        np.testing.assert_allclose(got.low, low, **TIGHT)
        np.testing.assert_allclose(got.high, high, **TIGHT)
        assert np.isfinite(got.low[0, 2]) and np.isnan(got.low[1, 2]) and np.isnan(got.high[2, 2])
        assert not got.excludes_zero()[1, 2] and "CI n/a" in got.cell(1, 2)


def test_chunks_of_the_resample_matrix_do_not_change_the_intervals(monkeypatch):
    a, b = data(n=15)
    whole = bootstrap_difference(a, b, paired=True, resamples=300, seed=2)
    monkeypatch.setattr(intervals, "_CHUNK", 15 * 7)  # 7 replicates per chunk, the last one short
    chunked = bootstrap_difference(a, b, paired=True, resamples=300, seed=2)
    np.testing.assert_allclose(chunked.low, whole.low, **TIGHT)
    np.testing.assert_allclose(chunked.high, whole.high, **TIGHT)
    again = bootstrap_difference(a, b, paired=True, resamples=300, seed=2)
    assert again.low.tobytes() == whole.low.tobytes()  # the same seed: the same bytes
    other = bootstrap_difference(a, b, paired=True, resamples=300, seed=4)
    assert not np.array_equal(other.low, whole.low)


def test_sums_and_counts_weigh_prompts_by_their_rows():
    """A prompt with two rows in a cell (the same prompt in two lens read-outs of one probe, say)
    counts twice in the mean, as in the map's SQL avg: Sample(sums, counts) against the rows."""
    rows = np.array([1.0, 3.0, 2.0, 6.0, 5.0])  # prompt 0: 1 and 3; prompt 1: 2; prompt 2: 6 and 5
    sample = Sample(np.array([[4.0], [2.0], [11.0]]), np.array([[2.0], [1.0], [2.0]]))
    assert sample.statistic()[0] == pytest.approx(rows.mean())
    reps = intervals.replicates([sample], intervals.stream(0, 0), 50)[0]
    rng = intervals.stream(0, 0)
    per_prompt = [[1.0, 3.0], [2.0], [6.0, 5.0]]
    for b in range(50):
        idx = rng.integers(0, 3, size=3)
        assert reps[b, 0] == pytest.approx(np.mean([v for i in idx for v in per_prompt[i]]), rel=1e-12)


def test_pairing_removes_the_prompt_to_prompt_spread():
    """Both sides share a large per-prompt level; B is A shifted by 0.1 nats. Paired, the interval
    is [0.1, 0.1] up to rounding and excludes 0; unpaired it is as wide as the prompts' spread
    and includes 0."""
    rng = np.random.default_rng(0)
    a = rng.lognormal(1.0, 1.0, (16, 1, 1))
    b = a - 0.1
    paired = bootstrap_difference(a, b, paired=True, resamples=1000)
    unpaired = bootstrap_difference(a, b, paired=False, resamples=1000)
    assert paired.low[0, 0] == pytest.approx(0.1, abs=1e-12) and paired.high[0, 0] == pytest.approx(0.1, abs=1e-12)
    assert paired.excludes_zero()[0, 0] and not unpaired.excludes_zero()[0, 0]
    assert unpaired.low[0, 0] < -0.5 and unpaired.high[0, 0] > 0.5
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap_difference(a, b[:5], paired=True)


def test_strata_are_resampled_each_within_itself_on_its_own_stream():
    a, b = data(n=8)
    c = data(n=5, seed=9)[0]
    reps = intervals.replicates_by_stratum([Sample.of(a), Sample.of(b), Sample.of(c)], 7, 200)
    for k, values in enumerate((a, b, c)):
        rng = np.random.default_rng([7, k])
        expected = [values[rng.integers(0, len(values), size=len(values))].mean(axis=0) for _ in range(200)]
        np.testing.assert_allclose(reps[k], expected, **TIGHT)


# ------------------------------------------------------------------ the marking rule
FLOOR = 0.5


def outlier_sides(seed=0):
    """Two groups of 8 prompts over a 2 x 2 map (per-prompt values, nats):
    (0, 0): one prompt of group a is 17 nats above the rest: the mean moves by 2, the interval
            includes 0 (about a third of the resamples leave that prompt out);
    (0, 1): every prompt of a is 2 nats above b's: a difference;
    (1, 0): 0.2 nats above, consistently: the interval excludes 0, but under the floor;
    (1, 1): the same distribution on both sides: no difference."""
    rng = np.random.default_rng(seed)
    b = 1.0 + rng.normal(0.0, 0.05, (8, 2, 2))
    a = 1.0 + rng.normal(0.0, 0.05, (8, 2, 2))
    a[0, 0, 0] += 17.0
    a[:, 0, 1] += 2.0
    a[:, 1, 0] += 0.2
    return a, b


def difference_grid(a, b, interval, noise_floor=FLOOR) -> Figure:
    """The figure of A - B with this interval, noise floor and a robust diverging scale."""
    values = np.nanmean(a, axis=0) - np.nanmean(b, axis=0)
    g = Grid(
        "d",
        "group comparisons",
        "m | p | ga minus gb",
        (0, 1),
        ("Gen0", "Gen1"),
        values,
        np.full(values.shape, 8),
        8,
        "kl",
        "difference",
        {"model": "m", "probe": "p", "a": "ga", "b": "gb"},
        interval=interval,
    )
    return Figure(g, scale.choose(values, "robust", True), noise_floor, floor.below(values, noise_floor))


def test_one_outlier_prompt_moves_the_mean_but_is_not_a_difference():
    a, b = outlier_sides()
    ci = bootstrap_difference(a, b, paired=False)
    shown = difference_grid(a, b, ci)
    g = shown.grid
    assert g.values[0, 0] == pytest.approx(17 / 8, abs=0.1) and abs(g.values[0, 0]) >= FLOOR  # clears the floor
    assert ci.low[0, 0] <= 0 <= ci.high[0, 0]  # but its interval includes 0
    assert ci.excludes_zero()[1, 0] and abs(g.values[1, 0]) < FLOOR
    marked = intervals.differences(g.values, ci, FLOOR)
    assert marked.tolist() == [[False, True], [False, False]]
    assert intervals.differences(g.values, None, FLOOR).tolist() == [[True, True], [False, False]]  # the floor alone
    assert intervals.differences(g.values, ci, None).tolist() == [[False, True], [True, False]]  # the interval alone

    said = observe.observe(shown)
    assert said[0] == (
        "ga is higher than gb in 1 of 4 cells and lower in 0 (a cell counts when its 95% interval excludes 0 "
        "and its size clears the noise floor of 0.5 nats); 2 cells have a 95% interval that includes 0 and "
        "1 lies below the noise floor: not differences."
    )
    assert said[1] == f"The largest difference is at layer 0, Gen1: {g.values[0, 1]:+.3g} nats ({ci.cell(0, 1)})."
    assert said[2] == (
        f"The largest gap, {g.values[0, 0]:+.3g} nats at layer 0, Gen0 ({ci.cell(0, 0)}), is not a difference: "
        "its interval includes 0."
    )
    assert said[3].startswith("Intervals: 95% unpaired bootstrap interval (2000 resamples of 8 and 8 prompts, seed 0)")
    # every sentence naming the outlier's cell says it is not a difference
    naming = [s for s in said if "layer 0, Gen0" in s]
    assert naming and all("not a difference" in s for s in naming)

    hover = interactive.figure(shown)["data"][0]["customdata"]
    assert ci.cell(0, 0) in hover[0][0] and "not a difference: the 95% interval includes 0" in hover[0][0]
    assert ci.cell(0, 1) in hover[0][1] and "not a difference" not in hover[0][1]
    assert "not a difference: below the noise floor (0.5 nats)" in hover[1][0]
    dots = next(t for t in interactive.figure(shown)["data"] if t.get("name") == "not a difference")
    assert sorted(zip(dots["y"], dots["x"])) == sorted((r + 0.3, c - 0.36) for r, c in [(0, 0), (1, 0), (1, 1)])

    fig = plotting.draw(site.heatmap_data(shown))
    drawn = next(c for c in fig.axes[0].collections if c.get_gid() == "below-noise-floor")
    np.testing.assert_allclose(
        sorted(map(tuple, drawn.get_offsets())), sorted([(-0.36, 0.3), (-0.36, 1.3), (0.64, 1.3)])
    )
    title = " ".join(fig.axes[0].get_title().split("\n"))  # wrapped to the figure's width
    assert "\u2022 not a difference: 95% CI includes 0 or under the noise floor (0.5 nats)" in title


def test_without_a_difference_no_cell_is_called_one():
    a, b = outlier_sides()
    a[:, 0, 1] -= 2.0  # the consistent difference removed
    ci = bootstrap_difference(a, b, paired=False)
    said = observe.observe(difference_grid(a, b, ci))
    assert said[0].startswith("No cell shows a difference between ga and gb (a cell counts when its 95% interval")
    assert "3 cells have a 95% interval that includes 0 and 1 lies below the noise floor" in said[0]
    largest = abs(a[:, 0, 0].mean() - b[:, 0, 0].mean())
    assert f"The largest |difference| is {largest:.3g} nats, at layer 0, Gen0 ({ci.cell(0, 0)})." in said[0]
    assert not any("higher than" in s for s in said)
    # without a measured floor the interval alone decides, and the sentence says so
    plain = observe.observe(difference_grid(a, b, ci, noise_floor=None))
    assert "(a cell counts when its 95% interval excludes 0)" in plain[0] and "higher than gb in 1 of 4" in plain[0]
