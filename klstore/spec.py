"""The ground floor: every value type of klstore and its validation, in one place.

Prompts, generation settings, probes and their parameters, divergence names,
labels and run names, layer-spec syntax, experiment configs and report specs.
Each is declared once as a pydantic model (`extra="forbid"`, strict types, no
NaN or infinity), and one function, `_describe`, turns any validation failure
into the one-line message users see:

    <where>: <key path> must be <what>, got <value>
    <where>: <key path>: unknown key (allowed: ...)

This module imports neither torch, transformers, ray, duckdb nor pyarrow:
everything else in klstore imports down to it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from klstore.errors import KlstoreError

DEFAULT_STORE = "./klstore-data"

# Divergence name -> its figure label. The math is klstore.core.divergence; the
# store has one float32 column per name. Adding a divergence starts here.
DIVERGENCES: dict[str, str] = {
    "kl": "KL divergence",
    "kl_reverse": "Reverse KL divergence",
    "js": "Jensen-Shannon divergence",
}


# ------------------------------------------------------------ validation
class _Value(BaseModel):
    """Base of every validated value: unknown keys, wrong types and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def _checked_init(self, where: str, **data: Any) -> None:
        """For values that code builds directly (`Prompt(...)`): errors become KlstoreErrors.
        Only leaf types use it: pydantic calls an overridden __init__ for nested values too."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise KlstoreError(_describe(exc, where)) from None


def _fail(message: str) -> PydanticCustomError:
    """A rule's own message (used verbatim after the key path)."""
    return PydanticCustomError("klstore", message)


def _rule(check, *args):
    """Run a plain check inside a validator: its KlstoreError becomes this key's error."""
    try:
        return check(*args)
    except KlstoreError as exc:
        raise _fail(str(exc)) from None


_TYPE_PHRASES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "dataclass_type": "a mapping",
    "finite_number": "a finite number",
}


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and ("[" in part or part.startswith(("function-", "union")))):
            out += f".{part}" if out else str(part)
    return out


def _what_of(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _TYPE_PHRASES:
        return _TYPE_PHRASES[kind]
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        return f"at least {bound}" if isinstance(bound, int) else f">= {bound:g}"
    if kind == "greater_than":
        return f"> {ctx['gt']:g}"
    if kind == "less_than":
        return f"< {ctx['lt']}"
    if kind == "less_than_equal":
        bound = ctx["le"]
        return f"at most {bound}" if isinstance(bound, int) else f"<= {bound:g}"
    if kind == "literal_error":
        return str(ctx.get("expected", "")).replace("'", "")
    return error["msg"][0].lower() + error["msg"][1:]


def _describe(exc: ValidationError, where: str, allowed: dict | None = None) -> str:
    """The first validation error as one line: where, key path, what was expected, the value."""
    error = exc.errors(include_url=False)[0]
    key = _path(error["loc"])
    head = f"{where}: {key}" if where and key else (where or key)
    if error["type"] == "klstore":
        message = error["msg"]
        return f"{head} {message}" if message.startswith("must") else (f"{head}: {message}" if head else message)
    if error["type"] == "extra_forbidden":
        parent = re.sub(r"\[\d+\]", "", key).rpartition(".")[0]
        return f"{head}: unknown key" + (f" (allowed: {allowed[parent]})" if allowed and parent in allowed else "")
    if error["type"] == "too_short":
        return f"{head}: empty"
    if error["type"] == "missing":
        return f"{head}: missing (required)"
    return f"{head} must be {_what_of(error)}, got {error.get('input')!r}"


def validate(model: type[_Value], data: Any, where: str = "") -> Any:
    """Build `model` from plain data (YAML, JSON, CLI values); errors are KlstoreErrors naming `where`."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{where or model.__name__} must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KlstoreError(_describe(exc, where, _allowed_keys(model))) from None


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Key path prefix -> the allowed keys there, for 'unknown key' messages."""
    out = {prefix: ", ".join(sorted(k for k, f in model.model_fields.items() if not f.exclude))}
    for name, info in model.model_fields.items():
        inner = getattr(info.annotation, "__args__", (info.annotation,))
        for arg in inner:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out.update(_allowed_keys(arg, f"{prefix}.{name}" if prefix else name))
    return out


# ----------------------------------------------------------------- names
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def write_problem(folder: str | Path) -> str | None:
    """Why a file cannot be created in `folder` ('does not exist', 'not writable: <reason>'),
    or None. It creates and removes a file there: os.access says yes to root on read-only
    mounts and on /proc, where creating a file fails. Every path klstore writes (figures,
    vectors, reports, stores) is checked with it before work starts."""
    import tempfile

    if not os.path.isdir(folder):
        return "does not exist"
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".klstore-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return f"is not writable ({exc.strerror or exc})"
    return None


def check_label(value: str, what: str) -> str:
    """A model label, probe, report or run name used in a path: letters, digits, . _ + - only."""
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise KlstoreError(
            f"{what} {value!r} cannot name a store folder: use letters, digits, '.', '_', '+', '-' "
            "(no '/', no '..', not starting with '.')"
        )
    return value


def model_label(model_name: str) -> str:
    """Default store label of a model: built-in name, hub id owner/name -> owner--name, path -> stem."""
    if model_name.count("/") == 1 and not model_name.startswith((".", "/", "~")) and not os.path.exists(model_name):
        return model_name.replace("/", "--")
    if "/" in model_name or os.sep in model_name:
        path = PurePath(model_name.rstrip("/"))
        return path.stem if path.suffix == ".gguf" else path.name
    return model_name


# dtype names accepted by --dtype and `dtype:` (auto: bf16 on CUDA, fp32 on CPU)
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda|cuda:\d+)$")


