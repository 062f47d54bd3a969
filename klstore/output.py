"""What the CLI prints: KL matrices as text tables or JSON, and query results as table, CSV or JSON."""

from __future__ import annotations

import csv
import functools
import io
import json

from klstore.errors import KlstoreError

FORMATS = ("table", "csv", "json")

# How whitespace and control characters in a token are shown (CLI tables, figure axes, report).
_VISIBLE = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible_token(text: str | None) -> str:
    """A token's text with every whitespace or control character made visible: a space is
    `\u2423`, newline/tab/return are `\\n`/`\\t`/`\\r`, other control or invisible characters
    `\\xNN`/`\\uNNNN`. None (no text known) is `?`; the empty string is `\u2205`."""
    if text is None:
        return "?"
    if text == "":
        return "\u2205"
    out = []
    for char in text:
        if char in _VISIBLE:
            out.append(_VISIBLE[char])
        elif not char.isprintable() or char.isspace():
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def format_table(matrix, divergence_names=None) -> str:
    """Rows = layers, columns = Gen t with its token text; one table per divergence."""
    gen = matrix.generation
    lines = []
    heads = [f"Gen{i} {json.dumps(text, ensure_ascii=False)}" for i, text in enumerate(gen.token_texts)]
    width = max([10] + [len(h) for h in heads])
    for name in divergence_names or matrix.values:
        values = matrix.values[name]
        lines.append(
            f"{matrix.model} | prompt {matrix.prompt.id} | probe {matrix.probe} | {name} (nats)"
            + (" | stopped at EOS" if gen.stopped_at_eos else "")
        )
        lines.append("layer " + " ".join(h.rjust(width) for h in heads))
        for row, layer in enumerate(matrix.layers):
            cells = ("n/a" if v != v else f"{v:.4f}" for v in values[row])
            lines.append(f"{layer:>5} " + " ".join(c.rjust(width) for c in cells))
        lines.append("")
    return "\n".join(lines)


def format_tokens(matrix, decode, width: int = 12) -> str:
    """The classic logit-lens table: rows = layers, columns = Gen t, each cell the top-1 token
    of Q_{l,t} (whitespace made visible, cut to `width` characters)."""
    gen = matrix.generation
    if matrix.topk_ids is None or matrix.topk_ids.shape[-1] == 0:
        raise KlstoreError("no lens tokens were computed (topk = 0)")
    heads = [f"Gen{i} {visible_token(text)}" for i, text in enumerate(gen.token_texts)]
    col = max([width] + [len(h) for h in heads])
    token_text = _decoded_once(decode)

    def shown(token: int) -> str:
        visible = visible_token(token_text(token))
        return visible if len(visible) <= width else visible[: width - 1] + "\u2026"

    lines = [
        f"{matrix.model} | prompt {matrix.prompt.id} | probe {matrix.probe} | top-1 token of Q per layer"
        + (" | stopped at EOS" if gen.stopped_at_eos else ""),
        "layer " + " ".join(h.rjust(col) for h in heads),
    ]
    for row, layer in enumerate(matrix.layers):
        lines.append(f"{layer:>5} " + " ".join(shown(int(t)).rjust(col) for t in matrix.topk_ids[row, :, 0]))
    lines.append("")
    return "\n".join(lines)


def lens_json(matrix, decode) -> dict:
    """Per layer and generated token: the top-k tokens of Q (id, text, prob) and the generated
    token's rank and log-probability under Q."""
    if matrix.topk_ids is None:
        return {"topk": None, "gen_rank": None, "gen_logq": None}
    token_text = _decoded_once(decode)
    topk = [
        [
            [{"id": int(t), "text": token_text(int(t)), "prob": float(p)} for t, p in zip(ids, probs)]
            for ids, probs in zip(row_ids, row_probs)
        ]
        for row_ids, row_probs in zip(matrix.topk_ids, matrix.topk_probs)
    ]
    return {"topk": topk, "gen_rank": matrix.gen_rank.tolist(), "gen_logq": _nan_to_none(matrix.gen_logq)}


def _decoded_once(decode):
    """token id -> `decode([id])`, each id decoded once: a table shows the same tokens in many cells."""
    return functools.cache(lambda token: decode([token]))


def _nan_to_none(array):
    return [[None if v != v else float(v) for v in row] for row in array.tolist()]


def results_to_json(model: str, results, decode=None) -> dict:
    """The CLI's --json document; with `decode` (token ids -> text) each probe also carries its
    lens tokens (`lens_json`)."""
    prompts = []
    for matrices in results:
        first = matrices[0]
        gen = first.generation
        prompts.append(
            {
                "id": first.prompt.id,
                "group": first.prompt.group,
                "text": first.prompt.text,
                "n_prompt_tokens": len(gen.prompt_ids),
                "stopped_at_eos": gen.stopped_at_eos,
                "tokens": [
                    {"id": t, "text": s, "logprob": float(lp), "entropy": float(h)}
                    for t, s, lp, h in zip(gen.token_ids, gen.token_texts, first.gen_logprob, first.gen_entropy)
                ],
                "probes": [
                    {
                        "probe": m.probe,
                        "params": m.probe_params,
                        "layers": list(m.layers),
                        "matrices": {name: _nan_to_none(v) for name, v in m.values.items()},
                        "top1_match": m.top1_match.tolist(),
                        "q_entropy": None if m.q_entropy is None else _nan_to_none(m.q_entropy),
                        "errors": list(m.errors),
                        **(lens_json(m, decode) if decode is not None else {}),
                    }
                    for m in matrices
                ],
            }
        )
    return {"model": model, "prompts": prompts}


def format_rows(names, rows, fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        return json.dumps([dict(zip(names, row)) for row in rows], default=str, indent=1)
    if fmt not in FORMATS:
        raise KlstoreError(f"unknown --format {fmt!r}: choose table, csv or json")
    shown = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in shown]) for i, n in enumerate(names)]
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in shown]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\n", "\\n")
