"""Engine results -> store rows (pyarrow tables). Uses numpy only, never torch.

A `PromptOutcome` is what one model did with one prompt: either its KL
matrices (one per probe, sharing one generation) or the error that stopped it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from klstore.spec import DIVERGENCES, Prompt
from klstore.store.tables import (
    ATTEMPT_PREFIX,
    GENERATIONS_SCHEMA,
    KL_SCHEMA,
    LENS_EVAL_SCHEMA,
    LENSES_SCHEMA,
    PROMPTS_SCHEMA,
    SHARDS_SCHEMA,
    TOKENS_SCHEMA,
)


@dataclass(frozen=True)
class PromptOutcome:
    prompt: Prompt
    matrices: tuple = ()  # klstore.core.readout.KLMatrix per probe
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if any(m.errors for m in self.matrices):
            return "nonfinite"
        return "ok"


def _float_column(matrix, name: str, shape) -> np.ndarray | None:
    values = matrix.values.get(name)
    return None if values is None else values.astype(np.float32).reshape(-1)


def kl_rows(outcomes, probe: str) -> pa.Table:
    """The `kl` rows of one probe over several prompts. Non-finite values become null."""
    parts = []
    for outcome in outcomes:
        for m in outcome.matrices:
            if m.probe != probe:
                continue
            n_rows, n_cols = len(m.layers), m.generation.n
            count = n_rows * n_cols
            columns = {
                "prompt_id": pa.array([m.prompt.id] * count, pa.string()),
                "prompt_group": pa.array([m.prompt.group] * count, pa.string()),
                "layer": pa.array(np.repeat(np.asarray(m.layers, np.int16), n_cols)),
                "gen_idx": pa.array(np.tile(np.arange(n_cols, dtype=np.int16), n_rows)),
                "top1_match": pa.array(m.top1_match.reshape(-1)),
                "n_layers": pa.array(np.full(count, m.n_layers_total, np.int16)),
            }
            columns.update(_lens_columns(m, count))
            columns["lens"] = pa.array([m.lens] * count, pa.string())
            columns["lens_id"] = pa.array([m.lens_id] * count, pa.string())
            if m.q_entropy is None:
                columns["q_entropy"] = pa.nulls(count, pa.float32())
            else:
                entropy = m.q_entropy.astype(np.float32).reshape(-1)
                columns["q_entropy"] = pa.array(entropy, mask=~np.isfinite(entropy))
            for name in DIVERGENCES:
                flat = _float_column(m, name, (n_rows, n_cols))
                if flat is None:
                    columns[name] = pa.nulls(count, pa.float32())
                else:
                    columns[name] = pa.array(flat, mask=~np.isfinite(flat))
            parts.append(pa.table(columns).select(KL_SCHEMA.names).cast(KL_SCHEMA))
    return pa.concat_tables(parts) if parts else KL_SCHEMA.empty_table()


def _lens_columns(m, count: int) -> dict:
    """topk_ids/topk_probs (lists of k per cell; null when k = 0), gen_rank and gen_logq (null when
    not finite, or when the matrix has none)."""
    out = {}
    if m.topk_ids is None or m.topk_ids.shape[-1] == 0:
        out["topk_ids"] = pa.nulls(count, pa.list_(pa.int32()))
        out["topk_probs"] = pa.nulls(count, pa.list_(pa.float32()))
    else:
        k = m.topk_ids.shape[-1]
        offsets = pa.array(np.arange(0, (count + 1) * k, k, dtype=np.int32))
        out["topk_ids"] = pa.ListArray.from_arrays(offsets, pa.array(m.topk_ids.reshape(-1).astype(np.int32)))
        out["topk_probs"] = pa.ListArray.from_arrays(offsets, pa.array(m.topk_probs.reshape(-1).astype(np.float32)))
    if m.gen_rank is None:
        out["gen_rank"] = pa.nulls(count, pa.int32())
        out["gen_logq"] = pa.nulls(count, pa.float32())
    else:
        logq = m.gen_logq.astype(np.float32).reshape(-1)
        out["gen_rank"] = pa.array(m.gen_rank.reshape(-1).astype(np.int32))
        out["gen_logq"] = pa.array(logq, mask=~np.isfinite(logq))
    return out


def lens_rows(rows: list[dict]) -> pa.Table:
    """`lenses` rows (store.tables.LENSES_SCHEMA) from dicts with its columns."""
    return pa.Table.from_pylist([{name: row.get(name) for name in LENSES_SCHEMA.names} for row in rows], LENSES_SCHEMA)


def lens_eval_rows(rows: list[dict]) -> pa.Table:
    """`lens_eval` rows (store.tables.LENS_EVAL_SCHEMA); a non-finite kl is stored as null."""
    clean = []
    for row in rows:
        values = {name: row.get(name) for name in LENS_EVAL_SCHEMA.names}
        if values["kl"] is not None and not np.isfinite(values["kl"]):
            values["kl"] = None
        clean.append(values)
    return pa.Table.from_pylist(clean, LENS_EVAL_SCHEMA)


def token_rows(texts) -> pa.Table:
    """A model's vocabulary: token id i has text texts[i] (the `tokens` table)."""
    return pa.table(
        {"token_id": pa.array(np.arange(len(texts), dtype=np.int32)), "token_text": pa.array(list(texts), pa.string())},
        schema=TOKENS_SCHEMA,
    )


