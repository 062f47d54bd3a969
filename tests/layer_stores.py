"""Stores computed on layer subsets, for the report's `layers: stored` tests (issue 25).

One store, built from real computed rows of tiny random Llamas (toy tokenizer):

| model   | depth | run    | prompts (group)        | layers stored        |
|---------|-------|--------|------------------------|----------------------|
| `deep`  | 28    | `r1`   | p0, p1 (a), p2, p3 (b) | 0, 15-21, 27 (SEED)  |
| `half`  | 14    | `r1`   | the same               | 0, 7-13              |
| `union` | 28    | `u1`   | p0, p1 (a)             | 0, 15-17             |
| `union` | 28    | `u2`   | p2, p3 (b)             | 17, 26-27            |

and, for a normal full-layer report, `full`: 4 layers, every layer stored (run `r1`).
"""

from __future__ import annotations

import torch
import transformers
from tiny_models import ToyTokenizer

from klstore.core.models import from_objects
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt
from klstore.store import open_store

SEED = "0,15-21,27"  # the seed figure's layers (../shared/CONVENTIONS.md)
SEED_LAYERS = (0, 15, 16, 17, 18, 19, 20, 21, 27)
PROMPTS = [
    Prompt("p0", "The quick brown fox", "a"),
    Prompt("p1", "A lazy dog sleeps", "a"),
    Prompt("p2", "One two three four", "b"),
    Prompt("p3", "Five six seven", "b"),
]
LAYERS = {"deep": SEED, "half": "0,7-13"}
DEPTHS = {"deep": 28, "half": 14, "union": 28, "full": 4}
UNION = (("u1", PROMPTS[:2], "0,15-17"), ("u2", PROMPTS[2:], "17,26-27"))
UNION_LAYERS = (0, 15, 16, 17, 26, 27)


def llama(n_layers: int, seed: int = 7):
    """A tiny random Llama of `n_layers` blocks (weights spread out so KLs are not ~0)."""
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model.eval()


def _job(layers: str) -> ComputeSpec:
    return ComputeSpec((ProbeSpec("logit_lens"),), layers, ("kl",), GenerationSpec(3))


def build_store(uri: str) -> str:
    """The store of the table above; returns its uri."""
    for seed, (label, layers) in enumerate(LAYERS.items()):
        worker = Worker(label, label, uri, loaded=from_objects(label, llama(DEPTHS[label], seed), ToyTokenizer()))
        worker.run_shard("r1", PROMPTS, _job(layers))
    worker = Worker("union", "union", uri, loaded=from_objects("union", llama(28, 7), ToyTokenizer()))
    for run_id, prompts, layers in UNION:
        worker.run_shard(run_id, prompts, _job(layers))
    worker = Worker("full", "full", uri, loaded=from_objects("full", llama(4, 3), ToyTokenizer()))
    worker.run_shard("r1", PROMPTS, _job("all"))
    store = open_store(uri)
    for run_id in ("r1", "u1", "u2"):
        store.write_run(run_id, run_id, "completed", {}, {})
    return uri
