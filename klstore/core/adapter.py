"""Architecture adapter: where a causal LM keeps its decoder blocks, final norm and head.

The structure is discovered, not looked up in a list of model names:
- blocks: the nn.ModuleList holding `num_hidden_layers` modules;
- final norm: the one norm module beside that list in the same parent;
- head: `get_output_embeddings()`;
- logit post-processing from the config: `final_logit_softcapping` (Gemma),
  `logit_scale` (Cohere, multiplies), `logits_scaling` (Granite, divides).
`verify()` then checks on a few tokens that norm -> head -> post-processing of
the last block's output reproduces the model's own logits, so an architecture
with some other hidden step fails loudly instead of giving wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from klstore.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def n_layers_of(config) -> int | None:
    """The number of decoder blocks a model config declares."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class Adapter:
    blocks: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module
    softcap: float | None = None
    scale: float = 1.0

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @classmethod
    def discover(cls, model: PreTrainedModel) -> Adapter:
        kind = type(model).__name__
        n = n_layers_of(model.config)
        lists = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n
        ]
        if not lists:
            raise UnsupportedArchitecture(f"unsupported architecture {kind}: no list of {n} decoder blocks found")
        block_path, blocks = min(lists, key=lambda item: item[0].count("."))
        parent = model.get_submodule(block_path.rpartition(".")[0])
        norms = [
            (name, mod)
            for name, mod in parent.named_children()
            if "norm" in type(mod).__name__.lower() or name.startswith(("ln_f", "norm"))
        ]
        if len(norms) != 1:
            found = ", ".join(name for name, _ in norms) or "none"
            raise UnsupportedArchitecture(
                f"unsupported architecture {kind}: expected one final norm beside {block_path}, found {found}"
            )
        head = model.get_output_embeddings()
        if head is None:
            raise UnsupportedArchitecture(f"unsupported architecture {kind}: no output embedding (head)")
        config = model.config
        softcap = getattr(config, "final_logit_softcapping", None)
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:
            scale *= float(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:
            scale /= float(config.logits_scaling)
        return cls(blocks, norms[0][1], head, float(softcap) if softcap else None, scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decode residual-stream states with the model's own head. (..., H) -> (..., V) float32."""
        out = self.head(self.final_norm(hidden)).float()
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log_softmax of `logits(hidden)` in float32 (float64 if the model runs in float64)."""
        logits = self.logits(hidden)
        if hidden.dtype == torch.float64:
            logits = logits.double()
        return logits.log_softmax(-1)

    def sublayer(self, block: nn.Module, which: str, layer: int) -> nn.Module:
        """The attention ('attn') or MLP ('mlp') sub-module of a block."""
        names = _ATTN_NAMES if which == "attn" else _MLP_NAMES
        for name in names:
            sub = getattr(block, name, None)
            if isinstance(sub, nn.Module):
                return sub
        raise UnsupportedArchitecture(
            f"block {layer} ({type(block).__name__}) has no recognisable "
            f"{'attention' if which == 'attn' else 'MLP'} sub-module (looked for {', '.join(names)})"
        )

    @torch.no_grad()
    def verify(self, model: nn.Module, input_ids: torch.Tensor) -> None:
        """Check that logits(last block output) equals the model's own logits on `input_ids`."""
        captured: list[torch.Tensor] = []
        handle = self.blocks[-1].register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            reference = model(input_ids=input_ids, use_cache=False).logits.float()
        finally:
            handle.remove()
        mine = self.logits(captured[-1])
        tol = 1e-3 * max(1.0, reference.abs().max().item())
        if reference.shape != mine.shape or (reference - mine).abs().max().item() > tol:
            raise UnsupportedArchitecture(
                f"unsupported architecture {type(model).__name__}: the model's logits are not "
                "final norm -> head -> soft-capping/scaling of the last block's output"
            )
