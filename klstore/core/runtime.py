"""One loaded model as the engine's passes call it (generation, tracing, sweeps, read-out).

`ModelRuntime` is built once per model (`ModelRuntime.of`): the adapter (blocks, final
norm, head), checked on a few tokens, and the facts about the model's forward and its
tokens that every pass needs (the keyword its KV cache goes under, whether it can keep
only the last position's logits, its end-of-sequence and padding ids, its context).
`StopForward` is how a pass stops a forward after the last decoder block: the head
never runs on positions nobody reads.
Shapes: B batch rows, T positions, H hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from klstore.core.adapter import Adapter
from klstore.core.models import LoadedModel


class StopForward(Exception):
    """Raised by the last decoder block's (hooked or replaced) forward, carrying its output."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@dataclass(frozen=True)
class ModelRuntime:
    """A loaded model with what its passes need to call it."""

    loaded: LoadedModel
    adapter: Adapter
    hidden_size: int
    keep_kwargs: dict[str, int] = field(default_factory=dict)  # {"logits_to_keep": 1} where accepted
    cache_arg: str = "past_key_values"  # transformers >= 5.x renamed it to `cache`
    eos: frozenset[int] = frozenset()
    pad_id: int = 0
    context_length: int | None = None  # max positions, where the config says

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelRuntime:
        """Discover and verify the model's structure (`Adapter`) and read its forward's keywords
        and its tokens' ids."""
        model, tokenizer = loaded.model, loaded.tokenizer
        adapter = Adapter.discover(model)
        vocab, hidden_size = model.get_output_embeddings().weight.shape
        adapter.verify(model, torch.arange(min(4, vocab), device=loaded.device)[None] + 1)
        params = inspect.signature(model.forward).parameters
        eos = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        text_config = model.config.get_text_config()
        return cls(
            loaded=loaded,
            adapter=adapter,
            hidden_size=hidden_size,
            keep_kwargs={"logits_to_keep": 1} if "logits_to_keep" in params else {},
            cache_arg="cache" if "cache" in params else "past_key_values",
            eos=frozenset(eos),
            pad_id=pad if isinstance(pad, int) else (min(eos) if eos else 0),
            context_length=getattr(text_config, "max_position_embeddings", None)
            or getattr(text_config, "n_positions", None),
        )

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def device(self) -> Any:
        return self.loaded.device

    @property
    def label(self) -> str:
        return self.loaded.label

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, position ids), each (B, T), sequences padded on the left."""
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)


def _eos_ids(model, tokenizer) -> set[int]:
    """The end-of-sequence ids of the model's generation config and its tokenizer."""
    ids: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# matmul_precision -> float32 matmul precision of (CUDA, oneDNN: the CPU), in torch's per-backend API.
# (The legacy torch.set_float32_matmul_precision raises once a caller has used the per-backend one.)
_MATMUL_PRECISION = {"highest": ("ieee", "ieee"), "high": ("tf32", "ieee"), "medium": ("tf32", "bf16")}


@contextlib.contextmanager
def matmul_precision_of(precision: str):
    """float32 matrix products at `precision` (spec.MATMUL_PRECISIONS) inside the block; the
    caller's own settings are restored after it, whatever they were."""
    # torch.backends.mkldnn.matmul exists at runtime (MkldnnModule replaces the module); its stubs lack it
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)  # type: ignore[attr-defined]
    before = [backend.fp32_precision for backend in backends]
    try:
        for backend, value in zip(backends, _MATMUL_PRECISION[precision]):
            backend.fp32_precision = value
        yield
    finally:
        for backend, value in zip(backends, before):
            backend.fp32_precision = value
