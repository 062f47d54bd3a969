"""The dataset card of an exported run: README.md with a Hugging Face YAML header.

The header is emitted by a YAML emitter, never by string formatting: every string that does not
look like a plain word is double-quoted with YAML's escapes (line breaks, U+2028 and the like
included), so no value can end the header or add a key; `header()` checks that its text reads
back to the same mapping and has no line `---` inside. In the Markdown body every value from
the store is escaped (`md`): HTML's `& < >` as entities, Markdown's punctuation with a
backslash, and every kind of line break as a space. This module never imports torch.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from klstore.errors import KlstoreError

# What each column means (docs/conventions.md); a column without an entry is named with its type.
DEFINITIONS = {
    "run_id": "the run: its name and a hash of everything that defines its work",
    "model": "the model's label in the store",
    "probe": "what produced Q: a read-out (`logit_lens`, `tuned_lens`, ...) or an intervention on block `layer`",
    "prompt_id": "the prompt's id",
    "prompt_group": "the prompt's group",
    "layer": "decoder block l, 0-based as in `model.model.layers[l]` (GPT-2: `transformer.h[l]`); "
    "the probe reads or changes that block's output residual stream",
    "gen_idx": "generated token t (Gen t); its position is the one that predicts Gen t under teacher forcing",
    "kl": "KL(P || Q) = sum P (log P - log Q) in nats (forward KL), float32; P is the clean model's "
    "next-token distribution at that position, Q the probe's; null when not asked for or not finite",
    "kl_reverse": "KL(Q || P) in nats, float32; null when not asked for or not finite",
    "js": "Jensen-Shannon divergence of P and Q in nats, 0 <= js <= ln 2, float32; null when not asked for",
    "top1_match": "whether argmax Q equals Gen t",
    "n_layers": "the model's number of decoder blocks",
    "topk_ids": "the k most probable tokens under Q, most probable first",
    "topk_probs": "Q of each of `topk_ids`",
    "gen_rank": "1 + the number of tokens more probable than Gen t under Q (1: Q predicts Gen t)",
    "gen_logq": "log Q(Gen t) in nats",
    "q_entropy": "the entropy of Q in nats, float32 (a property of Q, not a divergence)",
    "lens": "the kind of lens that read the row: logit, tuned, least_squares, jacobian "
    "(interventions read the model's own output: logit)",
    "lens_id": "the lens: the first 16 hex digits of SHA-256 over its parameters (`logit` for the logit lens)",
    "token_id": "a vocabulary id",
    "token_text": "the id's text, `tokenizer.decode([id])`",
    "logprob": "log P(Gen t) in nats, under the clean model",
    "entropy": "the entropy of P (the clean model's distribution) in nats",
    "prompt_text": "the prompt",
    "source_text": "the patch probe's source prompt",
    "n_prompt_tokens": "the prompt's length in tokens",
    "n_generated": "how many tokens were generated (fewer than asked when an end-of-sequence token came)",
    "stopped_at_eos": "whether generation stopped at an end-of-sequence token",
    "status": "ok, or why not (error, nonfinite); for a run: running, completed, failed",
    "error": "the one-line reason when not ok",
    "noise_floor": "max |divergence computed in its batch - computed alone| over the cells compared: "
    "differences below it are rounding",
    "config": "the run's configuration and identity (JSON)",
    "fingerprint": "the model fingerprint: 16 hex digits of SHA-256 over every parameter's name and shape "
    "and the float32 unembedding",
    "rank": "the token's rank under Q (1 = most probable)",
    "name": "the run's name",
    "created_at": "when the run (or shard attempt) started, UTC",
    "updated_at": "when the run's row was last written, UTC",
    "klstore_version": "the klstore that computed the run",
    "torch_version": "the torch that computed the run",
    "transformers_version": "the transformers that computed the run",
    "shard_key": "the shard: a hash of its prompt ids",
    "node": "the machine that computed the shard attempt",
    "actor": "the Ray actor of the attempt (local: one process)",
    "device": "the device the attempt ran on",
    "started_at": "when the shard attempt started, UTC",
    "ended_at": "when the shard attempt ended, UTC",
    "prompts": "the prompts of the shard attempt",
    "cells": "the kl rows the attempt computed",
    "cells_per_second": "the attempt's kl rows per second",
    "outcome": "ok, failed (an error in the shard) or lost (its actor died)",
    "prob": "Q of the token",
}

_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./+-]*$")  # a string YAML may leave unquoted


class _Dumper(yaml.SafeDumper):
    """Safe YAML whose strings are double-quoted (with escapes) unless they are plain words,
    with every repeated value written out (no anchors)."""

    def ignore_aliases(self, data) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = None if _PLAIN.match(value) else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def header(data: dict[str, Any]) -> str:
    """`data` as the YAML between the card's `---` lines (ends with a newline)."""
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=2**31 - 1)
    if yaml.safe_load(text) != data or any(line.strip() in ("---", "...") for line in text.splitlines()):
        raise KlstoreError("the dataset card's header does not read back as written (a value YAML cannot hold)")
    return text


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")  # what makes markup inside a line (and a table cell)
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def md(value: Any) -> str:
    """A value as Markdown text that renders as itself: on one line, no HTML, no markup."""
    text = "null" if value is None else str(value)
    text = _LINE_BREAKS.sub(" ", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text).strip()


