"""Trained lenses: per-layer affine translators read before the model's own head.

A lens of kind `tuned`, `least_squares` or `jacobian` (docs/conventions.md, "Lenses") is,
for every decoder block l, a map of block l's output h_l:

    T_l(h) = h + W_l h + b_l          (tuned: W_l, b_l fitted; least squares: W_l = A_l - I,
                                       b_l = c_l; Jacobian: W_l = J_l - I, b_l = 0)

read as `head(final_norm(T_l(h_l)))`. At the last block every lens is the identity.

Files are the tuned-lens package's lens folder (`config.json` + `params.pt`), so lenses move
both ways between klstore and tuned-lens. Its translators are indexed by Hugging Face's
`hidden_states[:-1]`: translator 0 reads the embedding output, translator i the output of block
i-1. So klstore block l (l <= L-2) uses translator l+1, and block L-1 (the last) is the
identity; klstore writes translator 0 as zeros. klstore's own provenance (kind, recipe, model
fingerprint) goes in `klstore.json` beside them, which tuned-lens ignores.

A lens's id is the content hash of its parameters (float32 bytes, layer by layer), never of
its path: the same lens saved twice, or copied, has one id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from klstore.errors import KlstoreError, first_line
from klstore.spec import LENS_ID_LENGTH, LENS_READOUTS, LensSpec

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
KLSTORE_FILE = "klstore.json"  # klstore's provenance of a lens; tuned-lens ignores it
JLENS_FILE = "jlens.pt"  # beside a Jacobian lens's folder: the same lens as a TransformerLens 4.3 artifact
FITTED_KINDS = tuple(kind for kind in LENS_READOUTS if kind != "logit")
LENS_TYPE = "linear_tuned_lens"  # tuned-lens 0.2.0's TunedLensConfig.lens_type


class LensError(KlstoreError):
    """A lens that cannot be read, or does not fit the model it is used with."""


@dataclass(frozen=True)
class AffineLens:
    """Per block l: T_l(h) = h + h @ weight[l].T + bias[l]. weight (L, d, d) and bias (L, d) are
    float32 on the CPU, indexed by klstore's block index; row L-1 is zeros (the identity).

    A lens fitted at some blocks only (a Jacobian lens with `source_layers`) names them in
    `blocks`: it reads those and the last block (the identity), and refuses the others rather
    than read them as the logit lens (their rows are zeros). `depth_known` False: a partial
    artifact that does not say its model's depth (L is then max(blocks) + 2, the least it can
    be; `check_fits` pads it to the model's)."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor
    unembed_hash: str = ""  # tuned-lens's hash of the model's unembedding ("" when unknown)
    model: str = ""  # the base model's name, as the lens folder gives it
    provenance: dict = field(default_factory=dict)  # klstore.json: fingerprint, recipe, ...
    blocks: tuple[int, ...] | None = None  # the fitted blocks; None: every block but the last
    depth_known: bool = True

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def readable(self) -> tuple[int, ...]:
        """The blocks this lens reads: the fitted ones and the last (a partial lens of unknown
        depth: the fitted ones only, until `check_fits` pads it to a model)."""
        if self.blocks is None:
            return tuple(range(self.n_layers))
        return (*self.blocks, self.n_layers - 1) if self.depth_known else self.blocks

    def padded(self, n_layers: int) -> AffineLens:
        """This partial lens for a model of `n_layers` blocks (zero rows added; the same id)."""
        extra = n_layers - self.n_layers
        weight = torch.cat([self.weight, self.weight.new_zeros(extra, self.d_model, self.d_model)])
        bias = torch.cat([self.bias, self.bias.new_zeros(extra, self.d_model)])
        return replace(self, weight=weight, bias=bias, depth_known=True)

    @property
    def d_model(self) -> int:
        return self.weight.shape[-1]

    @property
    def id(self) -> str:
        return content_id(self.kind, self.weight, self.bias, self.blocks)

    def spec(self, source: str = "") -> LensSpec:
        return LensSpec(kind=self.kind, id=self.id, source=source)

    def translate(self, layers: tuple[int, ...], hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, n, d), row r read at block layers[r] -> T_{layers[r]}(hidden[r]), in the
        wider of hidden's dtype and float32, returned in hidden's dtype."""
        if self.blocks is not None:  # (the id hashes the whole lens: only for a message that can occur)
            check_layers(self, layers, f"lens {self.id}")
        wide = torch.promote_types(hidden.dtype, torch.float32)
        index = torch.tensor(layers, dtype=torch.long)
        weight = self.weight[index].to(hidden.device, wide)  # (R, d, d)
        bias = self.bias[index].to(hidden.device, wide)  # (R, d)
        x = hidden.to(wide)
        return torch.baddbmm(x + bias[:, None, :], x, weight.transpose(1, 2)).to(hidden.dtype)


def content_id(kind: str, weight: torch.Tensor, bias: torch.Tensor, blocks: tuple[int, ...] | None = None) -> str:
    """The lens id: SHA-256 of its kind, shape and float32 parameters, layer by layer (16 hex).
    A partial lens (`blocks`): of its kind, width, blocks and their parameters only, so the id
    does not depend on the depth it is padded to."""
    if blocks is None:
        digest = hashlib.sha256(f"klstore-lens-v1\n{kind}\n{tuple(weight.shape)}\n".encode())
    else:
        digest = hashlib.sha256(f"klstore-lens-v1\n{kind}\nd={weight.shape[-1]}\nblocks={list(blocks)}\n".encode())
    for layer in range(weight.shape[0]) if blocks is None else blocks:
        digest.update(weight[layer].detach().to(torch.float32).contiguous().numpy().tobytes())
        digest.update(bias[layer].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:LENS_ID_LENGTH]


def identity_lens(kind: str, n_layers: int, d_model: int, **meta) -> AffineLens:
    """Every translator zero: the logit lens, written as a lens of `kind` (a fit's start)."""
    return AffineLens(kind, torch.zeros(n_layers, d_model, d_model), torch.zeros(n_layers, d_model), **meta)


# ------------------------------------------------------------ tuned-lens folders
# ------------------------------------------------------------ Jacobian-lens artifacts
def is_jlens_artifact(source: str | Path) -> bool:
    """A single .pt file that is not a tuned-lens params.pt: the reference J-lens artifact."""
    path = Path(source)
    return path.is_file() and path.suffix == ".pt" and path.name != PARAMS_FILE


def load_jlens(source: str | Path) -> AffineLens:
    """A J-lens artifact as TransformerLens 4.3's `JacobianLens.save` writes it (and Anthropic's
    reference format: `jacobian_sum` / `n_done`): `J` {block: (d, d)}, `n_prompts`,
    `source_layers`, `d_model`, optional `metadata`. The four keys cannot name their model: the
    depth is `metadata.target_layer` + 1 where the file has it, else max(source_layers) + 2 for
    blocks 0..k (a whole fit); other blocks without it make a partial lens of unknown depth,
    padded to the model's by `check_fits`. The depth and d_model are checked against the
    model when the lens is used. float16 matrices are read as their float16 values; J - I is stored, so the
    diagonal is within 2^-24 of them (docs/lenses.md)."""
    path = Path(source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load's errors on a broken file are of many types
        raise LensError(f"lens {source}: not a readable J-lens artifact ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise LensError(f"lens {source}: a J-lens artifact is a dict (J, n_prompts, source_layers, d_model)")
    if "jacobian_sum" in state and "n_done" in state:  # the reference implementation's checkpoint
        n_done = state["n_done"]
        if isinstance(n_done, bool) or not isinstance(n_done, int) or n_done < 1:
            raise LensError(f"lens {source}: n_done is {n_done!r}: no prompt was fitted")
        matrices = {k: v / n_done for k, v in _matrices(state["jacobian_sum"], "jacobian_sum", source).items()}
    elif "J" in state:
        matrices = _matrices(state["J"], "J", source)
    else:
        raise LensError(f"lens {source}: no J (nor jacobian_sum) in the artifact: not a J-lens")
    if not matrices:
        raise LensError(f"lens {source}: the artifact holds no matrix")
    layers = sorted(matrices)
    listed = state.get("source_layers", layers)
    if not isinstance(listed, (list, tuple)):
        raise LensError(f"lens {source}: source_layers must be a list of block indices, got {listed!r}"[:200])
    declared = [_block(x, "source_layers", source) for x in listed]
    if sorted(declared) != layers:
        raise LensError(f"lens {source}: source_layers {declared} do not match the layers of J {layers}"[:200])
    metadata = state.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise LensError(f"lens {source}: metadata must be a dict, got {type(metadata).__name__}")
    n_layers, depth_known = layers[-1] + 2, True
    # TransformerLens's fits (and klstore's) name the final block, the depth; the reference
    # implementation's checkpoint keeps it at the top level
    target = metadata.get("target_layer", state.get("target_layer"))
    if target is not None:
        target = _block(target, "target_layer", source)
        if target <= layers[-1]:
            raise LensError(f"lens {source}: metadata target_layer {target!r} is not above source layer {layers[-1]}")
        n_layers = target + 1
    full = layers == list(range(n_layers - 1))
    if not full and target is None and layers == list(range(layers[-1] + 1)):
        full = True  # 0..k without a target: a whole fit of a (k+2)-block model (the reference's default)
    if not full and target is None:
        depth_known = False  # some blocks of a model whose depth the file does not say
    first = matrices[layers[0]]
    d_model = state.get("d_model", first.shape[-1] if first.dim() else 0)
    if isinstance(d_model, bool) or not isinstance(d_model, int) or not 0 < d_model <= MAX_WIDTH:
        raise LensError(f"lens {source}: d_model must be a positive integer, got {d_model!r}"[:200])
    weight = torch.zeros(n_layers, d_model, d_model)
    for layer in layers:
        value = matrices[layer]
        if tuple(value.shape) != (d_model, d_model):
            raise LensError(
                f"lens {source}: J[{layer}] has shape {tuple(value.shape)}, expected ({d_model}, {d_model})"
            )
        weight[layer] = value.float() - torch.eye(d_model)
    if not torch.isfinite(weight).all():
        raise LensError(f"lens {source}: the artifact holds non-finite values")
    provenance = {"kind": "jacobian", "n_prompts": state.get("n_prompts"), "metadata": _plain(metadata)}
    return AffineLens(
        "jacobian",
        weight,
        torch.zeros(n_layers, d_model),
        model=str(metadata.get("model_name", "")),
        provenance=provenance,
        blocks=None if full else tuple(layers),
        depth_known=depth_known,
    )


MAX_BLOCKS = 10_000  # no model has more blocks: a larger index in a lens file is damage, not a model
MAX_WIDTH = 1_000_000


def _block(value, what: str, source) -> int:
    """A block index from a lens file: an int (or its decimal text), 0 <= index < MAX_BLOCKS."""
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_BLOCKS:
        raise LensError(f"lens {source}: {what}: {value!r} is not a block index"[:200])
    return value


def _matrices(value, what: str, source) -> dict[int, torch.Tensor]:
    """{block: matrix} of an artifact's `J` / `jacobian_sum`, keys checked, no two for one block."""
    if not isinstance(value, dict):
        raise LensError(f"lens {source}: {what} must be a dict of block -> matrix, got {type(value).__name__}")
    out: dict[int, torch.Tensor] = {}
    for key, matrix in value.items():
        block = _block(key, what, source)
        if block in out:
            raise LensError(f"lens {source}: {what} holds block {block} twice")
        if not isinstance(matrix, torch.Tensor):
            raise LensError(f"lens {source}: {what}[{block}] is not a tensor")
        out[block] = matrix
    return out


def _plain(value):
    """JSON-able copy of artifact metadata (tensors and other objects as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def save_jlens(
    lens: AffineLens,
    path: str | Path,
    n_prompts: int = 0,
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a Jacobian lens as a TransformerLens 4.3 artifact (float32 unless `dtype` says
    otherwise; TransformerLens's own default is float16)."""
    eye = torch.eye(lens.d_model)
    sources = list(range(lens.n_layers - 1)) if lens.blocks is None else list(lens.blocks)
    payload = {
        "J": {layer: (lens.weight[layer] + eye).to(dtype) for layer in sources},
        "n_prompts": int(n_prompts),
        "source_layers": sources,
        "d_model": lens.d_model,
        "metadata": {
            "estimator": "jacobian_lens",
            "hook_convention": "blocks.{layer}.hook_out",
            "processing": {"compatibility_mode": False, "weight_basis": "raw_huggingface"},
            **({"target_layer": lens.n_layers - 1} if lens.depth_known else {}),
            **(metadata or {}),
        },
    }
    path = Path(path)
    torch.save(payload, path)
    return path


def _folder_of(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file() and path.name == PARAMS_FILE:
        return path.parent
    if path.is_file() and path.name == CONFIG_FILE:
        return path.parent
    if path.is_dir():
        return path
    if path.exists():
        raise LensError(f"lens {source}: expected a lens folder (config.json + params.pt) or its params.pt")
    raise LensError(f"lens {source}: no such file or folder")


def _read_json(path: Path, source) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LensError(f"lens {source}: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LensError(f"lens {source}: {path.name} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise LensError(f"lens {source}: {path.name} must hold a JSON object")
    return data


def _positive_int(config: dict, key: str, source) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LensError(f"lens {source}: config.json: {key} must be a positive integer, got {value!r}")
    return value


def load(source: str | Path) -> AffineLens:
    """A lens folder (tuned-lens format) or its params.pt, or a J-lens artifact (.pt) ->
    AffineLens; one-line LensError on anything missing, truncated or inconsistent."""
    if is_jlens_artifact(source):
        return load_jlens(source)
    folder = _folder_of(source)
    config = _read_json(folder / CONFIG_FILE, source)
    extra = _read_json(folder / KLSTORE_FILE, source) if (folder / KLSTORE_FILE).exists() else {}
    d_model = _positive_int(config, "d_model", source)
    n_layers = _positive_int(config, "num_hidden_layers", source)
    lens_type = config.get("lens_type", LENS_TYPE)
    if lens_type != LENS_TYPE:
        raise LensError(f"lens {source}: lens_type {lens_type!r} is not supported (only {LENS_TYPE})")
    state = _read_params(folder / PARAMS_FILE, source)
    weight = torch.zeros(n_layers, d_model, d_model)
    bias = torch.zeros(n_layers, d_model)
    use_bias = config.get("bias", True)
    for block in range(n_layers - 1):  # translator block+1 reads block `block`'s output
        w = _tensor(state, f"{block + 1}.weight", (d_model, d_model), source)
        weight[block] = w
        if use_bias:
            bias[block] = _tensor(state, f"{block + 1}.bias", (d_model,), source)
    _tensor(state, "0.weight", (d_model, d_model), source)  # present, and the right shape
    extra_keys = sorted(k for k in state if k.split(".")[0] not in {str(i) for i in range(n_layers)})
    if extra_keys:
        raise LensError(f"lens {source}: params.pt has translators beyond num_hidden_layers ({extra_keys[0]})")
    kind = extra.get("kind", "tuned")
    if kind not in FITTED_KINDS:
        raise LensError(f"lens {source}: klstore.json: unknown lens kind {kind!r}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise LensError(f"lens {source}: params.pt holds non-finite values")
    return AffineLens(
        kind,
        weight,
        bias,
        unembed_hash=str(config.get("unembed_hash") or ""),
        model=str(config.get("base_model_name_or_path") or ""),
        provenance=extra,
        blocks=_blocks_of(extra, n_layers, source),
    )


def _blocks_of(extra: dict, n_layers: int, source) -> tuple[int, ...] | None:
    """klstore.json's `blocks` (a lens fitted at some blocks only), checked; None when absent."""
    blocks = extra.get("blocks")
    if blocks is None:
        return None
    if (
        not isinstance(blocks, list)
        or not blocks
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
        or blocks != sorted(set(blocks))
        or not 0 <= blocks[0] <= blocks[-1] <= n_layers - 2
    ):
        raise LensError(
            f"lens {source}: klstore.json: blocks must be increasing block indices within 0-{n_layers - 2}, "
            f"got {str(blocks)[:80]}"
        )
    return None if blocks == list(range(n_layers - 1)) else tuple(blocks)


def _read_params(path: Path, source) -> dict:
    if not path.exists():
        raise LensError(f"lens {source}: params.pt is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load's errors on a broken file are of many types
        raise LensError(f"lens {source}: params.pt is truncated or not a torch file ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LensError(f"lens {source}: params.pt must hold a state dict of tensors")
    return {_translator_key(k): v for k, v in state.items()}


def _translator_key(key: str) -> str:
    """tuned-lens's state-dict key of a translator parameter, as '<index>.<weight|bias>'."""
    return key.removeprefix("layer_translators.")


def _tensor(state: dict, key: str, shape: tuple, source) -> torch.Tensor:
    if key not in state:
        raise LensError(f"lens {source}: params.pt has no {key}")
    value = state[key]
    if tuple(value.shape) != shape:
        raise LensError(f"lens {source}: params.pt: {key} has shape {tuple(value.shape)}, expected {shape}")
    return value.detach().to(torch.float32)


def save(lens: AffineLens, folder: str | Path, base_model: str = "", provenance: dict | None = None) -> Path:
    """Write `lens` as a tuned-lens lens folder (+ klstore.json); returns the folder. Translator
    0 (the embedding output, which klstore never reads) is zeros."""
    if not lens.depth_known:
        raise LensError(
            "a partial J-lens whose model depth is unknown cannot be saved as a folder: check_fits it first"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, d = lens.n_layers, lens.d_model
    state = {"0.weight": torch.zeros(d, d), "0.bias": torch.zeros(d)}
    for block in range(n - 1):
        state[f"{block + 1}.weight"] = lens.weight[block].detach().to(torch.float32).clone()
        state[f"{block + 1}.bias"] = lens.bias[block].detach().to(torch.float32).clone()
    config = {
        "base_model_name_or_path": base_model or lens.model,
        "d_model": d,
        "num_hidden_layers": n,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": lens.unembed_hash or None,
        "lens_type": LENS_TYPE,
    }
    torch.save(state, folder / PARAMS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    extra = {"kind": lens.kind, "id": lens.id, **lens.provenance, **(provenance or {})}
    extra.pop("blocks", None)
    if lens.blocks is not None:  # fitted at these blocks only: tuned-lens reads zeros (the logit lens) at the others
        extra["blocks"] = list(lens.blocks)
    (folder / KLSTORE_FILE).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if lens.kind == "jacobian":  # also as TransformerLens's artifact, so its JacobianLens.load reads it
        prompts = extra.get("n_prompts") or (extra.get("recipe") or {}).get("prompts") or 0
        save_jlens(
            lens,
            folder / JLENS_FILE,
            n_prompts=int(prompts),
            metadata={"model_name": base_model or lens.model},
        )
    return folder


# ------------------------------------------------------------ a lens and its model
def unembed_hash(model) -> str:
    """tuned-lens 0.2.0's hash of a model's unembedding, computed as it computes it (so lens
    folders check both ways): SHA-256 of numpy's text of the float32 weight at 1 decimal. numpy
    summarises arrays over 1000 elements, so this text holds only the corner rows and columns:
    a weak check, which klstore's `model_fingerprint` complements."""
    import numpy as np

    weight = model.get_output_embeddings().weight.detach().cpu().float().numpy()
    with np.printoptions(threshold=1000, edgeitems=3, linewidth=75, suppress=False, floatmode="maxprec", sign="-"):
        text = np.array_str(weight, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model) -> str:
    """The model a lens is tied to (docs/conventions.md): SHA-256 (16 hex) of every parameter's
    name and shape, and of every float32 value of the unembedding."""
    digest = hashlib.sha256(b"klstore-model-v1\n")
    for name, param in model.named_parameters():
        digest.update(f"{name}\t{tuple(param.shape)}\n".encode())
    weight = model.get_output_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
    digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_fits(lens: AffineLens, n_layers: int, d_model: int, model_unembed_hash: str | None, where: str) -> AffineLens:
    """`lens` for this model (a partial artifact of unknown depth padded to it); a one-line
    LensError when it was made for another depth, width or unembedding."""
    if not lens.depth_known and lens.d_model == d_model:
        assert lens.blocks is not None  # only a partial artifact leaves its depth open
        if lens.blocks[-1] > n_layers - 2:
            raise LensError(
                f"{where} is fitted at block {lens.blocks[-1]}; this model has {n_layers} layers, "
                f"whose source blocks are 0-{n_layers - 2}"
            )
        lens = lens.padded(n_layers)
    if lens.n_layers != n_layers or lens.d_model != d_model:
        raise LensError(
            f"{where} is for a model with {lens.n_layers} layers of width {lens.d_model}; "
            f"this model has {n_layers} layers of width {d_model}"
        )
    if model_unembed_hash is not None and lens.unembed_hash and lens.unembed_hash != model_unembed_hash:
        raise LensError(f"{where} was fitted on another model (its unembedding hash differs from this model's)")
    return lens


def check_layers(lens: AffineLens, layers, where: str) -> None:
    """A one-line LensError when `layers` asks a partial lens for a block it was not fitted at."""
    if lens.blocks is None:
        return
    readable = set(lens.readable)
    missing = sorted({int(layer) for layer in layers} - readable)
    if missing and not lens.depth_known:
        raise LensError(
            f"{where} is fitted at blocks {spans(lens.blocks)} only: no translator for layers {spans(missing)} "
            "(the model's last block reads as the identity once the lens is checked against the model)"
        )
    if missing:
        raise LensError(
            f"{where} is fitted at blocks {spans(lens.blocks)} only (it reads the last, {lens.n_layers - 1}, "
            f"as the identity): no translator for layers {spans(missing)}; ask for layers within "
            f"{spans(lens.readable)}, or fit the lens at those blocks (source_layers)"
        )


def spans(layers) -> str:
    """Block indices as a layer spec: (0, 1, 2, 5, 7, 8) -> '0-2,5,7-8'."""
    out: list[str] = []
    for layer in sorted(layers):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == layer - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{layer}"
        elif out and "-" not in out[-1] and int(out[-1]) == layer - 1:
            out[-1] = f"{out[-1]}-{layer}"
        else:
            out.append(str(layer))
    return ",".join(out)


def resolve_path(spec: LensSpec) -> LensSpec:
    """A lens named by a path -> its LensSpec with kind and id (read from its files)."""
    if spec.resolved:
        return spec
    return load(spec.source).spec(source=str(Path(spec.source).resolve()))
