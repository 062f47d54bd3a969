"""`lens_eval` rows -> the report's Lenses section: held-out KL per layer, one line per lens.

The tuned-lens paper's comparison of lenses (Belrose et al. 2023, "Eliciting Latent Predictions
from Transformers with the Tuned Lens"), per model and held-out split:

    KL_l(lens) = mean over held-out tokens t of KL(P_final(t) || Q_lens,l(t))    (nats)

for each layer l and each lens evaluated on that split (the logit lens, lens_id `logit`, and
every fitted lens), with its top-1 agreement (the share of tokens where argmax Q = argmax
P_final). These are the rows `klstore lens fit` writes into `lens_eval`; nothing is recomputed.

Which rows: each fit evaluates its lenses and the logit lens on its held-out split. A lens
evaluated more than once on the same split (model, lens_id, held_out_hash) is shown from its
latest evaluation: the fit whose `lenses` rows are newest (`created_at`; a fit with no `lenses`
row counts as the oldest; ties go to the larger fit_id). Every evaluated layer is shown (the
report spec's `layers` selects heatmap rows, not these); the spec's `models` selects models.

Every value reaches DuckDB as a parameter; no identifier is formatted into the SQL text but the
filter's fixed column name. This module never imports torch or matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klstore.report.aggregate import EPOCH, Filter
from klstore.report.grid import slug
from klstore.spec import LENS_READOUTS, LOGIT_LENS_ID

SHORT_ID = 8  # hex digits of a lens id shown in labels and sentences


def short_id(lens_id: str) -> str:
    """'89b1c2d3…' for a fitted lens's 16-digit id; shorter ids as they are."""
    return lens_id if len(lens_id) <= SHORT_ID else lens_id[:SHORT_ID] + "\u2026"


@dataclass(frozen=True)
class Curve:
    """One lens's evaluation: kl and top1 are (len(layers),), NaN where not finite."""

    kind: str
    lens_id: str
    fit_id: str | None
    layers: tuple[int, ...]
    kl: np.ndarray
    top1: np.ndarray
    tokens: int  # held-out tokens behind each value (the largest over its layers)

    @property
    def is_logit(self) -> bool:
        return self.lens_id == LOGIT_LENS_ID

    @property
    def label(self) -> str:
        """The legend's and the table's label: 'logit', 'tuned 89b1c2d3…'."""
        return "logit" if self.is_logit else f"{self.kind} {short_id(self.lens_id)}"

    @property
    def name(self) -> str:
        """For sentences: 'the logit lens', 'tuned lens 89b1c2d3…'."""
        return "the logit lens" if self.is_logit else f"{self.kind} lens {short_id(self.lens_id)}"

    def at(self, layers) -> tuple[np.ndarray, np.ndarray]:
        """(kl, top1) at `layers`, NaN where this lens has no value."""
        index = {layer: i for i, layer in enumerate(self.layers)}
        pick = [index.get(layer) for layer in layers]
        kl = np.array([np.nan if i is None else self.kl[i] for i in pick], dtype=np.float64)
        top1 = np.array([np.nan if i is None else self.top1[i] for i in pick], dtype=np.float64)
        return kl, top1


