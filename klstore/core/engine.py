"""The engine: one model + prompts -> KL matrices [layer, gen_idx] (docs/conventions.md).

The data flow, one module per step:
1. `generation` prompt text -> token ids (optionally through the chat template) -> the
                clean continuation (greedy or seeded sampling, stops at EOS);
2. `tracing`    one teacher-forced clean pass over prompt + continuation records every
                block's output and the reference log-probs P_t at the positions that
                predict Gen t (`Trace`);
3. `sweeps`     per probe, the final residual states to decode per layer: a read-out
                reads the recorded outputs, an intervention runs the layer sweep;
4. `readout`    the head pass: final states -> each cell's numbers -> one `KLMatrix`.
`runtime.ModelRuntime` is the model as all four call it.

This module orchestrates them: it runs prompts `batch_size` at a time, keeps what is
checked once per model (probes, steering vectors, fitted lenses), stages final states up
to `chunk_bytes` before one head pass, and returns per prompt its matrices or the exception
that stopped it (a batch that fails as a whole is redone one prompt at a time).

The engine reads and writes no files: probes arrive validated (klstore.spec) and
prepared (`prepare`, given steering vectors by klstore.core.steering); a fitted lens is
read through `core.lenses.load` once per lens id (`lens`).
Shapes: B batch rows, T positions, H hidden size, V vocabulary, R probe rows, n generated tokens.
"""

from __future__ import annotations

import torch

from klstore.core import generation, lenses, readout, sweeps, tracing
from klstore.core.generation import Generation
from klstore.core.models import LoadedModel
from klstore.core.probes import ProbeContext
from klstore.core.readout import KLMatrix, Reading, Staged
from klstore.core.runtime import ModelRuntime, matmul_precision_of
from klstore.core.tracing import Trace
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

Outcome = list[KLMatrix] | Exception  # one prompt's matrices (one per reading), or what stopped it


