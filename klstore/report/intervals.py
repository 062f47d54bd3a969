"""Bootstrap confidence intervals for differences over prompts, and the rule that marks a cell a
difference. Pure numpy: no SQL, no files, no torch (klstore.report.compare feeds it the store's
per-prompt cells).

A comparison map shows per cell (layer x generated token) D = stat(A) - stat(B), where `stat`
is the report's aggregate (`mean` or `median`) over the prompts of each side that have a value
in that cell. Its interval is a percentile bootstrap over prompts:

- The unit resampled is a prompt (of one run): its whole layer x token map is kept or repeated
  together, so the cells of one prompt stay as correlated as they are.
- A side is a `Sample`: per prompt i and cell, the sum S[i] of its values and their count C[i]
  (normally 1, or 0 where the prompt has no value there: an early end of sequence, or a
  non-finite value stored as null). With resample weights w (how often each prompt was drawn),
  mean* = sum_i w_i S_i / sum_i w_i C_i, which is the plain mean over the drawn prompts' values;
  median* = the median of the drawn prompts' values S_i / C_i (repeats count as often as drawn).
- Replicate b of a stream draws `idx_b = rng.integers(0, n, size=n)`: the b-th such call, for
  b = 0 .. B-1, on `rng = numpy.random.default_rng([seed, k])`, stream k. **Paired** (the same
  prompts on both sides, in the same order): one stream (k = 0) for both sides, so
  D*_b = stat(A[idx_b]) - stat(B[idx_b]). **Unpaired**: side A is stream 0, side B stream 1.
  **Strata** (`replicates_by_stratum`, the prompt groups of one model and probe): stratum k is
  stream k, each resampled within itself.
- Interval: the 100 (1 - level) / 2 and 100 (1 + level) / 2 percentiles of the B replicates
  (numpy.percentile, linear interpolation). A replicate in which a side has no value in a cell
  is left out of that cell's percentiles. A cell where a side has fewer than `MIN_PROMPTS`
  prompts with a value gets no interval (NaN): one prompt cannot show its own spread.
- Marking (`differences`): a cell is a difference only when its interval excludes 0
  (low > 0 or high < 0) and |D| clears the noise floor (|D| >= floor; no floor: the interval
  alone). A cell without an interval is never a difference.

The bootstrap is vectorised: for a chunk of replicates the resample indices become a count
matrix W (chunk, n), and W @ [S | C] gives every replicate's sums and counts for every cell in
one matrix product. The same seed gives the same intervals on every rebuild (docs/reports.md,
"Differences and their intervals").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
MIN_PROMPTS = 2  # prompts with a value, per side and cell, for an interval
STATISTICS = ("mean", "median")
_CHUNK = 1 << 22  # elements of the count matrix (mean) or of the gathered values (median) at a time


@dataclass(frozen=True, eq=False)
class Sample:
    """One side's per-prompt cells: `sums` and `counts`, each (n_prompts, *cells); counts 0
    where the prompt has no value in that cell."""

    sums: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, values) -> Sample:
        """From per-prompt values (n_prompts, *cells), NaN (or inf) where a prompt has none."""
        v = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(v)
        return cls(np.where(finite, v, 0.0), finite.astype(np.float64))

    @property
    def n(self) -> int:
        return int(self.sums.shape[0])

    @property
    def cells(self) -> tuple:
        return tuple(self.sums.shape[1:])

    def values(self) -> np.ndarray:
        """Each prompt's value per cell, S / C (NaN where C is 0)."""
        return _ratio(self.sums, self.counts)

    def statistic(self, statistic: str = "mean") -> np.ndarray:
        """The aggregate over all prompts, per cell (NaN where none has a value)."""
        if statistic == "mean":
            return _ratio(self.sums.sum(axis=0), self.counts.sum(axis=0))
        return _nanmedian(self.values(), axis=0)

    def reached(self) -> np.ndarray:
        """Prompts with a value, per cell."""
        return (self.counts > 0).sum(axis=0)

    def take(self, index) -> Sample:
        """The prompts `index` (an array of prompt positions), in that order."""
        return Sample(self.sums[index], self.counts[index])