def check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise KlstoreError(f"unknown dtype {value!r}: choose {', '.join(DTYPES)}")
    return value


def check_device(value: str) -> str:
    """The device's syntax (auto, cpu, mps, cuda, cuda:N); whether it exists is checked where it runs."""
    if not _DEVICE.match(value):
        raise KlstoreError(f"unknown device {value!r}: choose auto, cpu, cuda, cuda:N or mps")
    return value


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(value):
    """An accelerate device_map: a strategy name, or {module name: device} where a device is a
    GPU index, cpu, disk or cuda[:N]. `meta` is refused: a module left there has no weights."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in DEVICE_MAP_STRATEGIES:
            raise KlstoreError(
                f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a mapping "
                f"of module names to devices, got {value!r}"
            )
        return value
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise KlstoreError(f"device_map must be a strategy name or a mapping of module names to devices, got {value!r}")
    for module, device in value.items():
        if device == "meta":
            raise KlstoreError(
                f"device_map puts {module!r} on the meta device, where it has no weights: "
                "give it a GPU index, cpu or disk"
            )
        if isinstance(device, bool) or not (
            isinstance(device, int)
            and device >= 0
            or device in ("cpu", "disk")
            or isinstance(device, str)
            and re.fullmatch(r"cuda(:\d+)?", device)
        ):
            raise KlstoreError(f"device_map[{module!r}] must be a GPU index, cpu, disk or cuda:N, got {device!r}")
    return dict(value)


DEFAULT_TOPK = 5  # lens tokens per cell (docs/conventions.md, "Lens tokens")
MAX_TOPK = 100


def check_topk(value) -> int:
    """A number of lens tokens per cell: an integer from 0 (none) to MAX_TOPK."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOPK:
        raise KlstoreError(f"topk must be an integer from 0 to {MAX_TOPK}, got {value!r}")
    return value


CLEAN_PASSES = ("exact", "cached")  # README, "How the engine works": where the clean trace comes from
DEFAULT_CLEAN_PASS = CLEAN_PASSES[0]


def check_clean_pass(value) -> str:
    """`exact` (default): one teacher-forced pass after generation; `cached`: the clean trace is
    taken from the generation's own KV-cached passes (one pass fewer; values move by float32
    rounding, up to ~5e-5 nats on SmolLM2, which each run's noise floor measures)."""
    if value not in CLEAN_PASSES:
        raise KlstoreError(f"unknown clean pass {value!r}: choose {', '.join(CLEAN_PASSES)}")
    return value


MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's values
DEFAULT_MATMUL_PRECISION = MATMUL_PRECISIONS[0]


def check_matmul_precision(value) -> str:
    """float32 matrix products: `highest` (default: true float32), `high` (TF32 on NVIDIA GPUs
    from Ampere on; float32 on CPU), `medium` (also bfloat16 products with float32 accumulation
    on CPUs, through oneDNN). Divergences stay float32 either way (core.engine.matmul_precision_of)."""
    if value not in MATMUL_PRECISIONS:
        raise KlstoreError(f"unknown matmul precision {value!r}: choose {', '.join(MATMUL_PRECISIONS)}")
    return value


