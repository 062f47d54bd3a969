"""A continuation -> its clean trace: every block's output and the reference distribution P_t.

One teacher-forced clean pass over prompt + continuation (minus its last token) records
every decoder block's output and stops after the last block (`StopForward`); P_t is the
head's log-softmax of the last block's output at the positions that predict Gen t
(docs/conventions.md, 2-3). Several prompts go through one left-padded forward
(`trace_batch`), or the trace is taken from the generation's own forward passes
(`generate_traced`, config `clean_pass: cached`).
Shapes: B batch rows, T positions, H hidden size, V vocabulary, n generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klstore.core.generation import Generation, generate_batch
from klstore.core.runtime import ModelRuntime, StopForward
from klstore.errors import KlstoreError
from klstore.spec import GenerationSpec


@dataclass
class Trace:
    """The clean teacher-forced pass. outputs[k]: block k's (1, T, H) output."""

    generation: Generation
    input_ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (n,) positions predicting Gen0..Gen{n-1}
    outputs: list[torch.Tensor]
    ref_logp: torch.Tensor  # (n, V) log P_t, float32+
    returns_tuple: bool

    @property
    def reference(self) -> torch.Tensor:
        """(n, H): the last block's clean output at the positions predicting Gen t (P's state)."""
        return reference(self.outputs, self.positions)


def reference(outputs: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Trace.reference of these block outputs and positions (`trace_of` needs it before the Trace)."""
    last = outputs[-1]
    return last[0, positions.to(last.device)]


def sequence(generation: Generation) -> list[int]:
    """The teacher-forced input: prompt + continuation minus its last token."""
    return list(generation.prompt_ids) + list(generation.token_ids[:-1])


@torch.no_grad()
def record(
    rt: ModelRuntime,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], bool]:
    """Every block's output (B, T, H) in one clean forward that stops after the last block.
    Also returns whether the blocks return tuples (older transformers) or tensors."""
    outputs: list[torch.Tensor] = []
    kinds: list[bool] = []
    last = rt.adapter.blocks[rt.n_layers - 1]

    def post_hook(module, _args, output):
        kinds.append(isinstance(output, tuple))
        outputs.append(output[0] if isinstance(output, tuple) else output)
        if module is last:
            raise StopForward(outputs[-1])

    handles = [block.register_forward_hook(post_hook) for block in rt.adapter.blocks]
    try:
        extra = {} if attention_mask is None else {"attention_mask": attention_mask, "position_ids": position_ids}
        rt.model(input_ids=input_ids, use_cache=False, **extra)
        raise KlstoreError(f"{rt.label}: the last decoder block never ran")
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) != rt.n_layers:
        raise KlstoreError(f"{rt.label}: expected {rt.n_layers} block calls in one forward, saw {len(outputs)}")
    return outputs, kinds[0]


@torch.no_grad()
def trace_of(rt: ModelRuntime, generation: Generation, outputs: list[torch.Tensor], as_tuple: bool) -> Trace:
    """The Trace of one prompt from its recorded (1, T, H) block outputs (a model split over
    devices: each stays on its block's device), with P from the last one."""
    first = len(generation.prompt_ids) - 1
    positions = torch.arange(first, first + generation.n, device=rt.device)
    return Trace(
        generation,
        torch.tensor([sequence(generation)], device=rt.device),
        positions,
        outputs,
        rt.adapter.log_probs(reference(outputs, positions)),
        as_tuple,
    )


def trace(rt: ModelRuntime, generation: Generation) -> Trace:
    """One clean teacher-forced pass over prompt + continuation (minus its last token)."""
    outputs, as_tuple = record(rt, torch.tensor([sequence(generation)], device=rt.device))
    return trace_of(rt, generation, outputs, as_tuple)


def trace_batch(rt: ModelRuntime, generations: list[Generation]) -> list[Trace]:
    """`trace` for several prompts in one left-padded forward; each Trace equals the
    unpadded one up to float rounding (the padding is masked, positions count real tokens)."""
    if len(generations) == 1:
        return [trace(rt, generations[0])]
    sequences = [sequence(g) for g in generations]
    ids, mask, positions = rt.left_pad(sequences)
    outputs, as_tuple = record(rt, ids, attention_mask=mask, position_ids=positions)
    width = ids.shape[1]
    return [
        trace_of(rt, gen, [out[row : row + 1, width - len(seq) :] for out in outputs], as_tuple)
        for row, (gen, seq) in enumerate(zip(generations, sequences))
    ]


@torch.no_grad()
def generate_traced(rt: ModelRuntime, prompts_ids: list[list[int]], spec: GenerationSpec) -> list[Trace]:
    """Generate, and take each prompt's clean trace from the generation's own forward passes
    (config `clean_pass: cached`): the prefill gives the prompt's positions, decode step s the
    position of Gen s-1. The same quantities as `trace_batch`'s separate teacher-forced
    pass, computed with a KV cache and other matrix shapes, so they differ by float32
    rounding (docs/engine.md); one forward pass over the batch is saved."""
    steps: list[list] = []
    generations = generate_batch(rt, prompts_ids, spec, record=steps)
    if any(len(step) != rt.n_layers for step in steps):
        raise KlstoreError(
            f"{rt.label}: expected {rt.n_layers} block calls in one forward, "
            f"saw {sorted({len(step) for step in steps})}"
        )
    as_tuple = isinstance(steps[0][0], tuple)
    steps = [[out[0] if isinstance(out, tuple) else out for out in step] for step in steps]
    width = steps[0][0].shape[1]  # the left-padded prompts
    per_row: list[list] = [[] for _ in generations]
    for k in range(rt.n_layers):
        for row, gen in enumerate(generations):
            start = width - len(gen.prompt_ids)
            per_row[row].append(
                torch.cat([steps[0][k][row, start:]] + [steps[s][k][row] for s in range(1, gen.n)])[None]
            )
        for step in steps:  # block k's batch outputs now live in the rows' copies: freed as we go
            step[k] = None
    return [trace_of(rt, gen, outputs, as_tuple) for gen, outputs in zip(generations, per_row)]


def last_position_outputs(rt: ModelRuntime, prompt_ids: list[int]) -> torch.Tensor:
    """Block outputs at the prompt's last position: (n_layers, H), float32."""
    outputs, _ = record(rt, torch.tensor([prompt_ids], device=rt.device))
    return torch.stack([out[0, -1].float().to(rt.device) for out in outputs])
