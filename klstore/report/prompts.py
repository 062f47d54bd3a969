"""Store rows -> one grid per prompt: its map, what each layer predicts, and where it settles.

For each (model, probe) of the spec's selection, every prompt (its latest run) is listed with
its settling depths (`Listing`). Up to `PAGES_PER_PROBE` of them get a page of their own with an
interactive map whose hover shows the top-k tokens of Q, the generated token and its rank; the
first `per_prompt` of those are also drawn as PNG/SVG examples in the report's index. Both are
picked round-robin over the prompt groups (each group's prompts by id, one group after the
other), so every group is represented, not the first one alone; the examples of the k-th
(model, probe) start at the k-th group, so that two examples each still cover three groups.

Token ids become texts through the store's `tokens` view (each model's vocabulary once).
Files written before lens tokens existed (or with topk = 0) have null token columns: their
maps still draw, and their hover says the tokens were not stored.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

from klstore.report import settling
from klstore.report.aggregate import EPOCH, Filter, arrays_from_rows, layers_for
from klstore.report.grid import Grid, column_labels, shown_token, slug

PAGES_PER_PROBE = 250  # prompt pages per (model, probe); every prompt is listed regardless


@dataclass
class PromptRow:
    """One prompt of a (model, probe) listing."""

    prompt_id: str
    prompt_group: str
    run_id: str
    prompt_text: str = ""
    tokens: list = field(default_factory=list)  # generated token texts, by gen_idx
    settle: list = field(default_factory=list)  # settling layer (None: never) per generated token
    n_layers: int | None = None
    page: str | None = None  # the site path of its map, when it has one

    @property
    def median_fraction(self) -> float | None:
        """Median settling depth as a fraction of the model's depth, over the tokens that settle."""
        settled = [s for s in self.settle if s is not None]
        if not settled or not self.n_layers:
            return None
        return (statistics.median(settled) + 1) / self.n_layers

    @property
    def tokens_text(self) -> str:
        """The generated tokens, whitespace made visible, one space apart."""
        return " ".join(shown_token(t) for t in self.tokens)

    @property
    def settle_text(self) -> str:
        """'12 · never · 14 (of 30)': the settling layer per generated token."""
        layers = " · ".join("never" if s is None else str(s) for s in self.settle)
        return f"{layers} (of {self.n_layers})" if self.n_layers else layers


@dataclass
class Listing:
    """The prompts of one (model, probe), by group and id."""

    model: str
    probe: str
    rows: list  # PromptRow
    page: str  # the site path of the listing page

    @property
    def n_pages(self) -> int:
        return sum(1 for r in self.rows if r.page)

    def pages(self) -> dict:
        """fig_id -> the site path of that prompt's page, for the prompts that have one."""
        return {prompt_fig_id(self.model, self.probe, r.prompt_id): r.page for r in self.rows if r.page}

    def examples(self, n: int, start: int = 0) -> list:
        """The first n prompts with a page, round-robin over the groups from the start-th group
        (the report starts the k-th (model, probe) at group k, so that a few examples per
        (model, probe) still cover every group)."""
        return [r for r in round_robin(self.rows, start) if r.page][:n]


def round_robin(rows: list[PromptRow], start: int = 0) -> list[PromptRow]:
    """Rows (with prompt_group, prompt_id) ordered group by group: each group's first prompt
    (by id), then each group's second, ... so any prefix spreads over the groups. The groups
    take turns in name order, beginning with the (start mod number of groups)-th."""
    by_group: dict[str, list[PromptRow]] = {}
    for row in sorted(rows, key=lambda r: (r.prompt_group, r.prompt_id)):
        by_group.setdefault(row.prompt_group, []).append(row)
    groups = list(by_group.values())
    if groups:
        first = start % len(groups)
        groups = groups[first:] + groups[:first]
    order: list[PromptRow] = []
    depth = 0
    while len(order) < len(rows):
        order += [group[depth] for group in groups if depth < len(group)]
        depth += 1
    return order


def listings(con) -> list[Listing]:
    """Every (model, probe) of the loaded selection with its prompts' latest runs and settling."""
    picks = con.execute(f"""
        SELECT model, probe, prompt_id, any_value(prompt_group),
               arg_max(run_id, {{'t': coalesce(r.created_at, {EPOCH}), 'r': run_id}})
        FROM (SELECT DISTINCT model, probe, prompt_id, prompt_group, run_id FROM {settling.TABLE})
        LEFT JOIN runs r USING (run_id) GROUP BY model, probe, prompt_id ORDER BY ALL""").fetchall()
    per: dict = {}
    for model, probe, prompt_id, group, run_id in picks:
        per.setdefault((model, probe), []).append(PromptRow(prompt_id, group, run_id))
    out = []
    for (model, probe), rows in per.items():
        settle = settling.per_prompt(con, model, probe)
        texts, tokens = _texts(con, model, rows)
        for row in rows:
            row.settle, row.n_layers = settle.get((row.run_id, row.prompt_id), ([], None))
            row.prompt_text = texts.get((row.run_id, row.prompt_id), "")
            row.tokens = tokens.get((row.run_id, row.prompt_id), [])
        for row in round_robin(rows)[:PAGES_PER_PROBE]:
            row.page = f"prompts/{prompt_fig_id(model, probe, row.prompt_id)}.html"
        rows.sort(key=lambda r: (r.prompt_group, r.prompt_id))
        out.append(Listing(model, probe, rows, f"probes/{slug('probe', model, probe)}.html"))
    return out