# The opt-in speed modes: option of ComputeSpec (config key, CLI flag, compute() argument) -> (check,
# default). Each joins ExperimentConfig.identity() when not its default.
SPEED_MODES = {
    "clean_pass": (check_clean_pass, DEFAULT_CLEAN_PASS),
    "matmul_precision": (check_matmul_precision, DEFAULT_MATMUL_PRECISION),
}


def check_divergences(names) -> tuple[str, ...]:
    """Validate divergence names; returns them as a tuple, deduplicated in order."""
    result: list[str] = []
    for name in names:
        if name not in DIVERGENCES:
            raise KlstoreError(f"unknown divergence {name!r}: choose from {', '.join(DIVERGENCES)}")
        if name not in result:
            result.append(name)
    if not result:
        raise KlstoreError("no divergence asked for: choose from " + ", ".join(DIVERGENCES))
    return tuple(result)


# ------------------------------------------------------------ layer specs
_INT = r"-?\d+"
_ITEM = re.compile(rf"^({_INT})(?:-({_INT}))?$")
_ANY_DEPTH = 10**6  # for checking a spec's syntax before the model (and its depth) is known


def parse_layers(spec: str, n_layers: int = _ANY_DEPTH, model_name: str = "the model") -> tuple[int, ...]:
    """Resolve a layer spec (`all`, `0,15-21,27`, `-4--1`) against a model with `n_layers` blocks.

    Returns the distinct block indices in increasing order; negative indices count
    from the end. Without `n_layers`, checks the syntax only.
    """
    text = str(spec).strip().replace(" ", "")
    if text.lower() == "all":
        return tuple(range(n_layers))
    if not text:
        raise KlstoreError("empty layer spec: use 'all' or e.g. '0,15-21,27'")
    chosen: set[int] = set()
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise KlstoreError(
                f"malformed layer spec {spec!r}: {item!r} is not a layer or a range (examples: all, 0,15-21,27, -4--1)"
            )
        start = _resolve(int(match.group(1)), n_layers, model_name)
        end = start if match.group(2) is None else _resolve(int(match.group(2)), n_layers, model_name)
        if end < start:
            raise KlstoreError(f"malformed layer spec {spec!r}: range {item!r} runs backwards")
        chosen.update(range(start, end + 1))
    return tuple(sorted(chosen))


def _resolve(index: int, n_layers: int, model_name: str) -> int:
    resolved = index + n_layers if index < 0 else index
    if not 0 <= resolved < n_layers:
        raise KlstoreError(f"layer {index}: {model_name} has {n_layers} layers, 0-{n_layers - 1}")
    return resolved


def _layer_spec(value) -> str:
    """A layer spec given as text or a single integer; its syntax is checked here."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail("must be a layer spec such as all or 0,15-21,27")
    try:
        parse_layers(str(value))
    except KlstoreError as exc:
        raise _fail(str(exc)) from None
    return str(value)


LayerSpec = Annotated[str, BeforeValidator(_layer_spec)]  # a layer spec's text, its syntax checked


# ---------------------------------------------------------------- prompts
class Prompt(_Value):
    """One prompt: `source` is the paired prompt the patch probe copies from."""

    id: str
    text: str
    group: str = "default"
    source: str | None = None

    def __init__(self, id: str, text: str, group: str = "default", source: str | None = None):
        self._checked_init("prompt", id=id, text=text, group=group, source=source)


class _PromptRecord(_Value):
    """A prompts-file line: {"id", "text", "group"?, "source"?}."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: str | int
    text: str
    group: str = "default"
    source: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value):
        if isinstance(value, bool) or str(value) == "":
            raise _fail(f"must be a non-empty string or integer, got {value!r}")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value):
        if not value:
            raise _fail("must be a non-empty string")
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


