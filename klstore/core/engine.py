"""The engine: one model + one prompt -> KL matrices [layer, gen_idx] (docs/conventions.md).

Flow for one prompt:
1. `encode`   prompt text -> token ids (optionally through the chat template);
2. `generate` the clean model continues it (greedy or seeded sampling, stops at EOS);
3. `trace`    one teacher-forced clean pass over prompt + continuation records every
              block's input and output and the reference log-probs P_t at the
              positions that predict Gen t;
4. `probe`    per layer, Q_{l,t}: the logit lens decodes the recorded block
              outputs; an intervention runs the *layer sweep*: a batch whose row r
              intervenes at block l_r. Blocks below l_r return the recorded clean
              output without computing (the computation there is identical to the
              clean pass), and the forward stops after the last block, so only
              the positions that predict Gen t reach the unembedding.

Memory: full-vocabulary log-probs are only materialised for a bounded number of
rows at a time (`chunk_bytes`), never as a [layers x tokens x vocab] tensor.

The engine reads and writes no files: probes arrive validated (klstore.spec) and
prepared (`prepare`, given steering vectors by klstore.core.steering).
Shapes: B batch rows, T positions, H hidden size, V vocabulary, R probe rows, n generated tokens.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch

from klstore.core import divergence, lenses, unembed
from klstore.core.adapter import Adapter
from klstore.core.models import LoadedModel
from klstore.core.probes import BlockSite, ProbeContext, intervene
from klstore.errors import KlstoreError
from klstore.spec import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOPK,
    LOGIT_LENS,
    ComputeSpec,
    GenerationSpec,
    LensSpec,
    ProbeSpec,
    Prompt,
    parse_layers,
)


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


@dataclass(frozen=True)
class KLMatrix:
    """One probe's result for one prompt: rows = `layers`, columns = Gen0..Gen{n-1}.

    values[d] is float32 (len(layers), n) for each divergence d asked for, in nats,
    with d(P_t || Q_{l,t}) as defined in klstore.divergence. A non-finite cell is
    NaN here and described in `errors`; it must never be stored as a number.
    """

    model: str
    prompt: Prompt
    probe: str
    probe_params: dict
    layers: tuple[int, ...]
    n_layers_total: int
    generation: Generation
    values: dict[str, np.ndarray]
    top1_match: np.ndarray  # bool (len(layers), n)
    gen_logprob: np.ndarray  # float32 (n,): log P_t(Gen t)
    gen_entropy: np.ndarray  # float32 (n,): entropy of P_t, nats
    errors: tuple[str, ...] = ()
    # What each layer predicts (docs/conventions.md, "Lens tokens"); None when topk = 0.
    topk_ids: np.ndarray | None = None  # int32 (len(layers), n, k): top-k tokens of Q_{l,t}, by rank
    topk_probs: np.ndarray | None = None  # float32 (len(layers), n, k): their probabilities under Q
    gen_rank: np.ndarray | None = None  # int32 (len(layers), n): 1 + #{v: Q(v) > Q(Gen t)}
    gen_logq: np.ndarray | None = None  # float32 (len(layers), n): log Q_{l,t}(Gen t)
    q_entropy: np.ndarray | None = None  # float32 (len(layers), n): H(Q_{l,t}), nats
    # which lens read the rows (docs/conventions.md, "Lenses"): interventions read the model's
    # own output, `logit`; `probe` is then the lens's read-out name (spec.LENS_READOUTS)
    lens: str = "logit"
    lens_id: str = "logit"


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


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


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
        return _reference(self.outputs, self.positions)


def _reference(outputs: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Trace.reference of these block outputs and positions (`_trace_of` needs it before the Trace)."""
    last = outputs[-1]
    return last[0, positions.to(last.device)]


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _take_rows(value, rows: torch.Tensor, batch: int):
    """Slice batch-shaped tensors (dim >= 2, leading dim == batch) in block arguments."""
    if torch.is_tensor(value):
        if batch > 1 and value.dim() >= 2 and value.shape[0] == batch:
            return value[rows]
        return value
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows, batch) for v in value)
    return value


def _patch_only(_: object) -> NoReturn:
    """BlockSite.run and .sublayer in the sweep from the patched position (`_run_rows_from`),
    which only patch takes, and patch uses neither."""
    raise NotImplementedError("the sweep from the patched position neither re-runs blocks nor reaches sub-layers")


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p over the last axis, nats, from log-probabilities (p = 0 terms are 0)."""
    return (-(logp.exp() * logp).nan_to_num().sum(-1)).clamp_min(0.0)


def _sampling_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) over the vocabulary (V,), as float32 on the CPU, finite for
    every finite temperature > 0: computed as softmax((logits - max) / temperature) in float64,
    so a tiny temperature tends to greedy (all mass on the largest logits) instead of
    overflowing logits / temperature, and a huge one to uniform."""
    logits = logits.double()
    probs = ((logits - logits.max()) / temperature).softmax(-1)
    if not torch.isfinite(probs).all():
        raise KlstoreError("the model's logits are not finite: cannot sample the next token")
    return probs.float().cpu()


