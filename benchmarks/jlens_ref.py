"""Reference Jacobian lens: TransformerLens 4.3's own `JacobianLens` fits, reads, merges and saves lenses, so
klstore's tests can check that klstore's `jacobian` lens computes the same matrices, reads the same logits and
reads and writes the same artifact.

Run with the TransformerLens environment's python (`make bench-tlens-env`); it never imports klstore:

    PY=build/venv-tlens/bin/python
    $PY benchmarks/jlens_ref.py fit MODEL_DIR PROMPTS_JSON OUT_PT [--dim-batch 8] [--skip 16] [--max-len 128]
                                   [--layers 0 1 ...] [--corpus NAME] [--no-prepend-bos] [--save-dtype float16]
    $PY benchmarks/jlens_ref.py readout MODEL_DIR LENS_PT HIDDEN_PT OUT_PT [--logit-lens]
    $PY benchmarks/jlens_ref.py readout-ids MODEL_DIR LENS_PT OUT_PT --ids 1,2,3 [--logit-lens]
    $PY benchmarks/jlens_ref.py merge A.pt B.pt [C.pt ...] OUT.pt [--save-dtype float16]
    $PY benchmarks/jlens_ref.py info LENS_PT

- `fit`: `JacobianLens.fit(model, prompts, corpus=..., source_layers=..., dim_batch=..., max_seq_len=...,
  skip_first_positions=...)`, then `lens.save(OUT_PT, dtype=...)` (TL's default storage dtype is float16).
  PROMPTS_JSON is a JSON list whose items are texts or lists of token ids. TL tokenizes a text with
  `model.to_tokens`, which prepends the BOS token unless --no-prepend-bos (the tokenizer may add its own BOS
  as well); a list of token ids is used as it is (TL's fit takes texts only: this script lets `to_tokens`
  pass a tensor through, the one addition to TL's behaviour). Either way TL then truncates to --max-len.
- `readout`: TL's read-out of given hidden states, the two lines of `JacobianLens.readout` after its forward
  pass: `logit_readout(model, lens.transport(h, l), apply_ln=True)` = W_U ln_final(J_l h) + b_U (then the
  adapter's output transform, e.g. a logit soft cap). HIDDEN_PT is a `torch.save`d dict {l: float tensor
  (n, d_model)} with l klstore's (and TL's) block index: block l's output, HF `hidden_states[l + 1]`.
  The final block (l = n_layers - 1) is read with the identity, as TL's readout does; pass its output
  *before* the final norm (HF's last hidden state already has the norm applied). Writes {l: float32
  logits (n, vocab)}. --logit-lens reads every layer with the identity (TL's `use_jacobian=False`).
- `readout-ids`: `JacobianLens.readout(model, tokens, return_full_logits=True)` on one token sequence,
  the full forward pass in TL; writes {"lens_logits": {l: (seq, vocab)}, "model_logits": (seq, vocab),
  "hidden": {l: block l's output `blocks.{l}.hook_out` (seq, d_model)}, "tokens": (seq,)}, all float32.
- `merge`: `JacobianLens.merge([load(A), load(B), ...])` (matrices averaged weighted by n_prompts; the
  shards' metadata must agree apart from n_prompts), saved with TL's `save`.
- `info`: an artifact's keys, its n_prompts, source_layers, d_model, metadata and each J's shape and dtype.

Every command prints one JSON line on stdout. The model is booted with
`TransformerBridge.boot_transformers(MODEL_DIR, device="cpu", dtype=--dtype)`: raw Hugging Face weights (no
fold_ln, no weight centering; TL's J-lens refuses a bridge in compatibility mode or with processed weights),
eager attention. TL records `cfg.model_name` (the MODEL_DIR string as given) in the fit's metadata and its
readout refuses a lens whose recorded model_name differs; --model-name sets a stable name for both.
Nothing is downloaded (HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _boot(model_dir: str, dtype: str = "float32", model_name: str | None = None):
    """A raw TransformerBridge on the CPU, in eval mode (what TL's J-lens requires)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(f"no config.json in model folder {model_dir!r}")
    model = TransformerBridge.boot_transformers(model_dir, device="cpu", dtype=_dtype(dtype))
    model.eval()
    if model_name is not None:
        model.cfg.model_name = model_name
    original = model.to_tokens

    def to_tokens(input, *args, **kwargs):
        """TL's to_tokens, except that a tensor of token ids passes through as one [1, seq] prompt."""
        if isinstance(input, torch.Tensor):
            return input.reshape(1, -1).to(device=model.cfg.device, dtype=torch.long)
        return original(input, *args, **kwargs)

    model.to_tokens = to_tokens
    return model


def _read_prompts(path: str) -> list:
    import torch

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read a JSON list of prompts ({exc})") from None
    if not isinstance(data, list) or not data:
        raise SystemExit(f"{path}: expected a non-empty JSON list of texts or token-id lists")
    prompts = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            prompts.append(torch.tensor(item, dtype=torch.long))
        else:
            raise SystemExit(f"{path}: item {i} is neither a text nor a non-empty list of token ids")
    return prompts


def _read_hidden(path: str) -> dict[int, object]:
    """HIDDEN_PT: {layer: float tensor (n, d_model)} with int (or int-string) keys."""
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not data:
        raise SystemExit(f"{path}: expected a non-empty dict {{layer: tensor (n, d_model)}}, got {type(data).__name__}")
    hidden = {}
    for key, h in data.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise SystemExit(f"{path}: key {key!r} is not a layer index") from None
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise SystemExit(f"{path}: entry {key!r} is not a 2-d tensor (n, d_model)")
        hidden[layer] = h
    return hidden


def _load_lens(path: str):
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

    if not Path(path).is_file():
        raise SystemExit(f"no lens file {path!r}")
    return JacobianLens.load(path)


def _summary(lens) -> dict:
    return {
        "n_prompts": lens.n_prompts,
        "source_layers": lens.source_layers,
        "d_model": lens.d_model,
        "metadata": lens.metadata,
    }


def cmd_fit(args: argparse.Namespace) -> dict:
    import torch
    from transformer_lens.tools.analysis.jacobian_lens import DEFAULT_SKIP_FIRST_POSITIONS, JacobianLens

    prompts = _read_prompts(args.prompts_json)
    start = time.perf_counter()
    model = _boot(args.model_dir, args.dtype, args.model_name)
    if args.no_prepend_bos:
        model.cfg.default_prepend_bos = False
    load_s = time.perf_counter() - start
    skip = DEFAULT_SKIP_FIRST_POSITIONS if args.skip is None else args.skip
    lengths = [int(model.to_tokens(p)[:, : args.max_len].shape[1]) for p in prompts]
    start = time.perf_counter()
    lens = JacobianLens.fit(
        model,
        prompts,
        corpus=args.corpus or Path(args.prompts_json).name,
        source_layers=args.layers,
        dim_batch=args.dim_batch,
        max_seq_len=args.max_len,
        skip_first_positions=skip,
        show_progress=False,
    )
    fit_s = time.perf_counter() - start
    lens.save(args.out_pt, dtype=_dtype(args.save_dtype))
    return {
        "wrote": str(args.out_pt),
        "fit_s": round(fit_s, 3),
        "load_s": round(load_s, 3),
        "prompt_tokens": lengths,
        "torch_threads": torch.get_num_threads(),
        **_summary(lens),
    }


def _readout_model_and_lens(args: argparse.Namespace):
    lens = _load_lens(args.lens_pt)
    model = _boot(args.model_dir, args.dtype, args.model_name)
    lens.validate_model(model)
    return model, lens


def cmd_readout(args: argparse.Namespace) -> dict:
    import torch
    from transformer_lens.tools.analysis.logit_lens import logit_readout

    model, lens = _readout_model_and_lens(args)
    hidden = _read_hidden(args.hidden_pt)
    final_layer = model.cfg.n_layers - 1
    out = {}
    with torch.no_grad():
        for layer, h in sorted(hidden.items()):
            if h.shape[-1] != lens.d_model:
                raise SystemExit(f"{args.hidden_pt}: layer {layer} has width {h.shape[-1]}, the lens {lens.d_model}")
            identity = args.logit_lens or layer == final_layer
            if not identity and layer not in lens.jacobians:
                raise SystemExit(
                    f"{args.hidden_pt}: layer {layer} has no matrix (the lens has {lens.source_layers},"
                    f" and {final_layer} reads with the identity)"
                )
            # JacobianLens.readout's own two lines, on given hidden states instead of its forward pass
            transported = h.float() if identity else lens.transport(h, layer)
            out[layer] = logit_readout(model, transported, apply_ln=True).values.float()
    torch.save(out, args.out_pt)
    return {
        "wrote": str(args.out_pt),
        "layers": sorted(out),
        "identity_layers": sorted(layer for layer in out if args.logit_lens or layer == final_layer),
    }


def cmd_readout_ids(args: argparse.Namespace) -> dict:
    import torch

    model, lens = _readout_model_and_lens(args)
    try:
        ids = [int(t) for t in args.ids.split(",")]
    except ValueError:
        raise SystemExit(f"--ids {args.ids!r}: expected comma-separated token ids") from None
    tokens = torch.tensor([ids], dtype=torch.long)
    result = lens.readout(model, tokens, use_jacobian=not args.logit_lens, return_full_logits=True)
    layers = sorted(result.lens_logits)
    names = {f"blocks.{layer}.hook_out": layer for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    out = {
        "lens_logits": {layer: v.float() for layer, v in result.lens_logits.items()},
        "model_logits": result.model_logits.float(),
        "hidden": {layer: cache[name][0].float() for name, layer in names.items()},
        "tokens": result.tokens,
    }
    torch.save(out, args.out_pt)
    return {"wrote": str(args.out_pt), "layers": layers, "tokens": len(ids), "use_jacobian": result.use_jacobian}


def cmd_merge(args: argparse.Namespace) -> dict:
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

    *inputs, out_pt = args.paths
    if len(inputs) < 1:
        raise SystemExit("merge: give at least one lens and the output path")
    merged = JacobianLens.merge([_load_lens(p) for p in inputs])
    merged.save(out_pt, dtype=_dtype(args.save_dtype))
    return {"wrote": out_pt, "inputs": inputs, **_summary(merged)}


def cmd_info(args: argparse.Namespace) -> dict:
    import torch

    payload = torch.load(args.lens_pt, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise SystemExit(f"{args.lens_pt}: not a dict payload")
    info = {"keys": sorted(payload)}
    for key in ("n_prompts", "source_layers", "d_model", "metadata"):
        if key in payload:
            info[key] = payload[key]
    if "J" in payload:
        info["J"] = {
            str(k): {"key_type": type(k).__name__, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in payload["J"].items()
        }
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, *positional: str, model: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        for arg in positional:
            p.add_argument(arg.lower(), metavar=arg)
        if model:
            p.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's dtype (float32)")
            p.add_argument("--model-name", help="sets the bridge's cfg.model_name (TL records it and checks it)")
        p.set_defaults(func=func)
        return p

    p = add("fit", cmd_fit, "MODEL_DIR", "PROMPTS_JSON", "OUT_PT")
    p.add_argument("--dim-batch", type=int, default=8, help="output dimensions per backward pass (TL: 8)")
    p.add_argument("--skip", type=int, default=None, help="leading positions skipped (TL: 16)")
    p.add_argument("--max-len", type=int, default=128, help="prompts truncated to this many tokens (TL: 128)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="source layers (TL: 0..n_layers-2)")
    p.add_argument("--corpus", help="provenance name recorded in the metadata (default: the JSON file's name)")
    p.add_argument("--no-prepend-bos", action="store_true", help="texts are tokenized without TL's BOS")
    p.add_argument("--save-dtype", choices=DTYPES, default="float16", help="storage dtype of J (TL: float16)")
    p = add("readout", cmd_readout, "MODEL_DIR", "LENS_PT", "HIDDEN_PT", "OUT_PT")
    p.add_argument("--logit-lens", action="store_true", help="identity for every layer (use_jacobian=False)")
    p = add("readout-ids", cmd_readout_ids, "MODEL_DIR", "LENS_PT", "OUT_PT")
    p.add_argument("--ids", required=True, help="comma-separated token ids of one sequence")
    p.add_argument("--logit-lens", action="store_true", help="identity for every layer (use_jacobian=False)")
    p = add("merge", cmd_merge, model=False)
    p.add_argument("paths", nargs="+", metavar="PATH", help="input lenses, then the output path")
    p.add_argument("--save-dtype", choices=DTYPES, default="float16", help="storage dtype of J (TL: float16)")
    add("info", cmd_info, "LENS_PT", model=False)

    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        result = args.func(args)
    except (TypeError, ValueError) as exc:  # TL's refusals (mismatched shards, a wrong model, a short corpus)
        raise SystemExit(f"{args.command}: {type(exc).__name__}: {exc}") from None
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