def read_text(path: Path, what: str, kind: str) -> str:
    """A UTF-8 text file (`what`: e.g. "prompts file", `kind`: e.g. "JSON Lines"); a missing,
    unreadable, non-UTF-8 or folder path is one KlstoreError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KlstoreError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise KlstoreError(f"{what} {path} is a folder, not a {kind} file") from None
    except UnicodeDecodeError as exc:
        raise KlstoreError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise KlstoreError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a JSON Lines prompt file; errors name the file and line."""
    path = Path(path)
    lines = read_text(path, "prompts file", "JSON Lines").splitlines()
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KlstoreError(f"{where}: invalid JSON ({exc.msg})") from None
        prompt = parse_prompt(record, where)
        if prompt.id in seen:
            raise KlstoreError(f"{where}: duplicate id {prompt.id!r} (first on line {seen[prompt.id]})")
        seen[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise KlstoreError(f"{path}: no prompts")
    return prompts


def read_yaml(path: str | Path, what: str):
    """A YAML file's data; a missing file or invalid YAML is a KlstoreError naming file and line."""
    import yaml

    path = Path(path)
    text = read_text(path, what, "YAML")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise KlstoreError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None


# ------------------------------------------------------------- generation
class _GenerationFields(_Value):
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
            raise _fail(f"must be a positive integer, got {value!r}")
        return value


class GenerationSpec(_GenerationFields):
    __doc__ = _GenerationFields.__doc__

    def __init__(self, max_new_tokens: int = 5, **data: Any):
        self._checked_init("", max_new_tokens=max_new_tokens, **data)


# ----------------------------------------------------------------- probes
class _NoParams(_Value):
    pass


class _NoiseParams(_Value):
    scale: float = Field(1.0, ge=0.0)
    seed: int = Field(0, ge=-(2**63), lt=2**64)


VECTOR_SUFFIXES = (".pt", ".npy", ".safetensors")


class _SteerParams(_Value):
    alpha: float = 1.0
    vector: str | None = None
    positive: str | None = None
    negative: str | None = None
    save: str | None = None

    @field_validator("vector", "save")
    @classmethod
    def _vector_file(cls, value, info):
        if value is not None and not value.endswith(VECTOR_SUFFIXES):
            raise _fail(f"must be a {', '.join(VECTOR_SUFFIXES)} file, got {value!r}")
        if info.field_name == "save" and value is not None:
            if os.path.isdir(value):
                raise _fail(f"cannot be written: {value!r} is a folder")
            folder = os.path.dirname(value) or "."
            if write_problem(folder) is not None:
                raise _fail(f"cannot be written: folder {folder!r} does not exist or is not writable")
        return value

    @model_validator(mode="after")
    def _one_source(self):
        has_file = self.vector is not None
        has_sets = self.positive is not None or self.negative is not None
        if has_file == has_sets or (has_sets and (self.positive is None or self.negative is None)):
            raise _fail(
                "give either vector (a .pt, .npy or .safetensors file) or both positive and negative (prompt files)"
            )
        return self


# Probe name -> its parameters (docs/conventions.md §5). What each does: klstore.core.probes.
# Adding a probe starts here.
PROBES: dict[str, type[_Value]] = {
    "logit_lens": _NoParams,
    "skip": _NoParams,
    "ablate_attn": _NoParams,
    "ablate_mlp": _NoParams,
    "noise": _NoiseParams,
    "steer": _SteerParams,
    "patch": _NoParams,
}
READOUTS = ("logit_lens",)  # probes that decode a recorded state; the others intervene


class ProbeSpec(_Value):
    """A probe name plus its parameters (defaults filled in), validated on creation."""

    name: str
    params: dict = Field(default_factory=dict)

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
            raise KlstoreError(_describe(exc, f"probe {name}")) from None
        self._checked_init("probe", name=name, params=full)

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
        raise _fail("a probe name or {name: ..., ...}")
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


class LensSpec(_Value):
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


def _checked(check):
    return AfterValidator(lambda value: _rule(check, value))


DEFAULT_BATCH_SIZE = 16  # prompts per batch in the engine, and per shard of `Result.save`


class ComputeOptions(_Value):
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
        _checked(check_clean_pass),
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
        _checked(check_matmul_precision),
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
        BeforeValidator(lambda value: _rule(check_lens, value)),
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

    def __init__(self, probes=None, layers: str | int = "all", divergences=("kl",), generation=None, **options: Any):
        data = {"layers": layers, "divergences": divergences, **options}
        if probes is not None:
            data["probes"] = probes
        if generation is not None:
            data["generation"] = generation
        self._checked_init("", **data)

    @field_validator("probes", mode="before")
    @classmethod
    def _probes(cls, value):
        if isinstance(value, (str, dict, ProbeSpec)):
            value = [value]
        try:
            return tuple(entry if isinstance(entry, ProbeSpec) else probe_from_entry(entry) for entry in value)
        except KlstoreError as exc:
            raise _fail(str(exc)) from None
        except TypeError:
            raise _fail("must be a probe name or a list of probes") from None

    @field_validator("divergences", mode="before")
    @classmethod
    def _divergences(cls, value):
        return _rule(check_divergences, [value] if isinstance(value, str) else value)

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


# ---------------------------------------------------------- experiments
class ModelConfig(_Value):
    """One model of an experiment: what to load and how many actors of what size."""

    name: str
    label: str = ""
    dtype: str = "auto"
    device: str = "auto"

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value):
        return _rule(check_dtype, value)

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        return _rule(check_device, value)

    num_gpus: float = Field(1.0, ge=0.0)
    num_cpus: float | None = Field(None, gt=0)  # None: 1 with GPUs, else the CPUs shared among actors
    actors: int | None = Field(None, ge=1)  # None: as many as the cluster's resources allow
    trust_remote_code: bool = False
    # Split one model over an actor's devices (accelerate): a strategy or {module: device}.
    # None: "balanced" when the actor has several GPUs (num_gpus > 1), else the whole model on one device.
    device_map: Any = None  # str | {module: device}, checked by check_device_map
    max_memory: dict[str | int, str | int] | None = None  # per device, e.g. {0: 20GiB, cpu: 64GiB}

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value):
        return _rule(check_device_map, value)

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, value):
        if value > 1 and value != int(value):  # Ray splits one GPU, never several
            raise _fail(f"num_gpus above 1 must be a whole number, got {value:g}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        if isinstance(data, str):
            data = {"name": data}
        if isinstance(data, dict):
            data = dict(data)
            if data.get("num_cpus") == "auto":
                data["num_cpus"] = None
            if "label" not in data and isinstance(data.get("name"), str):
                data["label"] = model_label(data["name"])
        return data

    @field_validator("label")
    @classmethod
    def _label(cls, value):
        return _rule(check_label, value, "model label")


class _PromptSource(_Value):
    path: str

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data):
        return {"path": data} if isinstance(data, str) else data


