"""Prompt text -> token ids -> the clean model's continuation (docs/conventions.md, 1).

`encode` applies the chat template where asked and checks the context; `generate_batch`
continues several prompts at once, left-padded over one KV cache, greedy or sampled with
one generator per row seeded alike (`sampling_probs`), so a prompt continues as it would
alone. It stops a row after its end-of-sequence token (kept) and the batch when every row
has stopped. Shapes: B batch rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klstore.core.runtime import ModelRuntime
from klstore.errors import KlstoreError
from klstore.spec import GenerationSpec, Prompt


@dataclass(frozen=True)
class Generation:
    """The clean continuation of one prompt."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    token_texts: tuple[str, ...]
    stopped_at_eos: bool

    @property
    def n(self) -> int:
        return len(self.token_ids)


def sampling_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) over the vocabulary (V,), as float32 on the CPU, finite for
    every finite temperature > 0: computed as softmax((logits - max) / temperature) in float64,
    so a tiny temperature tends to greedy (all mass on the largest logits) instead of
    overflowing logits / temperature, and a huge one to uniform."""
    logits = logits.double()
    probs = ((logits - logits.max()) / temperature).softmax(-1)
    if not torch.isfinite(probs).all():
        raise KlstoreError("the model's logits are not finite: cannot sample the next token")
    return probs.float().cpu()


def encode(rt: ModelRuntime, prompt: Prompt, spec: GenerationSpec) -> list[int]:
    """Token ids of the prompt (chat template if spec.chat). Checks emptiness and context."""
    if not prompt.text or not prompt.text.strip():
        raise KlstoreError(f"prompt {prompt.id!r} is empty")
    if spec.chat:
        if not getattr(rt.tokenizer, "chat_template", None):
            raise KlstoreError(f"{rt.label} has no chat template: drop --chat")
        encoded = rt.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True
        )
        ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    else:
        ids = list(rt.tokenizer(prompt.text)["input_ids"])
    if rt.context_length and len(ids) + spec.max_new_tokens > rt.context_length:
        raise KlstoreError(
            f"prompt {prompt.id!r} has {len(ids)} tokens; with {spec.max_new_tokens} new tokens "
            f"that exceeds {rt.label}'s context of {rt.context_length}"
        )
    return ids


@torch.no_grad()
def generate_batch(
    rt: ModelRuntime, prompts_ids: list[list[int]], spec: GenerationSpec, *, record: list | None = None
) -> list[Generation]:
    """Continue several prompts at once (left-padded, one KV cache). Each row samples with
    its own generator seeded by spec.seed, so a prompt continues as it would alone.
    `record`, a list, receives per forward pass the list of every block's output
    (`tracing.generate_traced` builds the clean trace from them)."""
    handles = []
    if record is not None:

        def hook(_module, _args, output):
            record[-1].append(output)

        handles = [block.register_forward_hook(hook) for block in rt.adapter.blocks]
    try:
        return _generate(rt, prompts_ids, spec, record)
    finally:
        for handle in handles:
            handle.remove()


def _generate(rt: ModelRuntime, prompts_ids: list[list[int]], spec: GenerationSpec, record: list | None):
    batch = len(prompts_ids)
    generators = [torch.Generator().manual_seed(spec.seed) for _ in range(batch)] if spec.do_sample else None
    if batch == 1:
        step_ids = torch.tensor(prompts_ids, device=rt.device)
        mask = step_pos = None
    else:
        step_ids, mask, step_pos = rt.left_pad(prompts_ids)
    past = None
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(spec.max_new_tokens):
        extra = {} if mask is None else {"attention_mask": mask, "position_ids": step_pos}
        if record is not None:
            record.append([])
        out = rt.model(input_ids=step_ids, use_cache=True, **{rt.cache_arg: past}, **rt.keep_kwargs, **extra)
        logits = out.logits[:, -1].float()
        chosen = []
        for row in range(batch):
            if done[row]:
                chosen.append(rt.pad_id)
                continue
            if generators is not None:  # spec.do_sample
                token = int(
                    torch.multinomial(sampling_probs(logits[row], spec.temperature), 1, generator=generators[row])
                )
            else:
                token = int(logits[row].argmax())
            tokens[row].append(token)
            done[row] = token in rt.eos
            chosen.append(token)
        if all(done):
            break
        past = getattr(out, "cache", None)
        past = out.past_key_values if past is None else past
        step_ids = torch.tensor(chosen, device=rt.device)[:, None]
        if mask is not None and step_pos is not None:  # left-padded (batch > 1): both or neither
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            step_pos = step_pos[:, -1:] + 1
    return [
        Generation(
            tuple(ids),
            tuple(toks),
            tuple(rt.tokenizer.decode([t]) for t in toks),
            bool(toks) and toks[-1] in rt.eos,
        )
        for ids, toks in zip(prompts_ids, tokens)
    ]