def prompt_fig_id(model: str, probe: str, prompt_id: str) -> str:
    return slug("prompt", model, probe, prompt_id)


def _pick_table(con, rows) -> str:
    """A temporary table (run_id, prompt_id) of the rows, to join on; returns its name."""
    name = "klstore_report_picks"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT unnest($runs) AS run_id, unnest($prompts) AS prompt_id",
        {"runs": [r.run_id for r in rows], "prompts": [r.prompt_id for r in rows]},
    )
    return name


def _texts(con, model: str, rows) -> tuple[dict, dict]:
    """(run_id, prompt_id) -> prompt text, and -> generated token texts by gen_idx."""
    picks = _pick_table(con, rows)
    texts = {
        (r, p): t
        for r, p, t in con.execute(
            f"SELECT run_id, prompt_id, any_value(prompt_text) FROM prompts JOIN {picks} USING (run_id, prompt_id) "
            "WHERE model = $model GROUP BY ALL",
            {"model": model},
        ).fetchall()
    }
    tokens = {
        (r, p): t
        for r, p, t in con.execute(
            f"SELECT run_id, prompt_id, list(token_text ORDER BY gen_idx) FROM generations "
            f"JOIN {picks} USING (run_id, prompt_id) WHERE model = $model GROUP BY ALL",
            {"model": model},
        ).fetchall()
    }
    return texts, tokens


def grids(con, spec, where: Filter, n_layers: dict, listing: Listing) -> list[Grid]:
    """A grid per listed prompt that has a page (in listing order), with its lens tokens."""
    rows = [r for r in listing.rows if r.page]
    if not rows:
        return []
    model, probe, div = listing.model, listing.probe, spec.divergence
    one = where.and_("model = $p_model AND probe = $p_probe", p_model=model, p_probe=probe)
    picks = _pick_table(con, rows)
    cells = con.execute(
        f"SELECT run_id, prompt_id, layer, gen_idx, {div}, topk_ids, topk_probs, gen_rank, gen_logq, top1_match "
        f"FROM kl JOIN {picks} USING (run_id, prompt_id) WHERE {one.sql}",
        one.params,
    ).fetchall()
    per: dict = {}
    for run_id, prompt_id, *cell in cells:
        per.setdefault((run_id, prompt_id), []).append(cell)
    vocab = _vocabulary(con, model, {t for cell in cells if cell[5] for t in cell[5]})
    out = []
    for row in rows:
        if (row.run_id, row.prompt_id) in per:
            mine = per[(row.run_id, row.prompt_id)]
            layers = layers_for(spec, model, n_layers[model], (cell[0] for cell in mine))  # `stored`: its own
            out.append(_grid(spec, listing, row, mine, layers, vocab))
    return out


def _vocabulary(con, model: str, ids: set) -> dict:
    """token id -> text for the ids (one join with the model's `tokens` rows)."""
    if not ids:
        return {}
    return dict(
        con.execute(
            "SELECT t.token_id, any_value(t.token_text) FROM tokens t JOIN (SELECT unnest($ids) AS token_id) i "
            "USING (token_id) WHERE t.model = $model GROUP BY t.token_id",
            {"ids": sorted(ids), "model": model},
        ).fetchall()
    )


def _grid(spec, listing: Listing, row: PromptRow, cells, layers, vocab) -> Grid:
    """One prompt's grid: values, and for the hover the top-k (text, probability) of Q per cell,
    the generated token's rank and log Q, and whether the top-1 is the generated token."""
    n_cols = max(c[1] for c in cells) + 1
    rows = [
        (
            layer,
            gen,
            value,
            1,
            None if ids is None else [(vocab.get(t), float(p)) for t, p in zip(ids, probs)],
            rank,
            logq,
            match,
        )
        for layer, gen, value, ids, probs, rank, logq, match in cells
    ]
    values, counts, topk, rank, logq, match = _arrays(rows, layers, n_cols)
    model, probe = listing.model, listing.probe
    texts = list(row.tokens[:n_cols]) + [None] * (n_cols - len(row.tokens[:n_cols]))
    columns = column_labels(n_cols, texts) if len(row.tokens) >= n_cols else column_labels(n_cols)
    settle = list(row.settle[:n_cols]) if row.settle else []
    return Grid(
        prompt_fig_id(model, probe, row.prompt_id),
        "per-prompt heatmaps",
        f"{model} | {probe} | {row.prompt_id}",
        layers,
        columns,
        values,
        counts.astype(int),
        1,
        spec.divergence,
        "prompt",
        {
            "model": model,
            "probe": probe,
            "prompt_id": row.prompt_id,
            "prompt_group": row.prompt_group,
            "prompt_text": row.prompt_text,
            "run_id": row.run_id,
        },
        inputs=((model, probe),),
        hover={"topk": topk, "gen_rank": rank, "gen_logq": logq, "top1_match": match, "tokens": texts},
        settling={"layers": settle, "n_layers": row.n_layers} if settle and row.n_layers else None,
    )


def _arrays(rows, layers, n_cols):
    return arrays_from_rows(rows, layers, n_cols, (np.nan, 0, None, np.nan, np.nan, None))