class _ExperimentFile(ComputeOptions):
    """An experiment config as written in YAML (see klstore.config for an example); its
    option keys (topk, speed modes, ...) are the compute value's (ComputeOptions)."""

    name: str = "run"
    store: str = DEFAULT_STORE
    models: list[ModelConfig] = Field(min_length=1)
    prompts: list[_PromptSource]
    probes: list[Any] = Field(min_length=1)
    layers: LayerSpec = "all"
    generation: _GenerationFields = Field(default_factory=_GenerationFields)
    divergences: list[str] = ["kl"]
    shard_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    shared_store: bool = False  # a local-folder store that every node of a cluster mounts (NFS, ...)

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return _rule(check_label, value, "run name")

    @field_validator("generation", mode="before")
    @classmethod
    def _generation(cls, value):
        return {} if value is None else value

    @field_validator("probes")
    @classmethod
    def _probes(cls, value):
        out = []
        for entry in value:
            try:
                out.append(probe_from_entry(entry))
            except KlstoreError as exc:
                raise _fail(str(exc)) from None
        return out

    @field_validator("divergences")
    @classmethod
    def _divergences(cls, value):
        return list(_rule(check_divergences, value))

    @model_validator(mode="after")
    def _labels(self):
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise _fail("models: duplicate model label (set `label:`)")
        return self