@dataclass(frozen=True, eq=False)
class Interval:
    """The bootstrap interval of each cell of a difference map: `low`, `high` (its shape; NaN
    where it has none), and how it was made."""

    low: np.ndarray
    high: np.ndarray
    level: float
    resamples: int
    seed: int
    paired: bool
    n_a: int  # prompts on each side
    n_b: int
    statistic: str = "mean"

    def excludes_zero(self) -> np.ndarray:
        """Cells whose interval lies wholly above or below 0 (False where there is none)."""
        with np.errstate(invalid="ignore"):
            return (self.low > 0) | (self.high < 0)

    def method(self) -> str:
        """'95% paired bootstrap interval (2000 resamples of 6 prompts, seed 0)'."""
        prompts = f"{self.n_a} prompts" if self.paired else f"{self.n_a} and {self.n_b} prompts"
        return (
            f"{percent(self.level)} {'paired' if self.paired else 'unpaired'} bootstrap interval "
            f"({self.resamples} resamples of {prompts}, seed {self.seed})"
        )

    def cell(self, r: int | np.integer, c: int | np.integer) -> str:
        """'95% CI [+0.12, +0.48]', or '95% CI n/a (fewer than 2 prompts with a value)'."""
        lo, hi = float(self.low[r, c]), float(self.high[r, c])
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return f"{percent(self.level)} CI n/a (fewer than {MIN_PROMPTS} prompts with a value on a side)"
        return f"{percent(self.level)} CI [{lo:+.3g}, {hi:+.3g}]"


def percent(level: float) -> str:
    """0.95 -> '95%', 0.999 -> '99.9%'."""
    return f"{100 * level:.10g}%"


# ------------------------------------------------------------------ the bootstrap
def stream(seed: int, k: int) -> np.random.Generator:
    """Stream k of a seed: numpy.random.default_rng([seed, k])."""
    return np.random.default_rng([seed, k])