def tokens_file_name(texts) -> str:
    """vocab-<16 hex of the texts' SHA-256>.parquet: one file per distinct vocabulary."""
    import hashlib

    digest = hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"vocab-{digest}.parquet"


def generation_rows(outcomes) -> pa.Table:
    rows: dict[str, list[Any]] = {name: [] for name in GENERATIONS_SCHEMA.names}
    for outcome in outcomes:
        if not outcome.matrices:
            continue
        first = outcome.matrices[0]
        gen = first.generation
        for idx, (token, text) in enumerate(zip(gen.token_ids, gen.token_texts)):
            rows["prompt_id"].append(first.prompt.id)
            rows["prompt_group"].append(first.prompt.group)
            rows["gen_idx"].append(idx)
            rows["token_id"].append(int(token))
            rows["token_text"].append(text)
            rows["logprob"].append(float(first.gen_logprob[idx]))
            rows["entropy"].append(float(first.gen_entropy[idx]))
    return pa.table(rows, schema=GENERATIONS_SCHEMA)


def prompt_rows(outcomes) -> pa.Table:
    rows: dict[str, list[Any]] = {name: [] for name in PROMPTS_SCHEMA.names}
    for outcome in outcomes:
        prompt = outcome.prompt
        gen = outcome.matrices[0].generation if outcome.matrices else None
        errors = [e for m in outcome.matrices for e in m.errors]
        rows["prompt_id"].append(prompt.id)
        rows["prompt_group"].append(prompt.group)
        rows["prompt_text"].append(prompt.text)
        rows["source_text"].append(prompt.source)
        rows["n_prompt_tokens"].append(len(gen.prompt_ids) if gen else None)
        rows["n_generated"].append(gen.n if gen else 0)
        rows["stopped_at_eos"].append(gen.stopped_at_eos if gen else None)
        rows["status"].append(outcome.status)
        rows["error"].append(outcome.error or ("; ".join(errors[:20]) if errors else None))
    return pa.table(rows, schema=PROMPTS_SCHEMA)


def shard_attempt_row(
    shard_key: str,
    where: dict,
    started_at,
    ended_at,
    prompts: int,
    cells: int | None,
    outcome: str,
    error: str | None = None,
    noise_floor: float | None = None,
) -> pa.Table:
    """The `shards` row of one shard attempt. `where`: node, actor, device (Worker.describe());
    `started_at`, `ended_at`: timezone-aware datetimes; `outcome`: ok, failed or lost."""
    seconds = (ended_at - started_at).total_seconds()
    rate = cells / seconds if cells is not None and seconds > 0 else None
    row = {
        "shard_key": [shard_key],
        "node": [where.get("node")],
        "actor": [where.get("actor")],
        "device": [where.get("device")],
        "started_at": [started_at],
        "ended_at": [ended_at],
        "prompts": [prompts],
        "cells": [cells],
        "cells_per_second": [rate],
        "outcome": [outcome],
        "error": [error],
        "noise_floor": [noise_floor],
        "fingerprint": [where.get("fingerprint")],
    }
    return pa.table(row, schema=SHARDS_SCHEMA)


def attempt_file_name(shard_key: str) -> str:
    """attempt-<shard key>-<uuid8>.parquet: attempts of one shard never replace each other."""
    import uuid

    return f"{ATTEMPT_PREFIX}{shard_key}-{uuid.uuid4().hex[:8]}.parquet"