class ExperimentConfig(_Value):
    """A validated experiment: models x prompts x probes x layers x divergences."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    name: str
    store: str
    models: tuple[ModelConfig, ...]
    prompt_paths: tuple[str, ...]
    compute: ComputeSpec
    shard_size: int
    source: str = ""  # the file it came from
    prompts: tuple[Prompt, ...] = ()
    shared_store: bool = False  # where the work goes, not what it is: not part of the identity

    # the compute value's core fields, read often enough to be named here too
    @property
    def probes(self) -> tuple[ProbeSpec, ...]:
        return self.compute.probes

    @property
    def layers(self) -> str:
        return self.compute.layers

    @property
    def divergences(self) -> tuple[str, ...]:
        return self.compute.divergences

    @property
    def generation(self) -> GenerationSpec:
        return self.compute.generation

    def identity(self) -> dict:
        """What defines the work (not where it goes): hashed into the run id. The compute
        value's options join it only when not their defaults (ComputeSpec.identity), so run ids
        of stores written before an option existed stay the same."""
        import hashlib

        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(f"{prompt.id}\t{prompt.group}\t{prompt.text}\t{prompt.source}\n".encode())
        return {
            **self.compute.identity(),
            "name": self.name,
            "models": [{"name": m.name, "label": m.label, "dtype": m.dtype} for m in self.models],
            "prompts_sha256": digest.hexdigest(),
            "shard_size": self.shard_size,
        }


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


def parse_experiment(data, source: str = "config", base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a config mapping and read its prompt files (relative to base_dir, else the cwd)."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{source}: config must be a mapping")
    raw = validate(_ExperimentFile, data, source)
    paths: list[str] = []
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}  # prompt id -> the file it came from
    for entry in raw.prompts:
        path = Path(entry.path)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        for prompt in read_prompts(path):
            if prompt.id in seen:
                raise KlstoreError(f"{path}: duplicate id {prompt.id!r} (also in {seen[prompt.id]})")
            seen[prompt.id] = str(path)
            prompts.append(prompt)
        paths.append(str(path))
    check_patch_sources(raw.probes, prompts, f"{source}: probes: ")
    compute = ComputeSpec(
        raw.probes,
        raw.layers,
        tuple(raw.divergences),
        GenerationSpec(**raw.generation.model_dump()),
        **{name: getattr(raw, name) for name in ComputeOptions.model_fields},
    )
    return ExperimentConfig(
        name=raw.name,
        store=raw.store,
        models=tuple(raw.models),
        prompt_paths=tuple(paths),
        compute=compute,
        shard_size=raw.shard_size,
        source=source,
        prompts=tuple(prompts),
        shared_store=raw.shared_store,
    )


# ------------------------------------------------------------ lens fits
class CorpusSpec(_Value):
    """The text a lens is fitted on (klstore.core.corpus): a text file (one document), a folder
    of them, a JSON Lines file with a `text` field, or a Hugging Face dataset name (`name` or
    `name:config`), packed into sequences of `seq_len` tokens; the last `held_out` sequences are
    the evaluation split, and the training split is the first `train_sequences` of the others
    (all when absent)."""

    path: str
    seq_len: int = Field(128, ge=2, le=1_000_000)
    held_out: int = Field(16, ge=1)
    train_sequences: int | None = Field(None, ge=1)
    text_field: str = "text"
    split: str = "train"  # of a Hugging Face dataset
    max_documents: int | None = Field(None, ge=1)


class TunedRecipe(_Value):
    """How the tuned lens is trained: tuned-lens 0.2.0's defaults (its `train` command), but for
    the token budget, which is required (tuned-lens's 250 x 2**18 ~ 65M tokens is weeks on a CPU).
    SGD with Nesterov momentum at lr_scale x (1 - momentum) (0.1), coupled weight decay, gradients
    clipped to norm `max_grad_norm`, linear warm-up then linear decay to 0 at the last step."""

    tokens: int = Field(ge=1)  # training tokens seen in all (steps = tokens / tokens_per_step)
    tokens_per_step: int = Field(2**18, ge=1)
    lr_scale: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-3, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0  # the order of the training sequences

    @property
    def lr(self) -> float:
        """The SGD learning rate at the end of warm-up (tuned-lens: lr_scale x (1 - momentum))."""
        return self.lr_scale * (1 - self.momentum) if self.momentum else self.lr_scale


class JacobianRecipe(_Value):
    """The Jacobian lens's estimator (klstore.core.jacobian): the reference's options."""

    skip: int = Field(16, ge=0)  # leading positions excluded from the valid positions V
    dim_batch: int = Field(8, ge=1)  # output dimensions per backward pass
    max_len: int | None = Field(None, ge=2)  # cut each prompt to this many tokens
    shard_size: int = Field(4, ge=1)  # prompts per checkpointed shard in the store
    # the blocks to fit, as a layer spec (`20-26`, `-8--2`); None: every block but the last (the
    # reference's default). The last block's J is the identity and is never fitted.
    source_layers: LayerSpec | None = None

    def identity(self) -> dict:
        """The recipe's part of a fit's id; source_layers only when given, so the ids of fits
        made before the option existed stay the same."""
        return self.model_dump(exclude=None if self.source_layers is not None else {"source_layers"})


FIT_KINDS = ("tuned", "least_squares", "jacobian")


class FitSpec(_Value):
    """A lens fit (`klstore lens fit CONFIG`): one model, one corpus, one lens kind."""

    name: str = "lens-fit"
    store: str = DEFAULT_STORE
    model: ModelConfig
    kind: Literal["tuned", "least_squares", "jacobian"]
    init: Literal["identity", "least_squares"] = "least_squares"  # tuned: where training starts
    corpus: CorpusSpec
    train: TunedRecipe | None = None  # required for kind tuned
    jacobian: JacobianRecipe = Field(default_factory=JacobianRecipe)  # kind jacobian
    workers: int = Field(1, ge=1)  # Ray Train workers (one model copy each)
    batch_size: int = Field(4, ge=1)  # sequences per forward pass on a worker
    checkpoint_every: int = Field(10, ge=1)  # training steps between checkpoints in the store

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return _rule(check_label, value, "fit name")

    @model_validator(mode="before")
    @classmethod
    def _model(cls, data):
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data

    @model_validator(mode="after")
    def _recipe(self):
        if self.kind == "tuned" and self.train is None:
            raise _fail("train: a tuned lens needs a training recipe with at least `tokens:`")
        if self.kind == "jacobian":
            length = min(self.corpus.seq_len, self.jacobian.max_len or self.corpus.seq_len)
            if length <= self.jacobian.skip + 1:
                raise _fail(
                    f"jacobian: prompts of {length} tokens have no valid position with skip "
                    f"{self.jacobian.skip} (every prompt is too short: they need at least {self.jacobian.skip + 2})"
                )
        return self

    def identity(self) -> dict:
        """What defines the fit (hashed into its id, which names its checkpoints in the store)."""
        return {
            "name": self.name,
            "model": {"name": self.model.name, "dtype": self.model.dtype},
            "kind": self.kind,
            "init": self.init if self.kind == "tuned" else None,
            "corpus": self.corpus.model_dump(),
            "train": self.train.model_dump() if self.train and self.kind == "tuned" else None,
            "workers": self.workers,
            "batch_size": self.batch_size,
            **({"jacobian": self.jacobian.identity()} if self.kind == "jacobian" else {}),
        }


def parse_fit(data, source: str = "config") -> FitSpec:
    """Validate a lens-fit config mapping (errors name the file and key)."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{source}: config must be a mapping")
    return validate(FitSpec, data, source)


