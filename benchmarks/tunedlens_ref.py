"""Reference tuned lens: tuned-lens 0.2.0's own code writes and reads lens folders, so klstore's tests can check
that klstore's `tuned` lens reads and writes the same format and decodes to the same logits.

Run with the tuned-lens environment's python (`make bench-tunedlens-env`); it never imports klstore:

    PY=build/venv-tunedlens/bin/python
    $PY benchmarks/tunedlens_ref.py make MODEL_DIR OUT_DIR --seed 0 [--std 0.02]
    $PY benchmarks/tunedlens_ref.py logits MODEL_DIR LENS_DIR HIDDEN_PT OUT_PT [--require-hash-match]
    $PY benchmarks/tunedlens_ref.py logit-lens MODEL_DIR HIDDEN_PT OUT_PT
    $PY benchmarks/tunedlens_ref.py hidden MODEL_DIR OUT_PT --ids 1,2,3
    $PY benchmarks/tunedlens_ref.py unembed-hash MODEL_DIR
    $PY benchmarks/tunedlens_ref.py info LENS_DIR

- `make`: `TunedLens.from_model` on the float32 model, every translator's weight and then bias (translator 0 first)
  drawn from N(0, std^2) by one generator seeded with --seed, then `TunedLens.save(OUT_DIR)` (config.json, params.pt).
- `logits`: `TunedLens.from_model_and_pretrained(model, LENS_DIR)` (a folder holding config.json and params.pt, from
  tuned-lens or any other writer of the format), then `lens(h, idx)` = unembed(h + translator_idx(h)) for each entry of
  HIDDEN_PT, a `torch.save`d dict {idx: float tensor (n, d_model)}; writes {idx: float32 logits (n, vocab)} to OUT_PT.
- `logit-lens`: tuned-lens's `LogitLens` (final norm, then the output embedding) on HIDDEN_PT, same shapes.
- `hidden`: the model's `output_hidden_states` for one sequence of token ids, {idx: float32 (n, d_model)} for
  idx = 0..num_hidden_layers; idx is tuned-lens's translator index (0 = the embeddings, i = block i-1's output;
  the last entry already has the final norm applied in Hugging Face's Llama and GPT-2).
- `unembed-hash`: tuned-lens's `Unembed(model).unembedding_hash()`.
- `info`: a lens folder's config.json and its params.pt keys, shapes and dtypes.

Index convention (tuned-lens 0.2.0, scripts/train_loop.py): translator idx is trained on
`output.hidden_states[:-1][idx]`, so there are num_hidden_layers translators: idx 0 reads the embedding output and
idx i (1 <= i < L) block i-1's output; klstore's block l is translator l + 1, and the last block has none.

Every command prints one JSON line on stdout (what it wrote, the lens's and the model's unembedding hashes). tuned-lens
0.2.0 knows the final norm of OPT, GPT-NeoX, BLOOM, GPT-2, GPT-Neo, GPT-J and Llama only; `--unknown-family-norm`
lets other families (e.g. Gemma 3) use `model.get_decoder().norm`, which is this script's addition, not tuned-lens's.
The model is loaded in float32 on the CPU; nothing is downloaded (HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _load_model(model_dir: str, unknown_family_norm: bool):
    """The causal LM in `model_dir`, float32, eval mode; optionally extends tuned-lens's final-norm lookup."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(f"no config.json in model folder {model_dir!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    if unknown_family_norm:
        _extend_final_norm()
    return model


def _extend_final_norm() -> None:
    """Let tuned-lens's `get_final_norm` fall back to the decoder's `norm` for families it does not list."""
    from tuned_lens import model_surgery

    known = model_surgery.get_final_norm

    def get_final_norm(model):
        try:
            return known(model)
        except NotImplementedError:
            decoder = model.get_decoder()  # the decoder stack (base_model is the whole model in some versions)
            norm = getattr(decoder, "norm", None)
            if norm is None:
                raise
            print(f"note: {type(decoder).__name__}: final norm taken from its .norm", file=sys.stderr)
            return norm

    model_surgery.get_final_norm = get_final_norm


def _read_hidden(path: str) -> dict[int, object]:
    """HIDDEN_PT: {idx: float tensor (n, d_model)} with int (or int-string) keys."""
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not data:
        raise SystemExit(f"{path}: expected a non-empty dict {{idx: tensor (n, d_model)}}, got {type(data).__name__}")
    hidden = {}
    for key, h in data.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise SystemExit(f"{path}: key {key!r} is not a layer index") from None
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise SystemExit(f"{path}: entry {key!r} is not a 2-d tensor (n, d_model)")
        hidden[idx] = h.to(torch.float32)
    return hidden


def _lens_files(lens_dir: str) -> tuple[Path, Path]:
    """config.json and params.pt of a lens folder; refuses a folder without them (tuned-lens would go to the hub)."""
    config, params = Path(lens_dir) / "config.json", Path(lens_dir) / "params.pt"
    for path in (config, params):
        if not path.is_file():
            raise SystemExit(f"lens folder {lens_dir!r} has no {path.name}")
    return config, params