@dataclass(frozen=True, eq=False)
class LensFigure:
    """One model's lenses on one held-out split: the numbers of its figure and table (drawn by
    klstore.report.site.lens_lines, described by klstore.report.observe.lens_sentences)."""

    fig_id: str
    model: str
    held_out_hash: str | None
    curves: tuple[Curve, ...]  # the logit lens first, then by kind and id

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for curve in self.curves for layer in curve.layers}))

    @property
    def tokens(self) -> int:
        return max((curve.tokens for curve in self.curves), default=0)

    @property
    def split(self) -> str:
        return "unknown split" if not self.held_out_hash else f"split {self.held_out_hash[:12]}"

    @property
    def title(self) -> str:
        return f"{self.model} | held-out KL per layer | {self.split}, {self.tokens} tokens"

    @property
    def logit(self) -> Curve | None:
        return next((curve for curve in self.curves if curve.is_logit), None)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(column names, rows): a row per layer, KL (nats) and top-1 agreement per lens."""
        names = ["layer"] + [f"{curve.label} {what}" for curve in self.curves for what in ("KL", "top-1")]
        columns = [curve.at(self.layers) for curve in self.curves]
        rows = []
        for r, layer in enumerate(self.layers):
            row = [str(layer)]
            for kl, top1 in columns:
                row += [number_text(kl[r], "{:.4g}"), number_text(top1[r], "{:.3f}")]
            rows.append(row)
        return names, rows


def number_text(value, template: str) -> str:
    """The value through `template`, or 'n/a' where it is not finite."""
    return template.format(value) if np.isfinite(value) else "n/a"


def _kind_order(curve: Curve) -> tuple:
    kinds = list(LENS_READOUTS)  # logit, tuned, least_squares, jacobian
    rank = kinds.index(curve.kind) if curve.kind in kinds else len(kinds)
    return (not curve.is_logit, rank, curve.kind, curve.lens_id)


def load(con, models=None) -> list[LensFigure]:
    """Every (model, held-out split)'s lens figure from the `lens_eval` view (the latest
    evaluation of each lens; module docstring); `models`: only these labels (None: all).
    Empty when the store has no lens evaluations."""
    where = Filter() if not models else Filter().and_in("model", "model", models)
    rows = con.execute(
        f"""
        WITH fits AS (SELECT model, fit_id, max(created_at) AS fitted_at FROM lenses GROUP BY ALL),
        evals AS (
            SELECT e.model, e.held_out_hash, e.lens_id, e.lens, e.fit_id, e.layer, e.kl,
                   e.top1_agreement, e.tokens, coalesce(f.fitted_at, {EPOCH}) AS fitted_at
            FROM (SELECT * FROM lens_eval WHERE {where.sql}) e
            LEFT JOIN fits f ON f.model = e.model AND f.fit_id IS NOT DISTINCT FROM e.fit_id)
        SELECT model, held_out_hash, lens_id, lens, fit_id, layer, kl, top1_agreement, tokens FROM evals
        WHERE lens_id IS NOT NULL AND layer IS NOT NULL
        QUALIFY dense_rank() OVER (
            PARTITION BY model, held_out_hash, lens_id ORDER BY fitted_at DESC, fit_id DESC NULLS LAST) = 1
        ORDER BY model, held_out_hash NULLS LAST, lens_id, layer""",
        where.params,
    ).fetchall()
    grouped: dict = {}
    for model, held_out, lens_id, kind, fit_id, layer, kl, top1, tokens in rows:
        per_lens = grouped.setdefault((str(model), held_out), {})
        per_lens.setdefault(lens_id, (kind, fit_id, {}))[2][int(layer)] = (kl, top1, tokens)
    out = []
    for (model, held_out), per_lens in grouped.items():
        curves = []
        for lens_id, (kind, fit_id, by_layer) in per_lens.items():
            layers = tuple(sorted(by_layer))
            kl, top1, tokens = (
                np.array([_float(by_layer[layer][i]) for layer in layers], dtype=np.float64) for i in range(3)
            )
            finite_tokens = tokens[np.isfinite(tokens)]
            curves.append(
                Curve(
                    kind=str(kind or ("logit" if lens_id == LOGIT_LENS_ID else "unknown")),
                    lens_id=str(lens_id),
                    fit_id=fit_id,
                    layers=layers,
                    kl=kl,
                    top1=top1,
                    tokens=int(finite_tokens.max()) if finite_tokens.size else 0,
                )
            )
        out.append(
            LensFigure(
                fig_id=slug("lenses", model, held_out or ""),
                model=model,
                held_out_hash=held_out,
                curves=tuple(sorted(curves, key=_kind_order)),
            )
        )
    return out


def _float(value) -> float:
    return np.nan if value is None else float(value)