# ------------------------------------------------------------ report specs
REPORT_DIMENSIONS = ("model", "probe", "prompt_group")
MIN_RESAMPLES, MAX_RESAMPLES = 100, 100_000  # a report spec's `resamples` (bootstrap intervals)
# a report's `layers` value: each map shows the layers present in the rows it draws
# (klstore.report.aggregate._layers_for); `all` is every layer of the model
STORED_LAYERS = "stored"
# what a report's maps show (its `value:` key, also spelled `divergence:`): a divergence column
# of the kl rows, or q_entropy, the entropy of each row's Q (docs/conventions.md, "Entropy of Q")
REPORT_VALUES: dict[str, str] = {**DIVERGENCES, "q_entropy": "Entropy of Q"}


class ReportSpec(_Value):
    """What a report aggregates and draws (see klstore.config for the YAML form)."""

    name: str = "default"
    store: str | None = None
    runs: Any = "latest"  # "latest", None (= all), or a tuple of run ids or names
    models: Any = None  # None (= all) or a tuple of labels
    probes: Any = None
    groups: Any = None
    group_by: Any = (("model", "probe"), ("model", "probe", "prompt_group"))
    aggregate: Literal["mean", "median"] = "mean"
    # colour range of every figure (klstore.report.scale): robust ends it at Q3 + 3 IQR when a
    # value lies beyond, so one outlying layer (Gemma-3's logit-lens layer 0) cannot wash out the rest
    color_scale: Literal["linear", "log", "robust"] = "robust"
    # a layer spec, "stored" (the layers present in the rows a map draws), or JSON {model or "default": spec}
    layers: Any = STORED_LAYERS
    divergence: str = "kl"
    shared_scale: bool = False
    compare_models: bool = True
    compare_groups: bool = True
    per_prompt: int = 2
    # the bootstrap intervals of comparison maps (klstore.report.intervals): their level, the
    # number of resamples and the seed (fixed, so that a rebuild gives the same intervals)
    confidence: float = 0.95
    resamples: int = 2000
    bootstrap_seed: int = 0
    source: str = Field("built-in default", exclude=True)  # the file it came from

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return _rule(check_label, value, "report name")

    @field_validator("runs", mode="before")
    @classmethod
    def _runs(cls, value):
        return "latest" if value == "latest" else _selection(value, "runs")

    @field_validator("models", "probes", "groups", mode="before")
    @classmethod
    def _names(cls, value, info):
        return _selection(value, info.field_name)

    @field_validator("group_by", mode="before")
    @classmethod
    def _group_by(cls, value):
        if isinstance(value, tuple):
            value = [list(g) for g in value]
        if not isinstance(value, list) or not value:
            raise _fail("must be a list of groupings such as [model, probe]")
        groupings = []
        for i, grouping in enumerate(value):
            if isinstance(grouping, str):
                grouping = [grouping]
            if not isinstance(grouping, list) or any(g not in REPORT_DIMENSIONS for g in grouping):
                raise _fail(f"[{i}] must list some of {', '.join(REPORT_DIMENSIONS)}, got {grouping!r}")
            groupings.append(tuple(d for d in REPORT_DIMENSIONS if d in grouping))
        return tuple(groupings)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, dict):
            for spec in value.values():
                _report_layer_spec(spec)
            return json.dumps({str(k): str(v) for k, v in value.items()}, sort_keys=True)
        if isinstance(value, str) and value.startswith("{"):
            return value  # already normalised
        return _report_layer_spec(value)

    @model_validator(mode="before")
    @classmethod
    def _value_key(cls, data):
        """`value:` is the documented name of what the maps show; `divergence:` its older spelling."""
        if isinstance(data, dict) and "value" in data:
            data = dict(data)
            value = data.pop("value")
            if "divergence" in data and data["divergence"] != value:
                raise _fail(f"value {value!r} and divergence {data['divergence']!r} disagree: give one of them")
            data["divergence"] = value
        return data

    @field_validator("divergence")
    @classmethod
    def _divergence(cls, value):
        if value not in REPORT_VALUES:
            raise _fail(f"must be {', '.join(list(REPORT_VALUES)[:-1])} or {list(REPORT_VALUES)[-1]}, got {value!r}")
        return value

    @field_validator("per_prompt", mode="before")
    @classmethod
    def _per_prompt(cls, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _fail(f"must be a whole number >= 0, got {value!r}")
        return value

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, value):
        if not 0 < value < 1:
            raise _fail(f"must be a level between 0 and 1 such as 0.95, got {value!r}")
        return value

    @field_validator("resamples")
    @classmethod
    def _resamples(cls, value):
        if not MIN_RESAMPLES <= value <= MAX_RESAMPLES:
            raise _fail(f"must be a whole number from {MIN_RESAMPLES} to {MAX_RESAMPLES}, got {value!r}")
        return value

    @field_validator("bootstrap_seed")
    @classmethod
    def _bootstrap_seed(cls, value):
        if value < 0:
            raise _fail(f"must be a whole number >= 0, got {value!r}")
        return value

    def layers_for(self, model: str) -> str:
        """The layer spec that applies to a model."""
        if self.layers.startswith("{"):
            table = json.loads(self.layers)
            return table.get(model, table.get("default", STORED_LAYERS))
        return self.layers

    def describe(self) -> dict:
        """The spec's content (not where it came from or what store it names)."""
        return self.model_dump(exclude={"store"})


def _selection(value, key: str):
    if value == "all" or value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(f"must be 'all' or a list of names, got {value!r}")


def _report_layer_spec(value) -> str:
    if isinstance(value, str) and value.strip().lower() == STORED_LAYERS:
        return STORED_LAYERS
    try:
        return _layer_spec(value)
    except PydanticCustomError:
        raise _fail(
            "must be a layer spec such as all or 0,15-21,27, stored (the layers in the rows drawn), "
            "or a mapping of model label (or default) to one"
        ) from None


def parse_report_spec(data, where: str = "built-in default") -> ReportSpec:
    """Validate a report spec mapping (unknown keys are errors)."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{where}: a report spec must be a mapping")
    if "source" in data:
        raise KlstoreError(f"{where}: source: unknown key")
    return validate(ReportSpec, {**data, "source": where}, where)