def cmd_make(args: argparse.Namespace) -> dict:
    import torch
    from tuned_lens import TunedLens

    model = _load_model(args.model_dir, args.unknown_family_norm)
    lens = TunedLens.from_model(model)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for translator in lens:  # translator 0 (the embeddings) first
            for param in (translator.weight, translator.bias):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * args.std)
    lens.save(args.out_dir)
    return {
        "wrote": str(args.out_dir),
        "translators": len(lens),
        "d_model": lens.config.d_model,
        "unembed_hash": lens.config.unembed_hash,
    }


def cmd_logits(args: argparse.Namespace) -> dict:
    import torch
    from tuned_lens import TunedLens

    config_path, _ = _lens_files(args.lens_dir)
    lens_hash = json.loads(config_path.read_text()).get("unembed_hash")
    model = _load_model(args.model_dir, args.unknown_family_norm)
    lens = TunedLens.from_model_and_pretrained(model, str(args.lens_dir))
    model_hash = lens.unembed.unembedding_hash()  # from_model_and_pretrained overwrites config.unembed_hash with it
    if args.require_hash_match and lens_hash != model_hash:
        raise SystemExit(f"unembed_hash {lens_hash!r} in {args.lens_dir} differs from the model's {model_hash!r}")
    hidden = _read_hidden(args.hidden_pt)
    for idx in hidden:
        if not 0 <= idx < len(lens):
            raise SystemExit(f"{args.hidden_pt}: index {idx} has no translator (the lens has 0..{len(lens) - 1})")
    with torch.no_grad():
        out = {idx: lens(h, idx).to(torch.float32) for idx, h in sorted(hidden.items())}
    torch.save(out, args.out_pt)
    return {
        "wrote": str(args.out_pt),
        "indices": sorted(out),
        "unembed_hash_lens": lens_hash,
        "unembed_hash_model": model_hash,
        "hash_match": None if lens_hash is None else lens_hash == model_hash,
    }


def cmd_logit_lens(args: argparse.Namespace) -> dict:
    import torch
    from tuned_lens.nn import LogitLens

    model = _load_model(args.model_dir, args.unknown_family_norm)
    lens = LogitLens.from_model(model)
    hidden = _read_hidden(args.hidden_pt)
    with torch.no_grad():
        out = {idx: lens(h, idx).to(torch.float32) for idx, h in sorted(hidden.items())}
    torch.save(out, args.out_pt)
    return {"wrote": str(args.out_pt), "indices": sorted(out)}


def cmd_hidden(args: argparse.Namespace) -> dict:
    import torch

    model = _load_model(args.model_dir, unknown_family_norm=False)
    try:
        ids = [int(t) for t in args.ids.split(",")]
    except ValueError:
        raise SystemExit(f"--ids {args.ids!r}: expected comma-separated token ids") from None
    with torch.no_grad():
        output = model(torch.tensor([ids]), output_hidden_states=True)
    out = {idx: h[0].to(torch.float32) for idx, h in enumerate(output.hidden_states)}
    torch.save(out, args.out_pt)
    return {"wrote": str(args.out_pt), "indices": list(range(len(output.hidden_states))), "tokens": len(ids)}


def cmd_unembed_hash(args: argparse.Namespace) -> dict:
    from tuned_lens.nn import Unembed

    model = _load_model(args.model_dir, args.unknown_family_norm)
    return {"unembed_hash": Unembed(model).unembedding_hash()}


def cmd_info(args: argparse.Namespace) -> dict:
    import torch

    config_path, params_path = _lens_files(args.lens_dir)
    state = torch.load(params_path, map_location="cpu", weights_only=True)
    return {
        "config": json.loads(config_path.read_text()),
        "params": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, *positional: str, family_option: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        for arg in positional:
            p.add_argument(arg.lower(), metavar=arg)
        if family_option:
            p.add_argument(
                "--unknown-family-norm",
                action="store_true",
                help="families tuned-lens 0.2.0 lacks use model.get_decoder().norm (not tuned-lens's behaviour)",
            )
        p.set_defaults(func=func)
        return p

    p = add("make", cmd_make, "MODEL_DIR", "OUT_DIR")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of every weight and bias (0.02)")
    p = add("logits", cmd_logits, "MODEL_DIR", "LENS_DIR", "HIDDEN_PT", "OUT_PT")
    p.add_argument(
        "--require-hash-match",
        action="store_true",
        help="exit 1 unless config.json's unembed_hash equals the model's (tuned-lens only warns, skips a null)",
    )
    add("logit-lens", cmd_logit_lens, "MODEL_DIR", "HIDDEN_PT", "OUT_PT")
    p = add("hidden", cmd_hidden, "MODEL_DIR", "OUT_PT", family_option=False)
    p.add_argument("--ids", required=True, help="comma-separated token ids of one sequence")
    add("unembed-hash", cmd_unembed_hash, "MODEL_DIR")
    add("info", cmd_info, "LENS_DIR", family_option=False)

    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(args.func(args)))


if __name__ == "__main__":
    main()
