"""Slow, independent float64 implementations used to check the engine.

One full hooked forward per layer through the model's own `forward` (so its own
final norm, head and soft-capping), divergences written out from their
definitions in float64. Shares no code with klstore: even the seeded noise of the
noise probe is derived here from its documented rule.
"""

from __future__ import annotations

import hashlib
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


def noise(seed: int, prompt_id: str, layer: int, shape) -> torch.Tensor:
    """The noise probe's standard normal draw (float32), from the rule documented at
    klstore.core.probes.noise_seed: the generator seed is the first 8 bytes, little-endian,
    of sha256("{seed}\x1f{prompt_id}\x1f{layer}"), with the top bit cleared."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{layer}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


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


def _sublayer(block, which):
    names = ("self_attn", "attn", "attention") if which == "attn" else ("mlp", "feed_forward")
    return next(getattr(block, n) for n in names if hasattr(block, n))


def _block_outputs_at_last(model64, ids):
    """(n_layers, H) block outputs at the last position, by hooks on a full forward."""
    captured = []
    blocks = _blocks(model64)
    handles = [b.register_forward_hook(lambda m, a, o: captured.append(_first(o)[0, -1])) for b in blocks]
    model64(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return torch.stack(captured)


@torch.no_grad()
def reference_matrices(
    model64, sequence, n_prompt, n_gen, probe, layers, params=None, return_margin=False, return_logq=False
):
    """{divergence: (len(layers), n_gen) float64} and top1 (len(layers), n_gen) = argmax Q.
    With return_margin, also the (len(layers), n_gen) gap in nats between Q's two most
    likely tokens (a near tie there may be broken either way in float32).

    params (interventions): noise {scale, seed, prompt_id}, steer {alpha, vectors (L, H)},
    patch {source_ids}.
    With return_logq, the last element returned is log Q, (len(layers), n_gen, V) float64.
    """
    params = params or {}
    ids = torch.tensor([sequence])
    pos = list(range(n_prompt - 1, n_prompt - 1 + n_gen))
    clean = model64(input_ids=ids, use_cache=False).logits[0, pos]
    blocks = _blocks(model64)
    rows = {name: [] for name in ("kl", "kl_reverse", "js")}
    top1, margin, logqs = [], [], []
    for layer in layers:
        if probe in ("logit_lens", "tuned_lens"):
            store = {}
            handle = blocks[layer].register_forward_hook(lambda m, a, o, store=store: store.setdefault("h", _first(o)))
            model64(input_ids=ids, use_cache=False)
            handle.remove()
            h = store["h"]
            if probe == "tuned_lens":  # params: weight (L, H, H), bias (L, H); h + W_l h + b_l
                h = h + h @ params["weight"][layer].double().T + params["bias"][layer].double()
            q = _softcap(model64, model64.get_output_embeddings()(_final_norm(model64)(h)))[0, pos]
        elif probe in ("ablate_attn", "ablate_mlp"):

            def zero(module, args, output):
                if isinstance(output, tuple):
                    return (torch.zeros_like(output[0]),) + tuple(output[1:])
                return torch.zeros_like(output)

            handle = _sublayer(blocks[layer], probe.removeprefix("ablate_")).register_forward_hook(zero)
            q = model64(input_ids=ids, use_cache=False).logits[0, pos]
            handle.remove()
        elif probe in ("noise", "steer", "patch"):

            def change(module, args, output, layer=layer):
                h = _first(output)
                if probe == "noise":
                    rms = h.pow(2).mean(-1, keepdim=True).sqrt()
                    draw = noise(params["seed"], params["prompt_id"], layer, h.shape[1:]).double()
                    new = h + params["scale"] * rms * draw
                elif probe == "steer":
                    new = h + params["alpha"] * params["vectors"][layer].double()
                else:
                    new = h.clone()
                    new[0, n_prompt - 1] = source[layer]  # noqa: B023 - set before this hook runs, same iteration
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

            if probe == "patch":
                source = _block_outputs_at_last(model64, params["source_ids"])
            handle = blocks[layer].register_forward_hook(change)
            q = model64(input_ids=ids, use_cache=False).logits[0, pos]
            handle.remove()
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
        best2 = q.double().log_softmax(-1).topk(2, dim=-1).values
        margin.append(best2[..., 0] - best2[..., 1])
        logqs.append(q.double().log_softmax(-1))
    out = {name: torch.stack(v) for name, v in rows.items()}
    result = (out, torch.stack(top1)) + ((torch.stack(margin),) if return_margin else ())
    return result + ((torch.stack(logqs),) if return_logq else ())


LN2 = math.log(2.0)