class Engine:
    """Computes KL matrices for one loaded model. Not thread-safe (it patches block forwards)."""

    def __init__(self, loaded: LoadedModel, chunk_bytes: int = 256 * 2**20):
        self.runtime = ModelRuntime.of(loaded)
        self.loaded, self.model, self.tokenizer, self.device = loaded, loaded.model, loaded.tokenizer, loaded.device
        self.adapter, self.n_layers = self.runtime.adapter, self.runtime.n_layers
        self.hidden_size, self.context_length = self.runtime.hidden_size, self.runtime.context_length
        self.chunk_bytes = chunk_bytes  # the memory budget of staged states, a sweep's rows, a head pass
        self._steer_cache: dict = {}  # steer probe key -> (n_layers, H) vectors
        self._prepared: set = set()  # keys of probes checked against this model
        self._lenses: dict[str, lenses.AffineLens] = {}  # lens id -> the lens, checked against this model
        self._unembed_hash: str | None = None

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

    # ------------------------------------------------- generation and tracing
    def encode(self, prompt: Prompt, spec: GenerationSpec) -> list[int]:
        """Token ids of the prompt (`generation.encode`: chat template, emptiness, context)."""
        return generation.encode(self.runtime, prompt, spec)

    def generate(self, prompt_ids: list[int], spec: GenerationSpec) -> Generation:
        """The clean model's continuation, with a KV cache. Stops after an EOS token (kept)."""
        return self.generate_batch([prompt_ids], spec)[0]

    def generate_batch(self, prompts_ids: list[list[int]], spec: GenerationSpec) -> list[Generation]:
        """Several prompts continued at once (`generation.generate_batch`)."""
        return generation.generate_batch(self.runtime, prompts_ids, spec)

    def trace(self, generation: Generation) -> Trace:
        """One clean teacher-forced pass over prompt + continuation (`tracing.trace`)."""
        return tracing.trace(self.runtime, generation)

    def trace_batch(self, generations: list[Generation]) -> list[Trace]:
        """`trace` for several prompts in one left-padded forward (`tracing.trace_batch`)."""
        return tracing.trace_batch(self.runtime, generations)

    def generate_traced(self, prompts_ids: list[list[int]], spec: GenerationSpec) -> list[Trace]:
        """Generate, with each prompt's clean trace taken from the generation's own forward
        passes (`clean_pass: cached`, `tracing.generate_traced`)."""
        return tracing.generate_traced(self.runtime, prompts_ids, spec)

    def last_position_outputs(self, prompt_ids: list[int]) -> torch.Tensor:
        """Block outputs at the prompt's last position: (n_layers, H), float32."""
        return tracing.last_position_outputs(self.runtime, prompt_ids)

    # ----------------------------------------------------------- probe set-up
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
            ctx.patch_position = len(generation.prompt_ids) - 1  # (its prefix cache: `sweeps.final_hidden`)
        return ctx

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
            lens = lenses.check_fits(lens, self.n_layers, self.hidden_size, self._unembed_hash, where)
            self._lenses[spec.id or lens.id] = lens
        return self._lenses[spec.id]

    # ------------------------------------------------------------------ probes
    @torch.no_grad()
    def _final_states(self, trace: Trace, reading: Reading, context: ProbeContext) -> torch.Tensor:
        """(len(layers), n, H): the residual stream to decode, per layer, at the positions
        predicting Gen t, on the head's device; a read-out's states through its lens."""
        where = trace.ref_logp.device
        chunks = sweeps.final_hidden(
            self.runtime,
            trace=trace,
            probe=reading.probe,
            layers=reading.layers,
            context=context,
            chunk_bytes=self.chunk_bytes,
        )
        hidden = torch.cat([h.to(where) for _, h in chunks])
        fitted = self.lens(reading.lens) if reading.probe.is_readout else None
        return hidden if fitted is None else fitted.translate(reading.layers, hidden)

    @torch.no_grad()
    def probe(
        self,
        trace: Trace,
        spec: ProbeSpec,
        layers: tuple[int, ...],
        divergences: tuple[str, ...],
        prompt: Prompt,
        *,
        context: ProbeContext | None = None,
        topk: int = DEFAULT_TOPK,
        lens: LensSpec = LOGIT_LENS,
    ) -> KLMatrix:
        """KL matrix of one probe over `layers` for a traced prompt (context: see `probe_context()`),
        with each cell's lens tokens: the top-`topk` tokens of Q (none when 0), and the rank and
        log-probability of the generated token under Q. A read-out reads through `lens`."""
        reading = Reading(spec, layers, divergences, topk, lens)
        hidden = self._final_states(trace, reading, context or ProbeContext(prompt.id))
        return readout.matrices(self.runtime, [Staged(trace, prompt, hidden)], reading, chunk_bytes=self.chunk_bytes)[0]

    # ------------------------------------------------------------ many prompts
    @torch.no_grad()
    def compute(
        self,
        prompts: list[Prompt],
        compute: ComputeSpec,
        layers: tuple[int, ...] | None = None,
        encoded: list[list[int]] | None = None,
    ) -> list:
        """Per prompt (an `Outcome`), its KLMatrix list or the exception that stopped it (the others go on):
        everything `compute` asks for (spec.ComputeSpec, taken whole).

        `layers`: the blocks `compute.layers` resolves to, when the caller resolved them;
        `encoded`: the prompts' token ids when the caller already checked them with `encode`.
        Generation and the clean trace run `compute.batch_size` prompts at a time (left-padded);
        each probe's interventions run per prompt, and its head pass over the whole batch
        (`_read`). A batch that fails as a whole is redone one prompt at a time, so one bad
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

    def _compute(
        self, prompts: list[Prompt], compute: ComputeSpec, layers: tuple[int, ...] | None, encoded
    ) -> list[Outcome]:
        if layers is None:
            layers = parse_layers(compute.layers, self.n_layers, self.loaded.label)
        self._check_readings(compute, layers)
        outcomes: list[Outcome] = [[] for _ in prompts]  # each replaced below: matrices or an exception
        ready = []
        for i, prompt in enumerate(prompts):
            try:
                ready.append((i, encoded[i] if encoded is not None else self.encode(prompt, compute.generation)))
            except KlstoreError as exc:
                outcomes[i] = exc
        for start in range(0, len(ready), compute.batch_size):
            chunk = ready[start : start + compute.batch_size]
            traced = []
            for (i, _), trace in zip(chunk, self._traces([ids for _, ids in chunk], compute)):
                if isinstance(trace, Exception):
                    outcomes[i] = trace
                else:
                    traced.append((i, trace))
            read = self._read([(prompts[i], trace) for i, trace in traced], compute, layers)
            for (i, _), outcome in zip(traced, read):
                outcomes[i] = outcome
        return outcomes

    def _check_readings(self, compute: ComputeSpec, layers: tuple[int, ...]) -> None:
        """Every probe and lens of `compute` checked against this model once, before any prompt."""
        for probe in compute.probes:
            if probe.key() not in self._prepared and probe.name != "steer":  # steer: prepared with vectors
                self.prepare(probe)
        if any(probe.is_readout for probe in compute.probes):
            for lens in compute.lens:
                fitted = self.lens(lens)
                if fitted is not None:  # a lens fitted at some blocks only reads those
                    lenses.check_layers(fitted, layers, f"lens {lens.id}")

    def _traces(self, batch: list[list[int]], compute: ComputeSpec) -> list[Trace | Exception]:
        """The clean traces of a batch of encoded prompts (`clean_pass`); a batch that fails as
        a whole is redone one prompt at a time, each failure that prompt's outcome."""

        def traced(ids: list[list[int]]) -> list[Trace]:
            if compute.clean_pass == "cached":
                return self.generate_traced(ids, compute.generation)
            return self.trace_batch(self.generate_batch(ids, compute.generation))

        try:
            return list(traced(batch))
        except Exception:  # noqa: BLE001 - redone one by one, each failure recorded alone
            pass
        outcomes: list[Trace | Exception] = []
        for ids in batch:
            try:
                outcomes.append(traced([ids])[0])
            except Exception as exc:  # noqa: BLE001 - one prompt's failure is its result
                outcomes.append(exc)
        return outcomes

    def _read(self, traced: list[tuple[Prompt, Trace]], compute: ComputeSpec, layers: tuple[int, ...]) -> list[Outcome]:
        """Every reading of `compute` (each probe, a read-out once per lens) on traced prompts:
        per prompt its KLMatrix list, or the exception that stopped it. A reading's final states
        are staged until they reach chunk_bytes, then decoded together (`_decode`)."""
        matrices: list[list[KLMatrix]] = [[] for _ in traced]
        failed: dict[int, Exception] = {}

        def decode(staged: list[tuple[int, Staged]], reading: Reading) -> None:
            for (j, _), result in zip(staged, self._decode([item for _, item in staged], reading)):
                if isinstance(result, Exception):
                    failed[j] = result
                else:
                    matrices[j].append(result)

        readings = [
            Reading(probe, layers, compute.divergences, compute.topk, lens)
            for probe in compute.probes
            for lens in (compute.lens if probe.is_readout else (LOGIT_LENS,))
        ]
        for reading in readings:
            staged: list[tuple[int, Staged]] = []
            size = 0
            for j, (prompt, trace) in enumerate(traced):
                if j in failed:
                    continue
                try:
                    context = self.probe_context(reading.probe, prompt, trace.generation, compute.generation)
                    hidden = self._final_states(trace, reading, context)
                except Exception as exc:  # noqa: BLE001 - one prompt's failure is its result
                    failed[j] = exc
                    continue
                staged.append((j, Staged(trace, prompt, hidden)))
                size += hidden.numel() * hidden.element_size()
                if size >= self.chunk_bytes:
                    decode(staged, reading)
                    staged, size = [], 0
            if staged:
                decode(staged, reading)
        return [failed.get(j, found) for j, found in enumerate(matrices)]

    def _decode(self, items: list[Staged], reading: Reading) -> list[KLMatrix | Exception]:
        """One head pass over staged prompts (`readout.matrices`); where it fails, each prompt
        alone, so each gets its matrix or its own exception."""
        try:
            return list(readout.matrices(self.runtime, items, reading, chunk_bytes=self.chunk_bytes))
        except Exception:  # noqa: BLE001 - redone one by one, each failure recorded alone
            return [self._decode_alone(item, reading) for item in items]

    def _decode_alone(self, item: Staged, reading: Reading) -> KLMatrix | Exception:
        try:
            return readout.matrices(self.runtime, [item], reading, chunk_bytes=self.chunk_bytes)[0]
        except Exception as exc:  # noqa: BLE001 - one prompt's failure is its result
            return exc
