"""Slow, independent float64 implementations used to check the engine.

One full hooked forward per layer through the model's own `forward` (so its own
final norm, head and soft-capping), divergences written out from their
definitions in float64. Shares no code with klstore.engine.
"""

from __future__ import annotations

import math

import torch


def _blocks(model):
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model.gpt_neox
    return base.layers if hasattr(base, "layers") else base.h


def _final_norm(model):
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model.gpt_neox
    for name in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError("no final norm")


def _softcap(model, logits):
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def divergences64(logits_p, logits_q):
    """kl, kl_reverse, js between softmax(logits_p) and softmax(logits_q), float64, last dim."""
    lp = logits_p.double().log_softmax(-1)
    lq = logits_q.double().log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    kl = (p * (lp - lq)).sum(-1)
    kl_rev = (q * (lq - lp)).sum(-1)
    m = 0.5 * (p + q)
    js = 0.5 * (p * (lp - m.log())).sum(-1) + 0.5 * (q * (lq - m.log())).sum(-1)
    return {"kl": kl, "kl_reverse": kl_rev, "js": js}


@torch.no_grad()
def reference_matrices(model64, sequence, n_prompt, n_gen, probe, layers):
    """{divergence: (len(layers), n_gen) float64} and top1 (len(layers), n_gen) for logit_lens / skip."""
    ids = torch.tensor([sequence])
    pos = list(range(n_prompt - 1, n_prompt - 1 + n_gen))
    clean = model64(input_ids=ids, use_cache=False).logits[0, pos]
    blocks = _blocks(model64)
    rows = {name: [] for name in ("kl", "kl_reverse", "js")}
    top1 = []
    for layer in layers:
        if probe == "logit_lens":
            store = {}
            handle = blocks[layer].register_forward_hook(lambda m, a, o: store.setdefault("h", _first(o)))
            model64(input_ids=ids, use_cache=False)
            handle.remove()
            q = _softcap(model64, model64.get_output_embeddings()(_final_norm(model64)(store["h"])))[0, pos]
        elif probe == "skip":
            def replace(module, args, kwargs, output):
                hidden = args[0] if args else kwargs["hidden_states"]
                return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
            handle = blocks[layer].register_forward_hook(replace, with_kwargs=True)
            q = model64(input_ids=ids, use_cache=False).logits[0, pos]
            handle.remove()
        else:
            raise ValueError(probe)
        for name, value in divergences64(clean, q).items():
            rows[name].append(value)
        top1.append(q.argmax(-1))
    out = {name: torch.stack(v) for name, v in rows.items()}
    return out, torch.stack(top1)


LN2 = math.log(2.0)
