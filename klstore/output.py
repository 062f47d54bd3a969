"""What the CLI prints: KL matrices as text tables or JSON, and query results as table, CSV or JSON."""

from __future__ import annotations

import csv
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
        lines.append(f"{matrix.model} | prompt {matrix.prompt.id} | probe {matrix.probe} | {name} (nats)"
                     + (" | stopped at EOS" if gen.stopped_at_eos else ""))
        lines.append("layer " + " ".join(h.rjust(width) for h in heads))
        for row, layer in enumerate(matrix.layers):
            cells = ("n/a" if v != v else f"{v:.4f}" for v in values[row])
            lines.append(f"{layer:>5} " + " ".join(c.rjust(width) for c in cells))
        lines.append("")
    return "\n".join(lines)


def _nan_to_none(array):
    return [[None if v != v else float(v) for v in row] for row in array.tolist()]


def results_to_json(model: str, results) -> dict:
    prompts = []
    for matrices in results:
        first = matrices[0]
        gen = first.generation
        prompts.append({
            "id": first.prompt.id, "group": first.prompt.group, "text": first.prompt.text,
            "n_prompt_tokens": len(gen.prompt_ids), "stopped_at_eos": gen.stopped_at_eos,
            "tokens": [{"id": t, "text": s, "logprob": float(lp), "entropy": float(h)}
                       for t, s, lp, h in zip(gen.token_ids, gen.token_texts, first.gen_logprob,
                                              first.gen_entropy)],
            "probes": [{
                "probe": m.probe, "params": m.probe_params, "layers": list(m.layers),
                "matrices": {name: _nan_to_none(v) for name, v in m.values.items()},
                "top1_match": m.top1_match.tolist(), "errors": list(m.errors),
            } for m in matrices],
        })
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
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in shown]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\n", "\\n")
