"""The Python API: `klstore.load(...)` -> `Lens.compute(...)` -> `Result`, and `klstore.open_store(...)`.

    lens = klstore.load("smollm2-135m")                  # any --model form; device/dtype as in the CLI
    res = lens.compute(["The capital of France is"], probes=["logit_lens", "skip"],
                       layers="0,15-21,27", n=5, divergences=["kl", "js"])
    res.matrix(0, "logit_lens", "kl")                    # numpy float32 [layers x generated tokens]
    res.save("./klstore-data", run="nb")                 # what `klstore compute --store` writes
    klstore.open_store("./klstore-data").sql("SELECT avg(kl) FROM kl")

Every step goes through the same code as `klstore compute`: inputs are validated by
`klstore.spec` (bad input raises `klstore.KlstoreError` with the CLI's one-line message,
before any model work), the model is loaded by `klstore.core.models.load_model`, probes are
prepared by `klstore.core.steering.prepare_probes` and computed by
`klstore.core.engine.Engine.run_many`; `Result.save` writes through `klstore.run.plan.RunPlan`
and `execute_local` with a `klstore.run.worker.Worker` around the already loaded model.
The numbers are therefore bit-identical to the CLI's (see `Result.save` for the store).

This module imports torch only inside `load` (and `Result.save`), so `import klstore`
stays light.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from typing import TYPE_CHECKING

from klstore.errors import KlstoreError
from klstore.run.worker import Worker  # no torch at import: it loads models inside its methods
from klstore.spec import (
    DEFAULT_CLEAN_PASS,
    DEFAULT_MATMUL_PRECISION,
    DEFAULT_TOPK,
    ComputeSpec,
    GenerationSpec,
    ProbeSpec,
    Prompt,
    check_divergences,
    check_label,
    check_patch_sources,
)

if TYPE_CHECKING:
    from klstore.core.engine import Engine
    from klstore.core.models import LoadedModel

__all__ = ["load", "Lens", "Result", "open_store", "StoreReader", "KlstoreError", "export_run", "import_run"]


# ------------------------------------------------------------------- loading
def load(
    name: str | None = None,
    *,
    model=None,
    tokenizer=None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    label: str | None = None,
    device_map=None,
    max_memory=None,
) -> Lens:
    """Load a model by name, or wrap a transformers model already in memory.

    Args:
        name: any form `klstore compute --model` takes: a built-in name (`smollm2-135m`,
            `gemma3-270m`), a Hugging Face repo id, a local folder or a `.gguf` file.
        model, tokenizer: instead of `name`, a transformers causal LM and its tokenizer
            (used as they are: their device and dtype are kept).
        device: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ... (with `name` only).
        dtype: `auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16`, `float16` (with `name` only).
        trust_remote_code: allow model code from the model's repository (with `name` only).
        device_map, max_memory: split the model over several devices (and offload to CPU or
            disk) with accelerate, e.g. `device_map="balanced"` over every visible GPU
            (with `name` only; see docs/cluster.md, "Models larger than one device").
        label: the model's name in results and in a store; default: derived from `name` as the
            CLI does (`owner/name` -> `owner--name`, a path -> its stem), or `model` for an
            in-memory model.

    Raises:
        KlstoreError: unknown model, missing weights, unknown device or dtype, an architecture
            klstore cannot probe.
    """
    if (name is None) == (model is None):
        raise KlstoreError("load: give a model name, or model= and tokenizer= (not both)")
    from klstore.core.models import from_objects, load_model, quiet_libraries

    quiet_libraries()
    if model is not None:
        if tokenizer is None:
            raise KlstoreError("load(model=...) needs tokenizer= as well")
        if not hasattr(model, "parameters") or not hasattr(model, "config"):
            raise KlstoreError(f"load: model= must be a transformers model, got {type(model).__name__}")
        label = check_label(label or "model", "model label")
        loaded = from_objects(label, model, tokenizer)
        return Lens._wrap(loaded, label=label, name=label, dtype=str(loaded.dtype).replace("torch.", ""))
    if not isinstance(name, str):
        raise KlstoreError(f"load: the model name must be a string, got {type(name).__name__}")
    from klstore.config import default_label

    # a derived label is checked where it names a store folder (compute_into, Result.save), so
    # `klstore.load(".")` and `klstore compute --model .` work without a store, as they always did
    label = default_label(name) if label is None else check_label(label, "model label")
    from klstore.spec import check_device_map

    loaded = load_model(
        name,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        device_map=check_device_map(device_map),
        max_memory=max_memory,
    )
    return Lens._wrap(loaded, label=label, name=name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


class Lens:
    """One loaded model, ready to compute KL maps. Make one with `klstore.load`."""

    loaded: LoadedModel
    engine: Engine
    label: str
    _model_config: dict

    def __init__(self, *args, **kwargs):
        raise TypeError("use klstore.load(...) to make a Lens")

    @classmethod
    def _wrap(
        cls,
        loaded,
        *,
        label: str,
        name: str,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
    ) -> Lens:
        """A Lens around a `klstore.core.models.LoadedModel` (tests reuse a session's model)."""
        from klstore.core.engine import Engine

        lens = object.__new__(cls)
        lens.loaded = loaded
        lens.engine = Engine(loaded)
        lens.label = label  # checked where it names a store folder (`_run_into`)
        lens._model_config = dict(
            name=name, label=lens.label, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        return lens

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks (layer indices 0 .. n_layers - 1)."""
        return self.engine.n_layers

    def __repr__(self) -> str:
        return (
            f"Lens({self.label!r}: {self.n_layers} layers, {self.loaded.device}, "
            f"{str(self.loaded.dtype).replace('torch.', '')})"
        )

    def compute(
        self,
        prompts,
        probes=("logit_lens",),
        layers: str | int = "all",
        n: int = 5,
        divergences=("kl",),
        *,
        sample: bool = False,
        seed: int = 0,
        temperature: float = 1.0,
        chat: bool = False,
        source: str | None = None,
        progress: bool = True,
        topk: int = DEFAULT_TOPK,
        clean_pass: str = DEFAULT_CLEAN_PASS,
        matmul_precision: str = DEFAULT_MATMUL_PRECISION,
        **options,
    ) -> Result:
        """Generate a continuation per prompt and compute each probe's layer x token matrices.

        Args:
            prompts: one prompt text (its id is `prompt`, as with `klstore compute --prompt`);
                a list of texts (ids `p0`, `p1`, ... by position), of dicts
                `{"id", "text", "group"?, "source"?}` (validated like a prompts-file line) or of
                `klstore.spec.Prompt`; or a JSON Lines file given as a `pathlib.Path` or a
                string ending in `.jsonl` (read by `klstore.config.read_prompts`).
            probes: names (`logit_lens`, `skip`, `ablate_attn`, `ablate_mlp`, `noise`, `steer`,
                `patch`), `klstore.spec.ProbeSpec`s, or dicts `{"name": ..., "params": {...}}`
                (or `{"name": ..., <param>: ...}` as in experiment configs). A bare `noise`
                takes `seed` as its seed, as in the CLI.
            layers: a layer spec: `all`, `0,15-21,27`, `-4--1`, or one integer.
            n: tokens to generate (the CLI's `-n`).
            divergences: any of `kl` (forward KL(P||Q)), `kl_reverse`, `js`.
            sample, seed, temperature, chat: as the CLI's `--sample`, `--seed`,
                `--temperature`, `--chat`.
            source: the patch probe's source prompt, for a single prompt text (`--source`).
            progress: a progress bar (tqdm, when installed) or one stderr line per batch of
                16 prompts; `False` silences it.
            topk: lens tokens kept per cell (the CLI's `--topk`; 0: none); see `Result.lens_tokens`.
            clean_pass: `exact` (default) or `cached`: the clean trace from the generation's own
                KV-cached passes, one forward pass fewer, values within float32 rounding (~5e-5
                nats on SmolLM2); the CLI's `--clean-pass`.
            matmul_precision: `highest` (default), `high` (TF32 on NVIDIA GPUs) or `medium`
                (bfloat16 products, float32 accumulation); the CLI's `--matmul-precision`.
            options: any other option of `klstore.spec.ComputeSpec`, by its field name.

        Returns:
            A `Result`. Non-finite cells are NaN and reported as a warning (`Result.errors`).

        Raises:
            KlstoreError: any bad argument, with the CLI's message, before any model work;
                a prompt that fails (e.g. too long for the context) also raises, as in the CLI.
        """
        spec = GenerationSpec(max_new_tokens=n, do_sample=sample, seed=seed, temperature=temperature, chat=chat)
        divergences = check_divergences(_names(divergences, "divergence"))
        options = ComputeSpec.check_options(
            {"topk": topk, "clean_pass": clean_pass, "matmul_precision": matmul_precision, **options}
        )
        probe_specs = _probes(probes, seed)
        prompt_list = _prompts(prompts, source)
        check_patch_sources(probe_specs, prompt_list)
        if isinstance(layers, bool) or not isinstance(layers, (str, int)):
            raise KlstoreError(f"layers must be a layer spec such as 'all' or '0,15-21,27', got {layers!r}")
        from klstore.spec import parse_layers

        parse_layers(str(layers))  # syntax first, as the CLI
        value = ComputeSpec(probe_specs, str(layers), divergences, spec, **options)
        res = self.compute_value(
            prompt_list, value, progress=progress, prompt_path=str(prompts) if _is_path(prompts) else None
        )
        if res.errors:
            import warnings

            warnings.warn(f"{len(res.errors)} non-finite value(s), first: {res.errors[0]}", stacklevel=2)
        return res

    def compute_value(
        self, prompts: list[Prompt], compute: ComputeSpec, *, progress: bool = True, prompt_path: str | None = None
    ) -> Result:
        """`compute` for validated prompts and one `klstore.spec.ComputeSpec`, taken whole (the
        keyword arguments of `compute` build one; the CLI's `compute` calls this too)."""
        from klstore.config import check_outputs
        from klstore.core.steering import prepare_probes
        from klstore.run import lenses
        from klstore.spec import parse_layers

        check_outputs(compute.probes)  # steer's `save`: before any work
        compute = lenses.resolve(compute, lenses.store_for_ids(None))
        resolved = parse_layers(compute.layers, self.engine.n_layers, self.loaded.label)
        prepare_probes(self.engine, compute.probes, compute.generation)
        encoded = [self.engine.encode(p, compute.generation) for p in prompts]  # every prompt before any work
        results = []
        size = compute.batch_size
        with _Progress(len(prompts), self.label, progress) as bar:
            for start in range(0, len(prompts), size):
                # One engine call per batch: the batches are those of one call over all
                # prompts, and of `compute --store`'s shards (same size), so the numbers agree.
                results += self.engine.compute(
                    prompts[start : start + size], compute, resolved, encoded[start : start + size]
                )
                bar.update(len(results))
        for result in results:
            if isinstance(result, Exception):
                raise result
        return Result(self, prompts, compute, results, prompt_path=prompt_path)

    def compute_into(
        self,
        store: str,
        prompts: list[Prompt],
        compute: ComputeSpec,
        *,
        run: str = "api",
        shard_size: int | None = None,
        prompt_path: str | None = None,
        source: str = "klstore api",
        progress: bool = True,
    ) -> dict:
        """Compute validated prompts into a store shard by shard, each shard written when it is
        done: what `klstore compute --store` runs. A run of the same identity resumes (shards
        already in the store are skipped); a prompt that fails is recorded in the `prompts` table
        with its status and error, and the others go on.

        Args:
            store: a folder or `s3://bucket/prefix`.
            prompts, compute: as `compute_value` takes them.
            run: the run's name (its id is `<run>-<hash of the run's identity>`).
            shard_size: prompts per written file (default: `compute.batch_size`).
            prompt_path: the prompts file they came from (recorded in the `runs` row).
            source: who ran it, recorded in the `runs` row's config.
            progress: one stderr line per shard.

        Returns:
            The run's summary: `run_id`, `status`, `prompts`, `failed`, ...
        """
        from klstore.config import check_outputs

        if shard_size is not None and (
            isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1
        ):
            raise KlstoreError(f"shard_size must be a positive integer, got {shard_size!r}")
        seen: set = set()
        for prompt in prompts:
            if prompt.id in seen:
                raise KlstoreError(f"duplicate prompt id {prompt.id!r}")
            seen.add(prompt.id)
        check_outputs(compute.probes)  # steer's `save`: before any work
        say = _stderr_lines(progress)
        size = compute.batch_size if shard_size is None else shard_size
        return self._run_into(store, prompts, compute, run, size, prompt_path, source, say, None)

    def _run_into(self, store, prompts, compute, run, shard_size, prompt_path, source, say, computed) -> dict:
        """The one path into a store (`compute_into`, `Result.save`): the run plan of `klstore
        run` (run id, shards, resume, the `runs` row) and `execute_local` with a `Worker` around
        this Lens's model, which is not reloaded; `computed` (prompt id -> outcome): write these
        instead of computing them."""
        from klstore.run.plan import RunPlan, execute_local
        from klstore.spec import ExperimentConfig, ModelConfig

        check_label(self.label, "model label")
        cfg = ExperimentConfig(
            name=check_label(run, "run name"),
            store=str(store),
            models=(ModelConfig(**self._model_config),),
            prompt_paths=(prompt_path,) if prompt_path else (),
            compute=compute,
            shard_size=shard_size,
            source=source,
            prompts=tuple(prompts),
        )
        plan = RunPlan(cfg)  # an unwritable store fails here
        worker = Worker(self._model_config["name"], self.label, plan.target, loaded=self.loaded, engine=self.engine)
        worker.prepare(plan.job)  # layers, vectors, sub-layers: checked before anything is written
        for prompt in prompts:  # empty, or too long for the context: before anything is written
            worker.engine.encode(prompt, compute.generation)
        return execute_local(plan, worker, say=say, computed=computed)


def _names(value, what: str) -> list:
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise KlstoreError(f"{what}s must be a name or a list of names, got {value!r}") from None


def _probes(probes, seed: int) -> list[ProbeSpec]:
    """Names, ProbeSpecs or dicts -> ProbeSpecs; duplicates of the same probe are dropped (as in the CLI)."""
    out: dict[tuple, ProbeSpec] = {}
    for entry in _names(probes, "probe"):
        if isinstance(entry, ProbeSpec):
            probe = entry
        elif isinstance(entry, str):
            probe = ProbeSpec(entry, {"seed": seed} if entry == "noise" else None)
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            rest = {k: v for k, v in entry.items() if k != "name"}
            if set(rest) == {"params"} and isinstance(rest["params"], dict):
                rest = rest["params"]
            probe = ProbeSpec(entry["name"], rest)
        else:
            raise KlstoreError(
                f"a probe must be a name, a ProbeSpec or {{'name': ..., 'params': {{...}}}}, got {entry!r}"
            )
        out.setdefault(probe.key(), probe)
    if not out:
        raise KlstoreError("no probe asked for")
    names = [p.name for p in out.values()]
    twice = [name for name in names if names.count(name) > 1]
    if twice:
        raise KlstoreError(f"probe {twice[0]} given twice with different parameters (a store keeps one per name)")
    return list(out.values())


def _is_path(prompts) -> bool:
    return isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and prompts.endswith(".jsonl"))


def _prompts(prompts, source: str | None) -> list[Prompt]:
    """The `prompts` argument of `Lens.compute` -> validated Prompts (unique ids)."""
    from klstore.config import read_prompts
    from klstore.spec import parse_prompt

    if _is_path(prompts):
        if source is not None:
            raise KlstoreError('source= is for a single prompt text; a prompts file has "source" fields')
        return read_prompts(prompts)
    if isinstance(prompts, str):
        if not prompts.strip():
            raise KlstoreError("prompt is empty")
        return [Prompt("prompt", prompts, source=source)]
    if source is not None:
        raise KlstoreError('source= is for a single prompt text; give dicts with a "source" key')
    if isinstance(prompts, (Prompt, dict)):
        prompts = [prompts]
    try:
        items = list(prompts)
    except TypeError:
        raise KlstoreError(
            f"prompts must be a text, a list of texts or dicts, or a .jsonl path, got {type(prompts).__name__}"
        ) from None
    if not items:
        raise KlstoreError("no prompts")
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"prompts[{i}]"
        if isinstance(item, Prompt):
            prompt = item
        elif isinstance(item, str):
            if not item.strip():
                raise KlstoreError(f"prompt {f'p{i}'!r} is empty")
            prompt = Prompt(f"p{i}", item)
        else:
            prompt = parse_prompt(item, where)
        if prompt.id in seen:
            raise KlstoreError(f"{where}: duplicate id {prompt.id!r} (first at prompts[{seen[prompt.id]}])")
        seen[prompt.id] = i
        out.append(prompt)
    return out


class _Progress:
    """tqdm when installed (the notebook widget when ipywidgets is), else a stderr line per batch."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.bar = None
        self.start = time.perf_counter()

    def __enter__(self):
        if self.enabled:
            try:
                import importlib.util

                if importlib.util.find_spec("ipywidgets") is not None:
                    from tqdm.auto import tqdm
                else:
                    from tqdm import tqdm
                self.bar = tqdm(total=self.total, desc=self.label, unit="prompt", file=sys.stderr)
            except ImportError:
                self.bar = None
        return self

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        else:
            print(
                f"[{self.label}] {done}/{self.total} prompts, {time.perf_counter() - self.start:.1f} s", file=sys.stderr
            )

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


# ------------------------------------------------------------------- results
class Result:
    """The KL matrices of one `Lens.compute`: per prompt, one matrix per probe and divergence.

    Prompts are chosen by position (`0`) or id (`"p0"`); probes and divergences by name
    (default: the first asked for). `results` holds the engine's `KLMatrix` lists, one per prompt.
    """

    def __init__(self, lens: Lens, prompts, compute: ComputeSpec, results, prompt_path: str | None = None):
        self.lens = lens
        self.compute = compute
        """What was computed (`klstore.spec.ComputeSpec`): probes, layers, divergences, generation, options."""
        self.prompts: list[Prompt] = list(prompts)
        self.results = results
        self.run_id: str | None = None
        """The run id of the last `save` (None before); `to_pandas` fills its column with it."""
        self._prompt_path = prompt_path

    probes = property(lambda self: list(self.compute.probes), doc="The probes (`ProbeSpec`s).")
    layer_spec = property(lambda self: self.compute.layers, doc="The layer spec as given.")
    divergences = property(lambda self: tuple(self.compute.divergences), doc="The divergence names.")
    generation = property(lambda self: self.compute.generation, doc="The `GenerationSpec`.")
    topk = property(lambda self: self.compute.topk, doc="Lens tokens kept per cell.")
    clean_pass = property(lambda self: self.compute.clean_pass, doc="Where the clean trace came from.")
    matmul_precision = property(lambda self: self.compute.matmul_precision, doc="float32 matmul precision.")

    # ------------------------------------------------------------- choosing
    @property
    def model(self) -> str:
        """The model's label."""
        return self.lens.label

    @property
    def layers(self) -> tuple[int, ...]:
        """The block indices of the matrices' rows."""
        return self.results[0][0].layers

    @property
    def errors(self) -> list[str]:
        """Descriptions of non-finite cells (empty when every value is finite)."""
        return [err for matrices in self.results for m in matrices for err in m.errors]

    def _prompt_index(self, prompt) -> int:
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            if not -len(self.prompts) <= prompt < len(self.prompts):
                raise KlstoreError(f"prompt index {prompt} out of range: {len(self.prompts)} prompt(s)")
            return prompt % len(self.prompts)
        for i, p in enumerate(self.prompts):
            if p.id == prompt:
                return i
        raise KlstoreError(
            f"unknown prompt {prompt!r}: ids are {', '.join(p.id for p in self.prompts[:10])}"
            + (", ..." if len(self.prompts) > 10 else "")
        )

    def klmatrix(self, prompt=0, probe: str | None = None, *, lens: str | None = None):
        """The engine's `KLMatrix` of one prompt (index or id) and probe (name; default the first);
        `lens` (a lens id) picks among read-outs of several lenses of one kind."""
        matrices = self.results[self._prompt_index(prompt)]
        name = probe or self.compute.readouts[0]
        for m in matrices:
            if m.probe == name and lens in (None, m.lens_id):
                return m
        raise KlstoreError(f"unknown probe {name!r} in this result: {', '.join(self.compute.readouts)}")

    def _divergence(self, divergence: str | None) -> str:
        name = divergence or self.divergences[0]
        if name not in self.divergences:
            raise KlstoreError(f"divergence {name!r} was not computed: {', '.join(self.divergences)}")
        return name

    # ------------------------------------------------------------- values
    def matrix(self, prompt=0, probe: str | None = None, divergence: str | None = None):
        """numpy float32 array (len(layers), n_generated), in nats; NaN where non-finite.

        Row i is block `layers[i]`; column t is generated token Gen t. `kl` is KL(P_t || Q_{l,t})
        with P the clean model's distribution (docs/conventions.md).
        """
        return self.klmatrix(prompt, probe).values[self._divergence(divergence)].copy()

    def entropy(self, prompt=0, probe: str | None = None):
        """numpy float32 array (len(layers), n_generated): H(Q_{l,t}), the entropy of the row's
        read-out in nats (the kl rows' `q_entropy`; docs/conventions.md, "Entropy of Q"). At the
        last layer of the logit lens it is the output's entropy, `tokens()[t]["entropy"]`."""
        m = self.klmatrix(prompt, probe)
        if m.q_entropy is None:
            raise KlstoreError("this result has no entropy of Q")
        return m.q_entropy.copy()

    def top1(self, prompt=0, probe: str | None = None):
        """numpy bool array (len(layers), n_generated): argmax Q_{l,t} == Gen t."""
        return self.klmatrix(prompt, probe).top1_match.copy()

    def lens_tokens(self, prompt=0, probe: str | None = None) -> dict:
        """What each layer predicts: `topk[i][t]` lists the top-k tokens of Q_{layers[i], t}
        (`id`, `text`, `prob`, rank order), `gen_rank[i][t]` is the rank of Gen t under Q (1 =
        top) and `gen_logq[i][t]` its log-probability (the CLI's `--tokens --json`). Empty
        lists when computed with `topk=0` (ranks and log Q are kept)."""
        from klstore.output import lens_json

        m = self.klmatrix(prompt, probe)
        out = lens_json(m, self.lens.engine.tokenizer.decode)
        if out["topk"] is None:
            out = {"topk": [], "gen_rank": m.gen_rank.tolist(), "gen_logq": m.gen_logq.tolist()}
        return out

    def lens_table(self, prompt=0, probe: str | None = None) -> str:
        """The classic logit-lens table as text (rows = layers, cells = top-1 token of Q)."""
        from klstore.output import format_tokens

        return format_tokens(self.klmatrix(prompt, probe), self.lens.engine.tokenizer.decode)

    def tokens(self, prompt=0) -> list[dict]:
        """The clean continuation: per generated token its `gen_idx`, `id`, `text`, `logprob`
        (log P_t of the token) and `entropy` (of P_t, nats)."""
        m = self.klmatrix(prompt)
        gen = m.generation
        return [
            {"gen_idx": i, "id": int(t), "text": s, "logprob": float(lp), "entropy": float(h)}
            for i, (t, s, lp, h) in enumerate(zip(gen.token_ids, gen.token_texts, m.gen_logprob, m.gen_entropy))
        ]

    def _outcomes(self):
        from klstore.run.records import PromptOutcome

        return [PromptOutcome(matrices[0].prompt, tuple(matrices)) for matrices in self.results]

    def to_arrow(self):
        """The `kl` rows as a pyarrow Table with the `kl` view's columns (run_id null before `save`)."""
        import pyarrow as pa

        from klstore.run import records
        from klstore.store.tables import VIEW_COLUMNS

        outcomes = self._outcomes()
        parts = []
        for probe in self.compute.readouts:
            rows = records.kl_rows(outcomes, probe)  # the very rows `save` writes
            count = rows.num_rows
            rows = rows.append_column("run_id", pa.array([self.run_id] * count, pa.string()))
            rows = rows.append_column("model", pa.array([self.model] * count, pa.string()))
            rows = rows.append_column("probe", pa.array([probe] * count, pa.string()))
            parts.append(rows.select(list(VIEW_COLUMNS["kl"])))
        return pa.concat_tables(parts)

    def to_pandas(self):
        """Long form, one row per probe x prompt x layer x generated token, with the columns and
        meanings of the store's `kl` view: run_id (None before `save`), model, probe, prompt_id,
        prompt_group, layer, gen_idx, kl, kl_reverse, js (float32, null/NaN when not computed
        or non-finite), top1_match, n_layers."""
        return self.to_arrow().to_pandas()

    # ------------------------------------------------------------- pictures
    def plot(self, prompt=0, probe: str | None = None, divergence: str | None = None):
        """A matplotlib Figure of one matrix, drawn by `klstore.report.plotting` (the report's
        seed style; the same figure as `klstore compute --png`)."""
        from klstore.report import plotting

        return plotting.draw(heatmap_data(self.klmatrix(prompt, probe), self._divergence(divergence)))

    def savefig(
        self, path, prompt=0, probe: str | None = None, divergence: str | None = None, *, lens: str | None = None
    ) -> None:
        """Write `plot`'s figure to `path` (its suffix picks the format: .png, .svg, .pdf, ...),
        as `klstore compute --png` writes it."""
        from klstore.report import plotting

        plotting.save(heatmap_data(self.klmatrix(prompt, probe, lens=lens), self._divergence(divergence)), path)

    def summary(self) -> str:
        """One line: model, prompts, probes, layers, tokens, divergences."""
        n_gen = sorted({m[0].generation.n for m in self.results})
        tokens = str(n_gen[0]) if len(n_gen) == 1 else f"{n_gen[0]}-{n_gen[-1]}"
        return (
            f"klstore Result: {self.model}, {len(self.prompts)} prompt(s), "
            f"probes {', '.join(self.compute.readouts)}, {len(self.layers)} layer(s) "
            f"({self.layer_spec}), {tokens} generated token(s), {', '.join(self.divergences)}"
            + (f", run {self.run_id}" if self.run_id else "")
        )

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    def _repr_html_(self) -> str:
        import html

        fig = self.plot(0, self.probes[0].name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        png = base64.b64encode(buf.getvalue()).decode("ascii")
        return (
            f"<div><p>{html.escape(self.summary())}</p>"
            f'<img alt="{html.escape(fig.axes[0].get_title())}" src="data:image/png;base64,{png}"/></div>'
        )

    # ------------------------------------------------------------- storing
    def save(self, store: str = "./klstore-data", run: str = "api", *, progress: bool = True) -> str:
        """Write this result into a store (folder or `s3://bucket/prefix`); returns the run id.

        The run goes through the CLI's own path: `RunPlan` (run id `<run>-<hash>` of the same
        identity `klstore compute --store S --run RUN` hashes, shards of 16 prompts, resume,
        the `runs` row) and `execute_local` with a `Worker` around this Lens's model, which is
        not reloaded. The worker writes the matrices computed by `Lens.compute` (they are not
        recomputed): the same batches as the CLI's shards, so the stored rows are the ones the
        CLI writes. The `runs` row's config says `source: klstore api`.
        """
        say = _stderr_lines(progress)
        computed = {o.prompt.id: o for o in self._outcomes()}
        summary = self.lens._run_into(
            store,
            self.prompts,
            self.compute,
            run,
            self.compute.batch_size,
            self._prompt_path,
            "klstore api",
            say,
            computed,
        )
        self.run_id = summary["run_id"]
        return self.run_id


def _stderr_lines(enabled: bool):
    """The progress printer of a store run: one stderr line per message, or nothing."""
    return (lambda message: print(message, file=sys.stderr)) if enabled else (lambda message: None)


def heatmap_data(matrix, divergence: str):
    """The figure data of one KLMatrix and divergence (`Result.plot`, `klstore compute --png`)."""
    from klstore.report import plotting

    return plotting.HeatmapData(
        values=matrix.values[divergence],
        layers=matrix.layers,
        columns=plotting.column_labels(matrix.generation.n, matrix.generation.token_texts),
        title=f"{matrix.model} | {matrix.probe} | {matrix.prompt.id}",
        divergence=divergence,
    )


# ------------------------------------------------------------------- reading
def open_store(path: str = "./klstore-data") -> StoreReader:
    """Open a store (folder or `s3://bucket/prefix`) for reading. Raises KlstoreError if missing."""
    from klstore.store import open_store as _open

    return StoreReader(_open(str(path)))


def export_run(run: str, to, store: str | None = None, log=None) -> dict:
    """Write one run of a store (its id, or its name: the newest run of that name) as a dataset
    folder `to`: one Parquet config per table, the tokens and lens files, a dataset card
    (README.md) and every file's checksum; `datasets.load_dataset(to, "kl")` loads it (docs/dataset.md).
    Returns {"run_id", "folder", "rows": {config: rows}, "files"}."""
    import klstore
    from klstore.spec import DEFAULT_STORE
    from klstore.store import dataset

    version = f"klstore {klstore.__version__}"
    return dataset.export_run(store or DEFAULT_STORE, run, to, version, log or (lambda m: None))


def import_run(folder, store: str | None = None, log=None) -> dict:
    """Bring a folder written by `export_run` into a store under the same run id, after checking
    every file's checksum (nothing is written when one fails). Returns {"run_id", "store", "rows", "files"}."""
    from klstore.spec import DEFAULT_STORE
    from klstore.store import dataset_import

    return dataset_import.import_run(store or DEFAULT_STORE, folder, log or (lambda m: None))


class StoreReader:
    """SQL and mean heatmaps over a store's views `kl`, `generations`, `prompts`, `runs`."""

    def __init__(self, store):
        self.store = store

    def __repr__(self) -> str:
        return f"StoreReader({self.store.uri!r})" if hasattr(self.store, "uri") else "StoreReader()"

    def connect(self):
        """A DuckDB connection with the five views (`klstore.store.views.connect`)."""
        from klstore.store import views

        return views.connect(self.store)

    def sql(self, query: str, params=None):
        """Run one read-only query (as `klstore sql`: a query or EXPLAIN of one) over the views,
        values passed as `params` (`?` or `$name`), never pasted into the SQL; returns a pandas
        DataFrame. SQL errors and refused statements raise KlstoreError."""
        import duckdb

        from klstore.errors import first_line
        from klstore.store.views import execute

        result = execute(self.connect(), query, params)
        try:
            if result.description is None:  # a statement without rows
                import pandas as pd

                return pd.DataFrame()
            return result.df()  # keeps the views' types: SMALLINT -> int16, FLOAT -> float32
        except duckdb.Error as exc:
            raise KlstoreError(f"SQL error: {first_line(exc)}") from None

    def heatmap(self, model: str, probe: str, group: str | None = None, divergence: str = "kl", run: str | None = None):
        """A Figure of the mean `divergence` per (layer, generated token) over the prompts of
        `model` and `probe` (optionally one prompt group and one run id). Null values (non-finite
        or not computed) are left out of the mean; a cell with fewer prompts shows its count."""
        from klstore.report import plotting
        from klstore.store.upkeep import mean_map

        divergence = check_divergences([divergence])[0]
        rows, n_prompts = mean_map(self.connect(), divergence, model, probe, group, run)
        if not rows:
            raise KlstoreError(
                f"no kl rows for model {model!r}, probe {probe!r}"
                + (f", group {group!r}" if group is not None else "")
                + (f", run {run!r}" if run is not None else "")
            )
        import numpy as np

        layers = tuple(sorted({r[0] for r in rows}))
        n_cols = max(r[1] for r in rows) + 1
        values = np.full((len(layers), n_cols), np.nan)
        counts = np.zeros((len(layers), n_cols), dtype=int)
        index = {layer: i for i, layer in enumerate(layers)}
        for layer, gen_idx, value, count in rows:
            if value is not None:
                values[index[layer], gen_idx] = value
            counts[index[layer], gen_idx] = count
        title = " | ".join([model, probe] + ([group] if group is not None else [])) + f" | mean of {n_prompts} prompts"
        return plotting.draw(
            plotting.HeatmapData(
                values=values,
                layers=layers,
                columns=plotting.column_labels(n_cols),
                title=title,
                divergence=divergence,
                counts=counts,
            )
        )

    def differences(self, spec=None, **keys):
        """The numbers behind the report's comparison maps (model vs model, group vs group), one
        row per cell, as a pandas DataFrame: comparison (`models` or `groups`), model (groups
        only), probe, a, b, layer (or depth, for models of different depths), gen_idx,
        difference (a - b, the spec's aggregate over prompts), low and high (its bootstrap
        interval over prompts at `level`), paired, noise_floor, is_difference (the interval
        excludes 0 and |difference| >= the noise floor) and figure (the report's figure id).

        The same grids, floors and intervals as `klstore report` with that spec: `spec` is a
        report spec file (None: the built-in default, reports/default.yaml) and `keys` override
        its keys, e.g. `confidence=0.9, resamples=5000, models=["a", "b"]`. The method (paired
        or unpaired percentile bootstrap, seed): docs/reports.md, "Differences and their intervals"; for
        arrays of your own, `klstore.report.intervals.bootstrap_difference`.
        """
        import pandas as pd

        from klstore.config import load_report_spec
        from klstore.report import site
        from klstore.spec import parse_report_spec

        chosen = load_report_spec(spec)
        if keys:
            chosen = parse_report_spec({**chosen.describe(), **keys}, chosen.source)
        rows = site.differences(self.connect(), chosen)
        return pd.DataFrame(rows, columns=list(site.DIFFERENCE_COLUMNS))