def split(card: str) -> tuple[dict, str]:
    """(the YAML header as a mapping, the Markdown body) of a card this module wrote."""
    lines = card.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        raise KlstoreError("the dataset card has no YAML header")
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end])), "\n".join(lines[end + 1 :])


def render(meta: dict[str, Any], columns: dict[str, list[tuple[str, str]]]) -> str:
    """The card: `meta` (configs, and the run's provenance under `klstore`) as the header, and
    the same in words. `columns`: per config, its (column, type) pairs."""
    k = meta["klstore"]
    rows = k["rows"]
    out = ["---", header(meta).rstrip("\n"), "---", ""]
    out += [
        f"# klstore run {md(k['run_id'])}",
        "",
        "Layer x generated-token divergence maps of a causal language model, computed by klstore "
        "and exported with `klstore export`. Every table is Parquet; each config below is one table.",
        "",
        "```python",
        "from datasets import load_dataset",
        'kl = load_dataset("<this folder or repository>", "kl")["train"]',
        "```",
        "",
        "| config | rows | columns |",
        "|---|---|---|",
    ]
    for config in columns:
        names = ", ".join(md(name) for name, _ in columns[config])
        out.append(f"| {md(config)} | {rows.get(config, 0)} | {names} |")
    out += ["", "## Provenance", "", "| | |", "|---|---|"]
    models = "; ".join(
        f"{md(m['label'])} ({md(m['name'])}, dtype {md(m['dtype'])}, fingerprint "
        f"{', '.join(md(f) for f in m['fingerprints']) or 'not recorded'})"
        for m in k["models"]
    )
    lenses = "; ".join(
        f"{md(lens['probe'])}: {md(lens['kind'])} {md(lens['id'])}"
        + ("" if lens["id"] == "logit" else f" (files {'included' if lens['files'] else 'not in the store'})")
        for lens in k["lenses"]
    )
    facts = [
        ("run", f"{md(k['run_id'])} (name {md(k['run_name'])}, status {md(k['status'])})"),
        ("models", models),
        ("probes", ", ".join(md(p) for p in k["probe_names"])),
        ("layers", f"{md(k['layers'])}; stored: {', '.join(str(int(x)) for x in k['layers_stored'])}"),
        ("divergences", ", ".join(md(d) for d in k["divergences"])),
        ("lenses", lenses),
        ("prompt set (SHA-256)", md(k["prompts_sha256"])),
        ("noise floor (nats)", md(k["noise_floor"])),
        ("klstore version", f"{md(k['klstore_version'])} (exported by {md(k['exported_by'])})"),
        ("torch, transformers", f"{md(k['torch_version'])}, {md(k['transformers_version'])}"),
    ]
    out += [f"| {name} | {value} |" for name, value in facts]
    out += [
        "",
        "## What the numbers mean",
        "",
        "For each prompt the clean model generates Gen 0 .. Gen N-1; every probe is then evaluated on "
        "the prompt plus that continuation (teacher forcing). P is the clean model's next-token "
        "distribution at a position, Q the probe's distribution there (read through the row's lens, "
        "or the model's output under the intervention). Divergences are computed from log-softmax in "
        "float32 or wider; a non-finite value is stored as null, never as a number. The noise floor "
        "is the largest difference between a prompt computed in its batch and alone: differences "
        "below it are rounding. Full definitions: klstore's docs/conventions.md.",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    seen: dict[str, str] = {}
    for config_columns in columns.values():
        for name, kind in config_columns:
            seen.setdefault(name, kind)
    for name, kind in seen.items():
        out.append(f"| {md(name)} | {md(kind)} | {md(DEFINITIONS.get(name, 'see docs/conventions.md'))} |")
    out += [
        "",
        "## Files",
        "",
        "`data/<config>/` holds each config's Parquet files; `lens_files/<lens id>/` the fitted lenses "
        "the run read through (tuned-lens format); `klstore-export.json` the SHA-256, size and row "
        "count of every file, which `klstore import <folder> --store <store>` checks before it writes "
        "the run into a store, under the same run id.",
        "",
    ]
    return "\n".join(out)