class Engine:
    """Computes KL matrices for one loaded model. Not thread-safe (it patches block forwards)."""

    def __init__(self, loaded: LoadedModel, chunk_bytes: int = 256 * 2**20):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.chunk_bytes = chunk_bytes
        self._steer_cache: dict = {}  # steer probe key -> (n_layers, H) vectors
        self._prepared: set = set()  # keys of probes checked against this model
        self._lenses: dict[str, lenses.AffineLens] = {}  # lens id -> the lens, checked against this model
        self._unembed_hash: str | None = None
        self.adapter = Adapter.discover(self.model)
        self.n_layers = self.adapter.n_layers
        vocab, self.hidden_size = self.model.get_output_embeddings().weight.shape
        self.adapter.verify(self.model, torch.arange(min(4, vocab), device=self.device)[None] + 1)
        params = inspect.signature(self.model.forward).parameters
        self._keep_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers >= 5.x renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._eos = self._eos_ids()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else (min(self._eos) if self._eos else 0)
        text_config = self.model.config.get_text_config()
        self.context_length = getattr(text_config, "max_position_embeddings", None) or getattr(
            text_config, "n_positions", None
        )

    def vocabulary(self) -> list[str]:
        """Every token id's decoded text, in id order (the store's `tokens` table)."""
        size = self.model.get_output_embeddings().weight.shape[0]
        batch = getattr(self.tokenizer, "batch_decode", None)
        if batch is not None:
            try:
                return list(batch([[i] for i in range(size)]))
            except (IndexError, KeyError, OverflowError, TypeError, ValueError):
                pass  # some id past the tokenizer's own vocabulary (padded heads): one by one
        return [self._decode_one(i) for i in range(size)]

    def _decode_one(self, token: int) -> str:
        try:
            return self.tokenizer.decode([token])
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):
            return ""  # an id the tokenizer has no text for (a padded head row)

    # ------------------------------------------------------------------ prompts
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            getattr(self.model.generation_config, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def encode(self, prompt: Prompt, spec: GenerationSpec) -> list[int]:
        """Token ids of the prompt (chat template if spec.chat). Checks emptiness and context."""
        if not prompt.text or not prompt.text.strip():
            raise KlstoreError(f"prompt {prompt.id!r} is empty")
        if spec.chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise KlstoreError(f"{self.loaded.label} has no chat template: drop --chat")
            encoded = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True
            )
            ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        else:
            ids = list(self.tokenizer(prompt.text)["input_ids"])
        if self.context_length and len(ids) + spec.max_new_tokens > self.context_length:
            raise KlstoreError(
                f"prompt {prompt.id!r} has {len(ids)} tokens; with {spec.max_new_tokens} new tokens "
                f"that exceeds {self.loaded.label}'s context of {self.context_length}"
            )
        return ids

    def generate(self, prompt_ids: list[int], spec: GenerationSpec) -> Generation:
        """The clean model's continuation, with a KV cache. Stops after an EOS token (kept)."""
        return self.generate_batch([prompt_ids], spec)[0]

    @torch.no_grad()
    def generate_batch(
        self, prompts_ids: list[list[int]], spec: GenerationSpec, record: list | None = None
    ) -> list[Generation]:
        """Continue several prompts at once (left-padded, one KV cache). Each row samples with
        its own generator seeded by spec.seed, so a prompt continues as it would alone.
        `record`, a list, receives per forward pass the list of every block's output
        (`generate_traced` builds the clean trace from them)."""
        handles = []
        if record is not None:

            def hook(_module, _args, output):
                record[-1].append(output)

            handles = [block.register_forward_hook(hook) for block in self.adapter.blocks]
        try:
            return self._generate(prompts_ids, spec, record)
        finally:
            for handle in handles:
                handle.remove()

    def _generate(self, prompts_ids: list[list[int]], spec: GenerationSpec, record: list | None):
        batch = len(prompts_ids)
        generators = [torch.Generator().manual_seed(spec.seed) for _ in range(batch)] if spec.do_sample else None
        if batch == 1:
            step_ids = torch.tensor(prompts_ids, device=self.device)
            mask = step_pos = None
        else:
            step_ids, mask, step_pos = self._left_pad(prompts_ids)
        past = None
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for _ in range(spec.max_new_tokens):
            extra = {} if mask is None else {"attention_mask": mask, "position_ids": step_pos}
            if record is not None:
                record.append([])
            out = self.model(
                input_ids=step_ids, use_cache=True, **{self._cache_arg: past}, **self._keep_kwargs, **extra
            )
            logits = out.logits[:, -1].float()
            chosen = []
            for row in range(batch):
                if done[row]:
                    chosen.append(self._pad_id)
                    continue
                if generators is not None:  # spec.do_sample
                    token = int(
                        torch.multinomial(_sampling_probs(logits[row], spec.temperature), 1, generator=generators[row])
                    )
                else:
                    token = int(logits[row].argmax())
                tokens[row].append(token)
                done[row] = token in self._eos
                chosen.append(token)
            if all(done):
                break
            past = getattr(out, "cache", None)
            past = out.past_key_values if past is None else past
            step_ids = torch.tensor(chosen, device=self.device)[:, None]
            if mask is not None and step_pos is not None:  # left-padded (batch > 1): both or neither
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
                step_pos = step_pos[:, -1:] + 1
        return [
            Generation(
                tuple(ids),
                tuple(toks),
                tuple(self.tokenizer.decode([t]) for t in toks),
                bool(toks) and toks[-1] in self._eos,
            )
            for ids, toks in zip(prompts_ids, tokens)
        ]

    # -------------------------------------------------------------------- trace
    @torch.no_grad()
    def _record(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], bool]:
        """Every block's output (B, T, H) in one clean forward that stops after the last block.
        Also returns whether the blocks return tuples (older transformers) or tensors."""
        outputs: list[torch.Tensor] = []
        kinds: list[bool] = []
        last = self.adapter.blocks[self.n_layers - 1]

        def post_hook(module, _args, output):
            kinds.append(isinstance(output, tuple))
            outputs.append(output[0] if isinstance(output, tuple) else output)
            if module is last:
                raise _StopForward(outputs[-1])

        handles = [block.register_forward_hook(post_hook) for block in self.adapter.blocks]
        try:
            extra = {} if attention_mask is None else {"attention_mask": attention_mask, "position_ids": position_ids}
            self.model(input_ids=input_ids, use_cache=False, **extra)
            raise KlstoreError(f"{self.loaded.label}: the last decoder block never ran")
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(outputs) != self.n_layers:
            raise KlstoreError(
                f"{self.loaded.label}: expected {self.n_layers} block calls in one forward, saw {len(outputs)}"
            )
        return outputs, kinds[0]

    @staticmethod
    def _sequence(generation: Generation) -> list[int]:
        """The teacher-forced input: prompt + continuation minus its last token."""
        return list(generation.prompt_ids) + list(generation.token_ids[:-1])

    @torch.no_grad()
    def _trace_of(self, generation: Generation, outputs: list[torch.Tensor], as_tuple: bool) -> Trace:
        """The Trace of one prompt from its recorded (1, T, H) block outputs (a model split over
        devices: each stays on its block's device), with P from the last one."""
        first = len(generation.prompt_ids) - 1
        positions = torch.arange(first, first + generation.n, device=self.device)
        return Trace(
            generation,
            torch.tensor([self._sequence(generation)], device=self.device),
            positions,
            outputs,
            self.adapter.log_probs(_reference(outputs, positions)),
            as_tuple,
        )

    def trace(self, generation: Generation) -> Trace:
        """One clean teacher-forced pass over prompt + continuation (minus its last token)."""
        outputs, as_tuple = self._record(torch.tensor([self._sequence(generation)], device=self.device))
        return self._trace_of(generation, outputs, as_tuple)

    @torch.no_grad()
    def generate_traced(self, prompts_ids: list[list[int]], spec: GenerationSpec) -> list[Trace]:
        """Generate, and take each prompt's clean trace from the generation's own forward passes
        (config `clean_pass: cached`): the prefill gives the prompt's positions, decode step s the
        position of Gen s-1. The same quantities as `trace_batch`'s separate teacher-forced
        pass, computed with a KV cache and other matrix shapes, so they differ by float32
        rounding (README, "How the engine works"); one forward pass over the batch is saved."""
        steps: list[list] = []
        generations = self.generate_batch(prompts_ids, spec, record=steps)
        if any(len(step) != self.n_layers for step in steps):
            raise KlstoreError(
                f"{self.loaded.label}: expected {self.n_layers} block calls in one forward, "
                f"saw {sorted({len(step) for step in steps})}"
            )
        as_tuple = isinstance(steps[0][0], tuple)
        steps = [[out[0] if isinstance(out, tuple) else out for out in step] for step in steps]
        width = steps[0][0].shape[1]  # the left-padded prompts
        per_row: list[list] = [[] for _ in generations]
        for k in range(self.n_layers):
            for row, gen in enumerate(generations):
                start = width - len(gen.prompt_ids)
                per_row[row].append(
                    torch.cat([steps[0][k][row, start:]] + [steps[s][k][row] for s in range(1, gen.n)])[None]
                )
            for step in steps:  # block k's batch outputs now live in the rows' copies: freed as we go
                step[k] = None
        return [self._trace_of(gen, outputs, as_tuple) for gen, outputs in zip(generations, per_row)]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, position ids), each (B, T), sequences padded on the left."""
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def trace_batch(self, generations: list[Generation]) -> list[Trace]:
        """`trace` for several prompts in one left-padded forward; each Trace equals the
        unpadded one up to float rounding (the padding is masked, positions count real tokens)."""
        if len(generations) == 1:
            return [self.trace(generations[0])]
        sequences = [self._sequence(g) for g in generations]
        ids, mask, positions = self._left_pad(sequences)
        outputs, as_tuple = self._record(ids, mask, positions)
        width = ids.shape[1]
        return [
            self._trace_of(gen, [out[row : row + 1, width - len(seq) :] for out in outputs], as_tuple)
            for row, (gen, seq) in enumerate(zip(generations, sequences))
        ]

    def last_position_outputs(self, prompt_ids: list[int]) -> torch.Tensor:
        """Block outputs at the prompt's last position: (n_layers, H), float32."""
        outputs, _ = self._record(torch.tensor([prompt_ids], device=self.device))
        return torch.stack([out[0, -1].float().to(self.device) for out in outputs])

    # ---------------------------------------------------------- probe set-up
    def prepare(self, spec: ProbeSpec, steer_vectors: torch.Tensor | None = None) -> None:
        """Check a probe against this model before any work: ablations need recognisable
        sub-layers; `steer` needs its (n_layers, H) vectors (klstore.core.steering)."""
        if spec.name in ("ablate_attn", "ablate_mlp"):
            which = spec.name.removeprefix("ablate_")
            for k, block in enumerate(self.adapter.blocks):
                self.adapter.sublayer(block, which, k)
        if spec.name == "steer":
            if steer_vectors is None or tuple(steer_vectors.shape) != (self.n_layers, self.hidden_size):
                raise KlstoreError(
                    f"probe steer needs ({self.n_layers}, {self.hidden_size}) vectors for "
                    f"{self.loaded.label}, got "
                    f"{None if steer_vectors is None else list(steer_vectors.shape)}"
                )
            self._steer_cache[spec.key()] = steer_vectors
        self._prepared.add(spec.key())

    def mean_activation_difference(
        self, positive: list[Prompt], negative: list[Prompt], generation_spec: GenerationSpec
    ) -> torch.Tensor:
        """mean(positive) - mean(negative) of block outputs at each prompt's last position: (n_layers, H)."""
        means = []
        for prompts in (positive, negative):
            acts = [self.last_position_outputs(self.encode(p, generation_spec)) for p in prompts]
            means.append(torch.stack(acts).mean(0))
        return means[0] - means[1]

    def probe_context(
        self, spec: ProbeSpec, prompt: Prompt, generation: Generation, generation_spec: GenerationSpec
    ) -> ProbeContext:
        """What the probe needs for this prompt (steering vectors, the patch source)."""
        ctx = ProbeContext(prompt.id)
        if spec.name == "steer":
            if spec.key() not in self._steer_cache:
                raise KlstoreError("probe steer was not prepared: call klstore.core.steering.prepare_probes")
            ctx.steer_vectors = self._steer_cache[spec.key()]
        if spec.name == "patch":
            if not prompt.source:
                raise KlstoreError(f"prompt {prompt.id!r} has no source (the patch probe needs one)")
            source = Prompt(f"{prompt.id}:source", prompt.source, prompt.group)
            ctx.source_last = self.last_position_outputs(self.encode(source, generation_spec))
            ctx.patch_position = len(generation.prompt_ids) - 1  # (its prefix cache: `_final_hidden`)
        return ctx

    @torch.no_grad()
    def _prefix_cache(self, ids: list[int]):
        """The clean KV cache of `ids` (the model's own cache type: sliding windows included)."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **self._keep_kwargs)
        cache = getattr(out, "cache", None)
        return out.past_key_values if cache is None else cache

    # -------------------------------------------------------------------- lenses
    def lens(self, spec: LensSpec) -> lenses.AffineLens | None:
        """The fitted lens `spec` names, read from `spec.source` once and checked against this
        model (depth, width, unembedding); None for the logit lens."""
        if spec.kind == "logit":
            return None
        if spec.id not in self._lenses:
            lens = lenses.load(spec.source)
            where = f"lens {spec.id or spec.source}"
            if spec.id and lens.id != spec.id:
                raise lenses.LensError(f"{where}: the files at {spec.source} now hold lens {lens.id}")
            if lens.unembed_hash and self._unembed_hash is None:
                self._unembed_hash = lenses.unembed_hash(self.model)
            lenses.check_fits(lens, self.n_layers, self.hidden_size, self._unembed_hash, where)
            self._lenses[spec.id or lens.id] = lens
        return self._lenses[spec.id]

    # -------------------------------------------------------------------- probes
    def _cells_per_chunk(self, vocab: int) -> int:
        """How many (row, position) cells of full-vocabulary log-probs fit in `chunk_bytes` on the
        row-chunked path: each costs its float32 log Q plus about seven same-sized temporaries."""
        return max(1, self.chunk_bytes // (4 * vocab * 8))

    def _sweep_rows(self, trace: Trace) -> int:
        """Probe rows per layer sweep: each row carries about 2 x intermediate + 4 x hidden floats
        per position in a block, one attention row per head and position, and (patch from the
        patched position) its copy of the prefix KV cache, keys and values in every block."""
        text = self.model.config.get_text_config()
        width = 2 * (getattr(text, "intermediate_size", None) or 4 * self.hidden_size) + 4 * self.hidden_size
        heads = getattr(text, "num_attention_heads", None) or 1
        kv_width = (getattr(text, "num_key_value_heads", None) or heads) * (
            getattr(text, "head_dim", None) or self.hidden_size // heads
        )
        length = trace.input_ids.shape[1]
        per_row = 4 * length * (width + heads * length + 2 * self.n_layers * kv_width)
        return max(1, self.chunk_bytes // per_row)

    @torch.no_grad()
    def _final_states(
        self,
        trace: Trace,
        spec: ProbeSpec,
        layers: tuple[int, ...],
        context: ProbeContext,
        lens: LensSpec = LOGIT_LENS,
    ) -> torch.Tensor:
        """(len(layers), n, H): the residual stream to decode, per layer, at the positions
        predicting Gen t, on the head's device; a read-out's states through `lens`."""
        where = trace.ref_logp.device
        hidden = torch.cat([h.to(where) for _, h in self._final_hidden(trace, spec, layers, context)])
        fitted = self.lens(lens) if spec.is_readout else None
        return hidden if fitted is None else fitted.translate(layers, hidden)

    def _final_hidden(self, trace: Trace, spec: ProbeSpec, layers: tuple[int, ...], context: ProbeContext):
        """Yield (layer chunk, (R, n, H) residual stream to decode at the positions predicting Gen t)."""
        if spec.is_readout:  # the read-out: the recorded block outputs (on the last one's device)
            where = trace.outputs[-1].device
            yield (
                layers,
                torch.stack(
                    [trace.outputs[l][0, trace.positions.to(trace.outputs[l].device)].to(where) for l in layers]
                ),
            )
            return
        rows = self._sweep_rows(trace)
        for start in range(0, len(layers), rows):
            chunk = layers[start : start + rows]
            if self._from_position(trace, spec, chunk, context):  # patch: the positions from the patched one on
                patched = context.patch_position
                assert patched is not None  # _from_position: a patch from a prompt position
                if context.prefix_cache is None:
                    context.prefix_cache = self._prefix_cache(trace.input_ids[0, :patched].tolist())
                final = self._run_rows_from(trace, spec, chunk, context)
                yield chunk, final[:, (trace.positions - patched).to(final.device)]
            else:  # an intervention: the layer sweep
                final = self._run_rows(trace, spec, chunk, context)
                yield chunk, final[:, trace.positions.to(final.device)]

    def _from_position(self, trace: Trace, spec: ProbeSpec, chunk: tuple[int, ...], context: ProbeContext) -> bool:
        """patch: whether to sweep only the positions from the patched one on (`_run_rows_from`)
        rather than the whole sequence (`_run_rows`), by block-position count: the whole
        sequence runs a row intervening at l through the blocks above l at all T positions;
        from the patched position p, every row runs through every block from the chunk's lowest
        layer up, at T - p positions, after a one-row pass over the p earlier positions for
        their KV cache (once per prompt). On long prompts the second wins by far (issue 13:
        6x at 234 tokens); on short ones the first."""
        start = context.patch_position
        if spec.name != "patch" or not start:
            return False
        if context.from_position is not None:
            return context.from_position
        total, length = self.n_layers, trace.input_ids.shape[1]
        whole = sum(total - 1 - layer for layer in chunk) * length
        part = len(chunk) * (total - min(chunk)) * (length - start)
        if context.prefix_cache is None:
            part += total * start
        return part < whole

    def _run_rows(
        self, trace: Trace, spec: ProbeSpec, row_layers: tuple[int, ...], context: ProbeContext
    ) -> torch.Tensor:
        """Forward a batch where row r intervenes at block row_layers[r]; returns last block output (R, T, H)."""
        batch = len(row_layers)
        row_layer = torch.tensor(row_layers, device=self.device)
        last = self.n_layers - 1

        def make_forward(k: int, block):
            original = block.forward

            def forward(*args, **kwargs):
                out = trace.outputs[k].expand(batch, -1, -1)  # on block k's device
                hidden = _hidden_arg(args, kwargs).to(out.device)
                below = (row_layer < k).nonzero().flatten().to(out.device)  # rows already changed lower down
                here = (row_layer == k).nonzero().flatten().to(out.device)
                if below.numel() or here.numel():
                    out = out.clone()

                def run(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                    sliced_args = tuple(_take_rows(a, rows, batch) for a in args[1:])
                    sliced_kwargs = {
                        key: _take_rows(v, rows, batch) for key, v in kwargs.items() if key != "hidden_states"
                    }
                    result = original(x, *sliced_args, **sliced_kwargs)
                    return result[0] if isinstance(result, tuple) else result

                if below.numel():
                    out[below] = run(below, hidden[below]).to(out.device)
                if here.numel():
                    site = BlockSite(
                        layer=k,
                        hidden_in=hidden[here],
                        clean_out=trace.outputs[k].expand(here.numel(), -1, -1),
                        run=functools.partial(run, here),
                        sublayer=functools.partial(self.adapter.sublayer, block, layer=k),
                    )
                    out[here] = intervene(spec, site, context).to(out.device)
                if k == last:
                    raise _StopForward(out)
                return (out,) if trace.returns_tuple else out

            return forward

        low = min(row_layers)
        forwards = {k: make_forward(k, self.adapter.blocks[k]) for k in range(low, self.n_layers)}
        # Blocks below the lowest intervened layer are replayed from the trace.
        forwards.update({k: self._replay(trace.outputs[k], batch, trace.returns_tuple) for k in range(low)})
        return self._sweep(forwards, input_ids=trace.input_ids.expand(batch, -1), use_cache=False)

    def _sweep(self, forwards: dict, **model_inputs) -> torch.Tensor:
        """One model forward with block k's `forward` replaced by forwards[k]; returns the hidden
        state the last block raises (_StopForward). A block's `forward` may already be an
        instance attribute: accelerate's hook wrapper (device_map, offload), which loads the
        block's weights and moves its inputs. Ours call it (`block.forward` at make time is that
        wrapper), and the finally puts the very same wrapper back."""
        blocks = self.adapter.blocks
        originals = {k: blocks[k].__dict__.get("forward") for k in range(self.n_layers)}
        try:
            for k, forward in forwards.items():
                blocks[k].forward = forward
            self.model(**model_inputs)
            raise KlstoreError(f"{self.loaded.label}: the last decoder block never ran")
        except _StopForward as stop:
            return stop.hidden
        finally:
            for k, previous in originals.items():
                if previous is None:
                    blocks[k].__dict__.pop("forward", None)
                else:
                    blocks[k].forward = previous

    def _run_rows_from(
        self, trace: Trace, spec: ProbeSpec, row_layers: tuple[int, ...], context: ProbeContext
    ) -> torch.Tensor:
        """The layer sweep over positions `start = context.patch_position` onward only, for an
        intervention that leaves every earlier position clean (patch): those positions' keys and
        values come from the clean prefix cache. Returns the last block's output (R, T - start, H).

        Unlike `_run_rows`, every row runs through every block from the lowest intervened
        layer up (a KV cache holds all R rows, so a block cannot run a subset of them); rows
        whose intervention lies higher are then reset to the clean output. On a long prompt
        this is still far less work: T - start positions instead of T."""
        start = context.patch_position
        batch = len(row_layers)
        row_layer = torch.tensor(row_layers)
        last, low = self.n_layers - 1, min(row_layers)
        shifted = dataclasses.replace(context, patch_position=0, prefix_cache=None)
        from transformers import Cache  # (imported already: the model is loaded)

        cache = copy.deepcopy(context.prefix_cache)
        assert isinstance(cache, Cache), "_final_hidden builds the prefix cache before this sweep"
        cache.batch_repeat_interleave(batch)

        def make_forward(k: int, block):
            original = block.forward

            def forward(*args, **kwargs):
                clean = trace.outputs[k][:, start:]  # (1, T - start, H) on block k's device
                result = original(*args, **kwargs)  # every row: the cache's rows stay aligned
                out = (result[0] if isinstance(result, tuple) else result).to(clean.device).clone()
                above = (row_layer > k).nonzero().flatten().to(clean.device)  # still clean here
                here = (row_layer == k).nonzero().flatten().to(clean.device)
                if above.numel():
                    out[above] = clean.to(out.dtype)
                if here.numel():
                    site = BlockSite(
                        layer=k,
                        hidden_in=_hidden_arg(args, kwargs).to(clean.device)[here],
                        clean_out=clean.expand(here.numel(), -1, -1),
                        run=_patch_only,
                        sublayer=_patch_only,
                    )
                    out[here] = intervene(spec, site, shifted).to(out.dtype)
                if k == last:
                    raise _StopForward(out)
                return (out,) if trace.returns_tuple else out

            return forward

        forwards = {k: make_forward(k, self.adapter.blocks[k]) for k in range(low, self.n_layers)}
        forwards.update(
            {k: self._replay(trace.outputs[k][:, start:], batch, trace.returns_tuple) for k in range(low)}
        )  # below every intervention: clean, replayed, never computed
        return self._sweep(
            forwards, input_ids=trace.input_ids[:, start:].expand(batch, -1), use_cache=True, **{self._cache_arg: cache}
        )

    @staticmethod
    def _replay(clean: torch.Tensor, batch: int, as_tuple: bool):
        out = clean.expand(batch, -1, -1)
        return lambda *args, **kwargs: (out,) if as_tuple else out

    @torch.no_grad()
    def probe(
        self,
        trace: Trace,
        spec: ProbeSpec,
        layers: tuple[int, ...],
        divergences: tuple[str, ...],
        prompt: Prompt,
        context: ProbeContext | None = None,
        topk: int = DEFAULT_TOPK,
        lens: LensSpec = LOGIT_LENS,
    ) -> KLMatrix:
        """KL matrix of one probe over `layers` for a traced prompt (context: see `probe_context()`),
        with each cell's lens tokens: the top-`topk` tokens of Q (none when 0), and the rank and
        log-probability of the generated token under Q. A read-out reads through `lens`."""
        hidden = self._final_states(trace, spec, layers, context or ProbeContext(prompt.id), lens)
        return self._matrices([(trace, prompt, hidden)], spec, layers, divergences, topk, lens)[0]

    @torch.no_grad()
    def _matrices(
        self,
        items: list,
        spec: ProbeSpec,
        layers: tuple[int, ...],
        divergences: tuple[str, ...],
        topk: int,
        lens: LensSpec = LOGIT_LENS,
    ) -> list[KLMatrix]:
        """One KLMatrix per (trace, prompt, final states) item. Where `unembed.applies`, one
        vocabulary-chunked head pass serves every item at once; otherwise each item goes
        through the row-chunked path (`_cells_rows`)."""
        k = min(topk, items[0][0].ref_logp.shape[-1]) if items else 0
        if unembed.applies(self.adapter, divergences):
            cells = self._cells_fused(items, k)
        else:
            cells = [self._cells_rows(trace, hidden, divergences, k) for trace, _, hidden in items]
        return [
            self._matrix(trace, prompt, spec, layers, numbers, lens)
            for (trace, prompt, _), numbers in zip(items, cells)
        ]

    def _cells_fused(self, items: list, k: int) -> list[dict]:
        """`unembed.run` over the items' cells, in passes of at most chunk_bytes of logits."""
        budget = max(1, self.chunk_bytes // unembed.cell_bytes())
        pieces = []  # (item index, Job), each at most `budget` cells (one row if a row is more)
        for i, (trace, _, hidden) in enumerate(items):
            gen_ids = torch.tensor(trace.generation.token_ids, device=trace.ref_logp.device)
            step = max(1, budget // max(1, hidden.shape[1]))
            pieces += [
                (i, unembed.Job(hidden[r : r + step], trace.reference, trace.ref_logp, gen_ids))
                for r in range(0, hidden.shape[0], step)
            ]
        parts: list[list] = [[] for _ in items]
        group: list[tuple[int, unembed.Job]] = []
        size = 0
        for piece in pieces + [None]:
            cells = 0 if piece is None else piece[1].hidden.shape[0] * piece[1].hidden.shape[1]
            if group and (piece is None or size + cells > budget):
                for (i, _), out in zip(group, unembed.run(self.adapter, [job for _, job in group], k)):
                    parts[i].append(out)
                group, size = [], 0
            if piece is not None:
                group.append(piece)
                size += cells
        result = []
        for (trace, _, hidden), outs in zip(items, parts):

            def cat(name, outs=outs):
                return torch.cat([getattr(o, name) for o in outs]).numpy()

            kl = cat("kl")
            if not np.isfinite(kl).all():  # -inf logits (P = Q = 0 there), or a non-finite state: the
                result.append(self._cells_rows(trace, hidden, ("kl",), k))  # row path decides, as kl_rows does
                continue
            result.append(
                dict(
                    values={"kl": kl},
                    gen_logq=cat("gen_logq"),
                    gen_rank=cat("gen_rank"),
                    topk_ids=cat("topk_ids") if k else None,
                    topk_probs=cat("topk_probs") if k else None,
                    gen_logp=outs[0].gen_logp.numpy(),
                    q_entropy=None if outs[0].q_entropy is None else cat("q_entropy"),
                    gen_entropy=None if outs[0].gen_entropy is None else outs[0].gen_entropy.numpy(),
                )
            )
        return result

    def _cells_rows(self, trace: Trace, hidden: torch.Tensor, divergences: tuple[str, ...], k: int) -> dict:
        """The numbers of one item's cells through full-vocabulary log Q, a bounded number of
        cells at a time (`_cells_per_chunk`): every divergence, any head."""
        gen = trace.generation
        gen_ids = torch.tensor(gen.token_ids, device=trace.ref_logp.device)  # P and Q meet on the head's device
        n_rows = hidden.shape[0]
        values = {d: np.full((n_rows, gen.n), np.nan, dtype=np.float32) for d in divergences}
        topk_ids = np.zeros((n_rows, gen.n, k), dtype=np.int32) if k else None
        topk_probs = np.zeros((n_rows, gen.n, k), dtype=np.float32) if k else None
        gen_rank = np.zeros((n_rows, gen.n), dtype=np.int32)
        gen_logq = np.zeros((n_rows, gen.n), dtype=np.float32)
        q_entropy = np.zeros((n_rows, gen.n), dtype=np.float32)
        cells = self._cells_per_chunk(trace.ref_logp.shape[-1])
        ref_p = trace.ref_logp.exp() if "kl" in divergences else None  # P, once per prompt (float32+)
        rows_per = max(1, cells // gen.n)
        for r0 in range(0, n_rows, rows_per):
            rows = slice(r0, min(r0 + rows_per, n_rows))
            step = max(1, cells // (rows.stop - rows.start))  # positions per piece, so log Q stays in budget
            for p0 in range(0, gen.n, step):
                cols = slice(p0, min(p0 + step, gen.n))
                logq = self.adapter.log_probs(hidden[rows, cols])  # (R, m, V)
                result = divergence.compute_rows(
                    divergences, trace.ref_logp[cols], logq, None if ref_p is None else ref_p[cols]
                )
                for name, tensor in result.items():
                    values[name][rows, cols] = tensor.float().cpu().numpy()
                target = logq.gather(-1, gen_ids[cols].expand(logq.shape[0], -1).unsqueeze(-1))  # (R, m, 1)
                gen_logq[rows, cols] = target[..., 0].float().cpu().numpy()
                q_entropy[rows, cols] = _entropy(logq).float().cpu().numpy()
                # rank = 1 + #{v: Q(v) > Q(Gen t)}; an int32 sum of the comparison is 3x faster than bool.sum
                gen_rank[rows, cols] = (1 + torch.gt(logq, target).sum(-1, dtype=torch.int32)).cpu().numpy()
                if topk_ids is not None and topk_probs is not None:  # k > 0
                    best = logq.topk(k, dim=-1)  # sorted: rank 1 first
                    topk_ids[rows, cols] = best.indices.cpu().numpy()
                    topk_probs[rows, cols] = best.values.exp().float().cpu().numpy()
                del logq, result, target
        return dict(
            values=values,
            gen_logq=gen_logq,
            gen_rank=gen_rank,
            topk_ids=topk_ids,
            topk_probs=topk_probs,
            q_entropy=q_entropy,
        )

    def _matrix(
        self,
        trace: Trace,
        prompt: Prompt,
        spec: ProbeSpec,
        layers: tuple[int, ...],
        numbers: dict,
        lens: LensSpec = LOGIT_LENS,
    ) -> KLMatrix:
        gen = trace.generation
        ref = trace.ref_logp
        gen_ids = torch.tensor(gen.token_ids, device=ref.device)
        logprob = numbers.get("gen_logp")  # the fused pass's own log P(Gen t) (unembed.Cells.gen_logp)
        if logprob is None:
            logprob = ref[torch.arange(gen.n, device=ref.device), gen_ids].float().cpu().numpy()
        entropy = numbers.get("gen_entropy")  # the fused pass's own H(P), as gen_logp
        if entropy is None:
            entropy = _entropy(ref).float().cpu().numpy()
        values = numbers["values"]
        errors = []
        for name, matrix in values.items():
            bad = np.argwhere(~np.isfinite(matrix))
            for row, col in bad:
                errors.append(f"non-finite {name} at layer {layers[row]}, Gen{col}")
                matrix[row, col] = np.nan
        return KLMatrix(
            model=self.loaded.label,
            prompt=prompt,
            probe=lens.readout if spec.is_readout else spec.name,
            probe_params=dict(spec.params),
            layers=tuple(layers),
            n_layers_total=self.n_layers,
            generation=gen,
            values=values,
            top1_match=numbers["gen_rank"] == 1,  # = (argmax Q == Gen t) but for exact ties
            gen_logprob=logprob.astype(np.float32),
            gen_entropy=entropy.astype(np.float32),
            errors=tuple(errors),
            topk_ids=numbers["topk_ids"],
            topk_probs=numbers["topk_probs"],
            gen_rank=numbers["gen_rank"],
            gen_logq=numbers["gen_logq"],
            q_entropy=numbers["q_entropy"],
            lens=lens.kind if spec.is_readout else "logit",
            lens_id=lens.id if spec.is_readout else LOGIT_LENS.id,
        )

    # ---------------------------------------------------------------- many prompts
    @torch.no_grad()
    def compute(
        self,
        prompts: list[Prompt],
        compute: ComputeSpec,
        layers: tuple[int, ...] | None = None,
        encoded: list[list[int]] | None = None,
    ) -> list:
        """Per prompt, its KLMatrix list or the exception that stopped it (the others go on):
        everything `compute` asks for (spec.ComputeSpec, taken whole).

        `layers`: the blocks `compute.layers` resolves to, when the caller resolved them;
        `encoded`: the prompts' token ids when the caller already checked them with `encode`.
        Generation and the clean trace run `compute.batch_size` prompts at a time (left-padded);
        each probe's interventions run per prompt, and its head pass over the whole batch
        (`_matrices`). A batch that fails as a whole is redone one prompt at a time, so one bad
        prompt cannot take its neighbours down. `topk`: lens tokens kept per cell (0: none).
        `clean_pass`: "exact" (a teacher-forced pass after generation) or "cached"
        (`generate_traced`). `matmul_precision`: torch's float32 matmul precision for the call
        (`highest`, `high`: TF32, `medium`: bfloat16 products), restored afterwards.
        """
        with matmul_precision_of(compute.matmul_precision):
            return self._compute(prompts, compute, layers, encoded)

    def run_many(
        self,
        prompts: list[Prompt],
        probes: list[ProbeSpec],
        layers: str | tuple[int, ...] = "all",
        divergences: tuple[str, ...] = ("kl",),
        spec: GenerationSpec = GenerationSpec(),
        batch_size: int = DEFAULT_BATCH_SIZE,
        encoded: list[list[int]] | None = None,
        **options,
    ) -> list:
        """`compute` with the value given field by field (`options`: topk, clean_pass,
        matmul_precision, ...; checked as `Lens.compute` checks them); `layers` may be resolved
        block indices or a spec string."""
        resolved = None if isinstance(layers, str) else tuple(layers)
        value = ComputeSpec(
            list(probes),
            layers if isinstance(layers, str) else "all",
            divergences,
            spec,
            batch_size=batch_size,
            **ComputeSpec.check_options(options),
        )
        return self.compute(prompts, value, resolved, encoded)

    def _compute(self, prompts, compute: ComputeSpec, layers, encoded):
        if layers is None:
            layers = parse_layers(compute.layers, self.n_layers, self.loaded.label)
        probes, spec = compute.probes, compute.generation
        for probe in probes:
            if probe.key() not in self._prepared and probe.name != "steer":  # steer: prepared with vectors
                self.prepare(probe)
        if any(probe.is_readout for probe in probes):
            for lens in compute.lens:  # read and checked against the model once, before any prompt
                self.lens(lens)

        def traced_batch(ids):
            if compute.clean_pass == "cached":
                return self.generate_traced(ids, spec)
            return self.trace_batch(self.generate_batch(ids, spec))

        results: list = [None] * len(prompts)
        ready = []
        for i, prompt in enumerate(prompts):
            try:
                ready.append((i, encoded[i] if encoded is not None else self.encode(prompt, spec)))
            except KlstoreError as exc:
                results[i] = exc
        for start in range(0, len(ready), compute.batch_size):
            chunk = ready[start : start + compute.batch_size]
            try:
                traces = traced_batch([ids for _, ids in chunk])
            except Exception:  # noqa: BLE001 - redone one by one, each failure recorded alone
                traces = [None] * len(chunk)
            traced = []
            for (i, ids), trace in zip(chunk, traces):
                try:
                    traced.append((i, trace if trace is not None else traced_batch([ids])[0]))
                except Exception as exc:  # noqa: BLE001 - one prompt's failure is its result
                    results[i] = exc
            self._probe_batch(traced, prompts, compute, layers, results)
        return results

    def _probe_batch(self, traced: list, prompts, compute: ComputeSpec, layers, results) -> None:
        """Every probe of `compute` on traced prompts [(index, Trace)], the read-out once per lens:
        results[i] becomes prompt i's KLMatrix list, or the exception that stopped it. A probe's
        final states are staged until they reach chunk_bytes, then decoded together (`_matrices`)."""
        done: dict[int, list] = {i: [] for i, _ in traced}
        divergences, topk = compute.divergences, compute.topk

        def decode(staged, probe, lens):
            items = [(trace, prompts[i], hidden) for i, trace, hidden in staged]
            try:
                matrices = self._matrices(items, probe, layers, divergences, topk, lens)
            except Exception:  # noqa: BLE001 - redone one by one, each failure recorded alone
                matrices = [self._matrix_or_error(item, probe, layers, compute, lens) for item in items]
            for (i, _, _), matrix in zip(staged, matrices):
                if isinstance(matrix, Exception):
                    results[i] = matrix
                else:
                    done[i].append(matrix)

        readings = [(p, lens) for p in compute.probes for lens in (compute.lens if p.is_readout else (LOGIT_LENS,))]
        for probe, lens in readings:
            staged, size = [], 0
            for i, trace in traced:
                if results[i] is not None:
                    continue
                try:
                    context = self.probe_context(probe, prompts[i], trace.generation, compute.generation)
                    hidden = self._final_states(trace, probe, layers, context, lens)
                except Exception as exc:  # noqa: BLE001 - one prompt's failure is its result
                    results[i] = exc
                    continue
                staged.append((i, trace, hidden))
                size += hidden.numel() * hidden.element_size()
                if size >= self.chunk_bytes:
                    decode(staged, probe, lens)
                    staged, size = [], 0
            if staged:
                decode(staged, probe, lens)
        for i, _ in traced:
            if results[i] is None:
                results[i] = done[i]

    def _matrix_or_error(self, item, probe, layers, compute: ComputeSpec, lens: LensSpec):
        try:
            return self._matrices([item], probe, layers, compute.divergences, compute.topk, lens)[0]
        except Exception as exc:  # noqa: BLE001 - one prompt's failure is its result
            return exc

    # ---------------------------------------------------------------- one call
    def run(
        self,
        prompt: Prompt,
        probes: list[ProbeSpec],
        layers: str | tuple[int, ...] = "all",
        divergences: tuple[str, ...] = ("kl",),
        spec: GenerationSpec = GenerationSpec(),
        **options,
    ) -> list[KLMatrix]:
        """Generate once, trace once, then one KLMatrix per probe (errors raised); `options` as
        in `run_many`."""
        result = self.run_many([prompt], probes, layers, divergences, spec, **options)[0]
        if isinstance(result, Exception):
            raise result
        return result
