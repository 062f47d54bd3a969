"""Names and plain checks: store labels, dtypes and devices, the compute options' choices,
divergence names, and layer specs (`all`, `0,15-21,27`, `-4--1`).

Each `check_*` takes a value and returns it (normalised), or raises a one-line KlstoreError;
the pydantic models of klstore.spec call them through `rule`, the CLI and the Python API
directly. None looks at a file: whether a path exists or can be written is klstore.config's.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePath
from typing import Annotated

from pydantic import BeforeValidator

from klstore.errors import KlstoreError
from klstore.spec.messages import fail

DEFAULT_STORE = "./klstore-data"

# Divergence name -> its figure label. The math is klstore.core.divergence; the
# store has one float32 column per name. Adding a divergence starts here.
DIVERGENCES: dict[str, str] = {
    "kl": "KL divergence",
    "kl_reverse": "Reverse KL divergence",
    "js": "Jensen-Shannon divergence",
}


# ----------------------------------------------------------------- names
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_label(value: str, what: str) -> str:
    """A model label, probe, report or run name used in a path: letters, digits, . _ + - only."""
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise KlstoreError(
            f"{what} {value!r} cannot name a store folder: use letters, digits, '.', '_', '+', '-' "
            "(no '/', no '..', not starting with '.')"
        )
    return value


def model_label(model_name: str, local: bool = False) -> str:
    """Default store label of a model: built-in name, hub id owner/name -> owner--name, path -> stem.
    `local`: whether `model_name` names an existing file or folder, so that an `owner/name` that
    does is a path (this function does not look; klstore.config.default_label does)."""
    if model_name.count("/") == 1 and not model_name.startswith((".", "/", "~")) and not local:
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


CLEAN_PASSES = ("exact", "cached")  # docs/engine.md: where the clean trace comes from
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
    on CPUs, through oneDNN). Divergences stay float32 either way (core.runtime.matmul_precision_of)."""
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


def layer_spec(value) -> str:
    """A layer spec given as text or a single integer; its syntax is checked here."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail("must be a layer spec such as all or 0,15-21,27")
    try:
        parse_layers(str(value))
    except KlstoreError as exc:
        raise fail(str(exc)) from None
    return str(value)


LayerSpec = Annotated[str, BeforeValidator(layer_spec)]  # a layer spec's text, its syntax checked
