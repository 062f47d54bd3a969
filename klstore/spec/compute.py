"""What to compute for every prompt: prompts, generation settings, probes and their parameters,
lenses, and `ComputeSpec`, the one value that carries them (with the options: top-k, speed
modes, batch size) from config, CLI and API to the engine and the run identity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from klstore.errors import KlstoreError
from klstore.spec.messages import Value, checked, describe, fail, rule, schema_init, validate
from klstore.spec.values import (
    DEFAULT_CLEAN_PASS,
    DEFAULT_MATMUL_PRECISION,
    DEFAULT_TOPK,
    MAX_TOPK,
    LayerSpec,
    check_clean_pass,
    check_divergences,
    check_matmul_precision,
    check_topk,
)


# ---------------------------------------------------------------- prompts
class Prompt(Value):
    """One prompt: `source` is the paired prompt the patch probe copies from."""

    id: str
    text: str
    group: str = "default"
    source: str | None = None

    where: ClassVar[str] = "prompt"

    @schema_init
    def __init__(self, id: str, text: str, group: str = "default", source: str | None = None):
        super().__init__(id=id, text=text, group=group, source=source)


class _PromptRecord(Value):
    """A prompts-file line: {"id", "text", "group"?, "source"?}.

    A pair with Prompt that stays: a line may give an integer id (Prompt's is always the string)
    and its rules and messages are the file's (a non-empty id and group, `id.str must be a
    string` for other types), which a Prompt built in code does not have."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: str | int
    text: str
    group: str = "default"
    source: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value):
        if isinstance(value, bool) or str(value) == "":
            raise fail(f"must be a non-empty string or integer, got {value!r}")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value):
        if not value:
            raise fail("must be a non-empty string")
        return value


def parse_prompt(record, where: str) -> Prompt:
    """One prompt record (a dict) -> Prompt; `where` names it in errors (file:line)."""
    if not isinstance(record, dict):
        raise KlstoreError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("id", "text"):
        if key not in record:
            raise KlstoreError(f"{where}: missing {key!r}")
    unknown = set(record) - set(_PromptRecord.model_fields)
    if unknown:
        raise KlstoreError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: id, text, group, source)")
    checked = validate(_PromptRecord, record, where)
    if not checked.text.strip():
        raise KlstoreError(f"{where}: prompt {str(checked.id)!r} is empty")
    return Prompt(str(checked.id), checked.text, checked.group, checked.source)


# ------------------------------------------------------------- generation
class GenerationSpec(Value):
    """How the clean model continues the prompt. Greedy unless `do_sample`."""

    max_new_tokens: int = 5
    do_sample: bool = False
    seed: int = Field(0, ge=-(2**63), lt=2**64)  # SEED_RANGE: what a torch generator takes
    temperature: float = Field(1.0, gt=0)
    chat: bool = False

    @field_validator("max_new_tokens")
    @classmethod
    def _positive(cls, value):
        if value <= 0:
            raise fail(f"must be a positive integer, got {value!r}")
        return value

    @schema_init
    def __init__(self, max_new_tokens: int = 5, **data: Any):
        super().__init__(max_new_tokens=max_new_tokens, **data)


# ----------------------------------------------------------------- probes
class _NoParams(Value):
    pass


class _NoiseParams(Value):
    scale: float = Field(1.0, ge=0.0)
    seed: int = Field(0, ge=-(2**63), lt=2**64)


VECTOR_SUFFIXES = (".pt", ".npy", ".safetensors")


class _SteerParams(Value):
    alpha: float = 1.0
    vector: str | None = None
    positive: str | None = None
    negative: str | None = None
    save: str | None = None

    @field_validator("vector", "save")
    @classmethod
    def _vector_file(cls, value):
        if value is not None and not value.endswith(VECTOR_SUFFIXES):
            raise fail(f"must be a {', '.join(VECTOR_SUFFIXES)} file, got {value!r}")
        return value  # whether `save` can be written is klstore.config.check_outputs's

    @model_validator(mode="after")
    def _one_source(self):
        has_file = self.vector is not None
        has_sets = self.positive is not None or self.negative is not None
        if has_file == has_sets or (has_sets and (self.positive is None or self.negative is None)):
            raise fail(
                "give either vector (a .pt, .npy or .safetensors file) or both positive and negative (prompt files)"
            )
        return self


# Probe name -> its parameters (docs/conventions.md §5). What each does: klstore.core.probes.
# Adding a probe starts here.
PROBES: dict[str, type[Value]] = {
    "logit_lens": _NoParams,
    "skip": _NoParams,
    "ablate_attn": _NoParams,
    "ablate_mlp": _NoParams,
    "noise": _NoiseParams,
    "steer": _SteerParams,
    "patch": _NoParams,
}
READOUTS = ("logit_lens",)  # probes that decode a recorded state; the others intervene


class ProbeSpec(Value):
    """A probe name plus its parameters (defaults filled in), validated on creation."""

    name: str
    params: dict = Field(default_factory=dict)
    where: ClassVar[str] = "probe"

    # Not a schema_init: the checks below are the rules (the parameters' schema depends on the
    # name), so pydantic runs them for a ProbeSpec nested as a mapping too.
    def __init__(self, name: str, params: dict | None = None):
        if name not in PROBES:
            raise KlstoreError(f"unknown probe {name!r}: choose from {', '.join(PROBES)}")
        schema = PROBES[name]
        params = dict(params or {})
        unknown = [key for key in params if key not in schema.model_fields]
        if unknown:
            allowed = ", ".join(schema.model_fields)
            raise KlstoreError(
                f"probe {name}: unknown parameter {unknown[0]!r}"
                + (f" (allowed: {allowed})" if allowed else " (it takes none)")
            )
        try:
            full = schema.model_validate(params).model_dump(exclude_none=True)
        except ValidationError as exc:
            raise KlstoreError(describe(exc, f"probe {name}")) from None
        super().__init__(name=name, params=full)

    @property
    def is_readout(self) -> bool:
        return self.name in READOUTS

    def key(self) -> tuple:
        return (self.name, tuple(sorted(self.params.items())))


def probe_from_entry(entry) -> ProbeSpec:
    """A probe as configs write it: a name, or {name: ..., <parameters>}."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise fail("a probe name or {name: ..., ...}")
    return ProbeSpec(entry["name"], {k: v for k, v in entry.items() if k != "name"})


# ----------------------------------------------------------------- lenses
# kind -> the read-out probe name its kl rows carry (docs/conventions.md, "Lenses"). The read-out
# is asked for as `logit_lens` in `probes`; `lens` says which lenses read it. Rows read by the
# logit lens keep the name `logit_lens`, so every query written before lenses keeps its meaning.
LENS_READOUTS = {
    "logit": "logit_lens",
    "tuned": "tuned_lens",
    "least_squares": "least_squares_lens",
    "jacobian": "jacobian_lens",
}
LOGIT_LENS_ID = "logit"  # the lens_id of the logit lens (it has no parameters to hash)
LENS_ID_LENGTH = 16  # hex digits of a fitted lens's content hash


def is_lens_id(text: str) -> bool:
    """Whether `text` has the form of a fitted lens's id (16 lowercase hex digits)."""
    return len(text) == LENS_ID_LENGTH and all(c in "0123456789abcdef" for c in text)


class LensSpec(Value):
    """One lens reading the read-out probe. `kind` and `id` (the content hash of its parameters,
    `logit` for the logit lens) define it; `source` says where its files are (a lens folder or
    file, or a lens in the store) and is never part of a run's identity. A lens a user names by
    path or store id has no kind and id until it is resolved (klstore.core.lenses.resolve)."""

    kind: str = ""
    id: str = ""
    source: str = ""

    @classmethod
    def of(cls, value) -> LensSpec:
        """A lens as users write it: `logit`, a path, a store lens id, or a LensSpec."""
        if isinstance(value, LensSpec):
            return value
        if not isinstance(value, str) or not value.strip():
            raise KlstoreError(f"a lens is `logit`, a lens folder or file, or a lens id, got {value!r}")
        if value == "logit":
            return cls(kind="logit", id=LOGIT_LENS_ID)
        return cls(source=value)

    @property
    def resolved(self) -> bool:
        return bool(self.kind and self.id)

    @property
    def readout(self) -> str:
        """The probe name of the kl rows this lens reads."""
        return LENS_READOUTS[self.kind]

    def describe(self) -> str:
        return self.kind if self.kind == "logit" else f"{self.kind} lens {self.id or self.source}"


LOGIT_LENS = LensSpec.of("logit")


def _lens_list(value) -> tuple[LensSpec, ...]:
    """One lens or a list of lenses, without repeats (the order given is kept)."""
    if isinstance(value, (str, LensSpec)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise KlstoreError("lens must be a lens or a non-empty list of lenses")
    out: list[LensSpec] = []
    for entry in value:
        lens = LensSpec.of(entry)
        if lens not in out:
            out.append(lens)
    return tuple(out)


def check_lens(value) -> tuple[LensSpec, ...]:
    """The `lens` option: `logit`, a lens folder or file, or a lens id in the store; one or a list."""
    return _lens_list(value)


# ------------------------------------------------------- what to compute
@dataclass(frozen=True)
class Option:
    """How an option of `ComputeSpec` reaches users: the CLI flag `flag` of `klstore compute`
    (argparse `parse`, then `check`, whose messages CLI and API users see) and a keyword of
    `Lens.compute` (a field of ComputeOptions is also a config key of the same name).
    `identity`: the field joins the run identity when it is not its default (so runs written
    before the field existed keep their ids), as `identity_of(value)`. `repeat`: the flag may
    be given several times, and the field takes the list."""

    flag: str | None
    metavar: str | None = None
    help: str = ""
    check: Callable[[Any], Any] = lambda value: value
    parse: Callable[[str], Any] = str
    identity: bool = True
    identity_of: Callable[[Any], Any] = lambda value: value
    repeat: bool = False


def _int_or_text(text: str):
    """argparse type: an int when the text is one (the field's check then names the value)."""
    try:
        return int(text)
    except ValueError:
        return text


DEFAULT_BATCH_SIZE = 16  # prompts per batch in the engine, and per shard of `Result.save`


class ComputeOptions(Value):
    """The options of the compute value that are also config keys (ComputeSpec and the config
    file inherit them, so an option added here is both)."""

    topk: Annotated[
        int,
        Field(ge=0, le=MAX_TOPK),
        Option(
            "--topk",
            "K",
            "lens tokens kept per cell: the top-K tokens of Q (default 5, 0: none)",
            check=check_topk,
            parse=_int_or_text,
        ),
    ] = DEFAULT_TOPK
    clean_pass: Annotated[
        str,
        checked(check_clean_pass),
        Option(
            "--clean-pass",
            "MODE",
            "exact (default): a teacher-forced pass after generation; cached: take it "
            "from the generation's own passes (one forward fewer, values within float32 rounding)",
            check=check_clean_pass,
        ),
    ] = DEFAULT_CLEAN_PASS
    matmul_precision: Annotated[
        str,
        checked(check_matmul_precision),
        Option(
            "--matmul-precision",
            "P",
            "float32 matrix products: highest (default), high (TF32 on NVIDIA GPUs), "
            "medium (bfloat16 products, float32 accumulation)",
            check=check_matmul_precision,
        ),
    ] = DEFAULT_MATMUL_PRECISION
    lens: Annotated[
        tuple[LensSpec, ...],
        BeforeValidator(lambda value: rule(check_lens, value)),
        Option(
            "--lens",
            "LENS",
            "which lens reads the logit_lens probe: logit (default), a lens folder or file "
            "(tuned-lens format), or a lens id from the store; repeat to read through several",
            check=check_lens,
            identity_of=lambda lenses: [{"kind": lens.kind, "id": lens.id} for lens in lenses],
            repeat=True,
        ),
    ] = (LOGIT_LENS,)


class ComputeSpec(ComputeOptions):
    """What to compute for every prompt, whatever the model: the one value that the experiment
    config, the run plan, the engine and the Python API's `Result` carry whole.

    `probes` (with their parameters), `layers` (a layer spec), `divergences` and `generation`
    always define a run's identity. Every other field is an option (its `Option` says how it
    reaches the config, the CLI and `Lens.compute`): each has one default and one validator
    here, and joins the identity only when it is not its default. Adding one: a field on
    ComputeOptions when it is also a config key (else here), its meaning in
    docs/conventions.md, and the code that uses it (docs/architecture.md).
    """

    probes: tuple[ProbeSpec, ...] = Field(default_factory=lambda: (ProbeSpec("logit_lens"),), min_length=1)
    layers: LayerSpec = "all"
    divergences: tuple[str, ...] = ("kl",)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    # how many prompts share a forward pass: moves values by rounding only (the noise floor),
    # so it is no part of the identity; no flag (`--shard-size` sets a stored run's batches)
    batch_size: Annotated[int, Field(ge=1), Option(None, identity=False)] = DEFAULT_BATCH_SIZE

    @schema_init
    def __init__(self, probes=None, layers: str | int = "all", divergences=("kl",), generation=None, **options: Any):
        data = {"layers": layers, "divergences": divergences, **options}
        if probes is not None:
            data["probes"] = probes
        if generation is not None:
            data["generation"] = generation
        super().__init__(**data)

    @field_validator("probes", mode="before")
    @classmethod
    def _probes(cls, value):
        if isinstance(value, (str, dict, ProbeSpec)):
            value = [value]
        try:
            return tuple(entry if isinstance(entry, ProbeSpec) else probe_from_entry(entry) for entry in value)
        except KlstoreError as exc:
            raise fail(str(exc)) from None
        except TypeError:
            raise fail("must be a probe name or a list of probes") from None

    @field_validator("divergences", mode="before")
    @classmethod
    def _divergences(cls, value):
        return rule(check_divergences, [value] if isinstance(value, str) else value)

    @classmethod
    def options(cls) -> dict[str, tuple[Any, Option]]:
        """Every option field: name -> (its pydantic FieldInfo, its Option)."""
        out = {}
        for name, info in cls.model_fields.items():
            option = next((m for m in info.metadata if isinstance(m, Option)), None)
            if option is not None:
                out[name] = (info, option)
        return out

    @classmethod
    def check_options(cls, values: dict) -> dict:
        """CLI and API values of the options, each through its Option's check (their messages)."""
        options = cls.options()
        unknown = [name for name in values if name not in options]
        if unknown:
            raise KlstoreError(f"unknown option {unknown[0]!r} (options: {', '.join(options)})")
        return {name: options[name][1].check(value) for name, value in values.items()}

    def identity(self) -> dict:
        """This value's part of a run's identity (ExperimentConfig.identity, hashed into run ids)."""
        out: dict[str, Any] = {
            "probes": [{"name": p.name, **p.params} for p in self.probes],
            "layers": self.layers,
            "divergences": list(self.divergences),
            "generation": self.generation.model_dump(),
        }
        unresolved = [lens.source for lens in self.lens if not lens.resolved]
        if unresolved:  # a path or store id: its id is the hash of what it names (core.lenses.resolve)
            raise KlstoreError(f"lens {unresolved[0]!r} is not resolved to its id yet")
        for name, (info, option) in self.options().items():
            value = getattr(self, name)
            if option.identity and value != info.get_default(call_default_factory=True):
                out[name] = option.identity_of(value)
        return out

    @property
    def readouts(self) -> tuple[str, ...]:
        """The probe names of the kl rows this value writes: each intervention once, and the
        read-out once per lens (`LensSpec.readout`)."""
        out: list[str] = []
        for probe in self.probes:
            out += [lens.readout for lens in self.lens] if probe.is_readout else [probe.name]
        return tuple(dict.fromkeys(out))


def check_patch_sources(probes, prompts, where: str | None = None) -> None:
    """The patch probe needs every prompt's `source`. `where` (a config's "file: probes: ")
    gives the config's message; without it, the message of `compute` and the Python API."""
    if any(p.name == "patch" for p in probes):
        missing = [p.id for p in prompts if not p.source]
        if missing and where is not None:
            raise KlstoreError(
                f"{where}patch needs a source for every prompt; {len(missing)} have none (first: {missing[0]!r})"
            )
        if missing:
            raise KlstoreError(
                f"prompt {missing[0]!r} has no source (the patch probe needs one: "
                '--source, or a "source" field in the prompts file)'
            )
