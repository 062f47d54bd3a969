"""Tiny random-weight models, one per supported architecture family, and a toy tokenizer."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


class ToyTokenizer:
    """Characters -> ids (mod VOCAB); id 0 is EOS. Enough for engine tests."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}

    def decode(self, ids):
        return "".join(chr(32 + i % 90) for i in ids)


def _configs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return {
        "llama": transformers.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": transformers.Qwen2Config(num_key_value_heads=2, **common),
        "gemma3": transformers.Gemma3TextConfig(
            num_key_value_heads=1, head_dim=8, sliding_window=4, final_logit_softcapping=5.0, **common
        ),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128),
        "gpt_neox": transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
    }


FAMILIES = tuple(_configs())


def build(family: str, dtype=torch.float32):
    """A tiny model of the family with seeded random weights (spread out so KLs are not ~0)."""
    config = _configs()[family]
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model.to(dtype).eval()