def replicates(samples, rng: np.random.Generator, resamples: int, statistic: str = "mean") -> list:
    """One (resamples, *cells) array of the statistic per sample, all resampled with the same
    prompt indices (the samples have the same prompts, in the same order): replicate b uses
    `rng.integers(0, n, size=n)`, the b-th call on `rng`. NaN where a replicate has no value."""
    samples = list(samples)
    n = samples[0].n
    if any(s.n != n for s in samples):
        raise ValueError("paired samples must have the same prompts")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    cells = [int(np.prod(s.cells, dtype=np.int64)) for s in samples]
    out = [np.full((resamples, total), np.nan) for total in cells]
    if n == 0:
        return [o.reshape((resamples, *s.cells)) for o, s in zip(out, samples)]
    if statistic == "mean":
        # the product's columns: each sample's sums, then its counts where some prompt has other
        # than one value there (elsewhere a replicate's count is n: each row of W sums to n)
        blocks, varying = [], []
        for s in samples:
            counts = s.counts.reshape(n, -1)
            varying.append(~(counts == 1).all(axis=0))
            blocks += [s.sums.reshape(n, -1), counts[:, varying[-1]]]
        matrix = np.concatenate(blocks, axis=1)  # (n, columns)
        rows = max(1, _CHUNK // n)
        for start in range(0, resamples, rows):
            stop = min(resamples, start + rows)
            index = np.stack([rng.integers(0, n, size=n) for _ in range(stop - start)])  # (chunk, n)
            offsets = np.arange(stop - start)[:, None] * n
            weights = np.bincount((index + offsets).ravel(), minlength=(stop - start) * n)
            product = weights.reshape(stop - start, n).astype(np.float64) @ matrix  # (chunk, columns)
            at = 0
            for o, total, mask in zip(out, cells, varying):
                sums = product[:, at : at + total]
                counts = np.full(sums.shape, float(n))
                counts[:, mask] = product[:, at + total : at + total + int(mask.sum())]
                o[start:stop] = _ratio(sums, counts)
                at += total + int(mask.sum())
    else:
        values = [s.values().reshape(n, -1) for s in samples]
        rows = max(1, _CHUNK // (n * max(max(cells), 1)))
        for start in range(0, resamples, rows):
            stop = min(resamples, start + rows)
            index = np.stack([rng.integers(0, n, size=n) for _ in range(stop - start)])
            for o, v in zip(out, values):
                o[start:stop] = _nanmedian(v[index], axis=1)  # v[index]: (chunk, n, cells)
    return [o.reshape((resamples, *s.cells)) for o, s in zip(out, samples)]


def replicates_by_stratum(samples, seed: int, resamples: int, statistic: str = "mean") -> list:
    """Each sample (stratum k: a prompt group) resampled within itself on stream k: one
    (resamples, *cells) array per sample."""
    return [replicates([s], stream(seed, k), resamples, statistic)[0] for k, s in enumerate(samples)]


def percentile_interval(reps, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per cell: the 100 (1 - level) / 2 and 100 (1 + level) / 2 percentiles of the
    replicates (axis 0) that are finite; NaN where none is."""
    reps = np.asarray(reps, dtype=np.float64)
    flat = reps.reshape(reps.shape[0], -1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    finite = np.isfinite(flat)
    every = finite.all(axis=0)
    if every.any():
        low[every], high[every] = np.percentile(flat[:, every], q, axis=0)
    for j in np.flatnonzero(finite.any(axis=0) & ~every):
        low[j], high[j] = np.percentile(flat[finite[:, j], j], q)
    return low.reshape(reps.shape[1:]), high.reshape(reps.shape[1:])


def interval(
    reps_a,
    reps_b,
    enough,
    *,
    level: float,
    resamples: int,
    seed: int,
    paired: bool,
    n_a: int,
    n_b: int,
    statistic: str = "mean",
) -> Interval:
    """The Interval of D* = reps_a - reps_b; NaN where `enough` (cells with at least MIN_PROMPTS
    prompts with a value on each side) is False."""
    low, high = percentile_interval(np.asarray(reps_a) - np.asarray(reps_b), level)
    low[~enough], high[~enough] = np.nan, np.nan
    return Interval(low, high, level, resamples, seed, paired, n_a, n_b, statistic)


def bootstrap_difference(
    a,
    b,
    *,
    paired: bool,
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    statistic: str = "mean",
) -> Interval:
    """The interval of stat(a) - stat(b) per cell, as the report computes it.

    a, b: per-prompt values (n_prompts, layers, tokens), NaN where a prompt has no value, or
    `Sample`s. paired: the same prompts in the same order on both sides (one resample of prompt
    indices for both; a and b must then have the same n_prompts); else each side on its own.
    statistic: `mean` or `median`, the report spec's `aggregate`. Module docstring: the method.
    """
    a, b = (x if isinstance(x, Sample) else Sample.of(x) for x in (a, b))
    if paired:
        if a.n != b.n:
            raise ValueError(f"paired sides need the same prompts, got {a.n} and {b.n}")
        reps_a, reps_b = replicates([a, b], stream(seed, 0), resamples, statistic)
    else:
        reps_a = replicates([a], stream(seed, 0), resamples, statistic)[0]
        reps_b = replicates([b], stream(seed, 1), resamples, statistic)[0]
    enough = (a.reached() >= MIN_PROMPTS) & (b.reached() >= MIN_PROMPTS)
    return interval(
        reps_a,
        reps_b,
        enough,
        level=level,
        resamples=resamples,
        seed=seed,
        paired=paired,
        n_a=a.n,
        n_b=b.n,
        statistic=statistic,
    )


# ------------------------------------------------------------------ the marking rule
def unsure(values, interval: Interval | None) -> np.ndarray | None:
    """The cells with a value whose interval includes 0 or that have none (dotted in the figures:
    not differences); None without intervals."""
    if interval is None:
        return None
    return np.isfinite(np.asarray(values, dtype=np.float64)) & ~interval.excludes_zero()


def differences(values, interval: Interval | None, floor: float | None) -> np.ndarray:
    """The cells that are differences: finite, |value| >= floor (when measured), and (when there
    is an interval) an interval that excludes 0."""
    v = np.asarray(values, dtype=np.float64)
    out = np.isfinite(v)
    if floor is not None:
        with np.errstate(invalid="ignore"):
            out &= np.abs(v) >= floor
    if interval is not None:
        out &= interval.excludes_zero()
    return out


# ------------------------------------------------------------------ helpers
def _ratio(num, den) -> np.ndarray:
    """num / den, NaN where den is 0 (no warning)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def nanmean(stack, axis: int = 0) -> np.ndarray:
    """numpy.nanmean without its warning on all-NaN slices (NaN there)."""
    stack = np.asarray(stack, dtype=np.float64)
    finite = np.isfinite(stack)
    return _ratio(np.where(finite, stack, 0.0).sum(axis=axis), finite.sum(axis=axis))


def _nanmedian(values, axis: int) -> np.ndarray:
    """numpy.nanmedian without its warning on all-NaN slices (NaN there): sort (NaN last) and
    average the middle one or two finite values."""
    v = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    v = np.sort(np.where(np.isfinite(v), v, np.nan), axis=-1)
    k = np.isfinite(v).sum(axis=-1)
    lo = np.take_along_axis(v, np.maximum((k - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(v, np.maximum(k // 2, 0)[..., None], axis=-1)[..., 0]
    return np.where(k > 0, (lo + hi) / 2, np.nan)
