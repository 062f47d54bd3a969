"""Jacobian-lens fit benchmark (issue 24): klstore's estimator against TransformerLens 4.3's
`JacobianLens.fit` on the same prompts, its memory per dim_batch, and Ray's scaling.

    make bench-tlens-env                          # TransformerLens 4.3 in build/venv-tlens (the anchor)
    nice -n 5 python benchmarks/jlens_fit.py      # SmolLM2-135M: about 15 minutes on 2 CPUs
    python benchmarks/jlens_fit.py --quick        # the tests' run: a tiny random Llama, seconds

The prompts are the first --prompts sequences of --seq-len tokens that klstore packs from the
shipped self-distilled corpus (jobs/corpus/smollm2-self.jsonl), as `klstore lens fit` does; both
sides get the same token ids (no BOS added), skip 16, float32 on the CPU.

1. Speed against the anchor: TransformerLens's `JacobianLens.fit` (benchmarks/jlens_ref.py in its
   own environment; its fit time, without booting the model) and klstore's estimator
   (`core.jacobian.prompt_jacobian` over the same prompts, one process, the same dim_batch;
   without loading the model), one after the other. Prints both times, their ratio and the error
   between the two lenses: per source block, ||J_klstore - J_TL||_F / ||J_TL||_F (the largest over
   blocks). Target: klstore no slower than TransformerLens.
2. Memory: one fresh process per dim_batch (1, 8, 32) loads the model and fits one prompt; prints
   the model's parameter bytes, the resident memory after the load and the fit's own peak (Linux:
   the peak is reset after the load through /proc/self/clear_refs, since loading a GGUF model
   peaks higher than a fit does).
3. Scale: `klstore lens fit` (kind jacobian, one prompt per shard) on --scale-prompts prompts with
   1 and 2 Ray workers: prompts/s from the shard checkpoints' write times (from the moment every
   worker has finished its first prompt to the last prompt, so model loads are left out), and the
   fit's wall time (model loads and the held-out evaluation included).

4. Subset (`--sections subset`): one prompt fitted at every source block, then at the deepest
   --subset-fraction of them (`source_layers`), alternating, best of --subset-repeats each, in one
   process: the ratio of their times, and the largest difference between the subset's rows and
   the whole fit's at the same blocks (the same numbers, so float64 summation order only).

Sections run one after the other and are not repeated; the load average is printed at the start
and the end (other processes on the machine slow whichever section runs then). Prints numbers and
PASS/FAIL lines; asserts nothing.

`python benchmarks/jlens_fit.py memory-one --model M --dim-batch D --seq-len T` is section 2's
child process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from lens_fit import CORPUS, REPO, TimedFit, log, tiny_model  # noqa: E402

TLENS_PY = REPO / "build" / "venv-tlens" / "bin" / "python"
REF_SCRIPT = REPO / "benchmarks" / "jlens_ref.py"
SKIP = 16


def packed_prompts(tokenizer, seq_len: int, n: int):
    """(n, seq_len) int64: the corpus's first n training sequences, packed as `klstore lens fit` packs them."""
    from klstore.core.corpus import load_corpus

    return load_corpus(str(CORPUS), tokenizer, seq_len, held_out=0, max_train_sequences=n).train


def model_folder(args, work: Path) -> Path:
    """A Hugging Face folder of the model for TransformerLens (klstore's dequantized GGUF cache for SmolLM2)."""
    if args.quick:
        return Path(args.model)
    from klstore.core.models import _gguf_cache_folder, resolve

    folder = _gguf_cache_folder(resolve(args.model))
    if not (folder / "config.json").exists():
        raise SystemExit(f"no Hugging Face folder for {args.model} at {folder}: load it once with klstore first")
    return folder


def status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now; VmHWM: its peak), GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def memory_one(argv: list[str]) -> None:
    """Section 2's child: load, fit one prompt at --dim-batch, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dim-batch", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    args = parser.parse_args(argv)
    from klstore.core import jacobian
    from klstore.core.adapter import Adapter
    from klstore.core.models import load_model, quiet_libraries

    quiet_libraries()
    loaded = load_model(args.model, device="cpu")
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    ids = packed_prompts(loaded.tokenizer, args.seq_len, 1)
    adapter = Adapter.discover(loaded.model)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the load's own peak
    after_load = status_gib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux: the peak (VmHWM) starts again from the resident memory now
    except OSError as exc:  # not Linux, or not allowed: the peak then includes the load's
        print(f"note: could not reset the peak ({exc}); it includes the model's load", file=sys.stderr)
    start = time.perf_counter()
    jacobian.prompt_jacobian(loaded.model, adapter, ids[:1], SKIP, args.dim_batch)
    seconds = time.perf_counter() - start
    peak = status_gib("VmHWM")
    print(
        json.dumps(
            {
                "params_gib": params / 2**30,
                "load_peak_gib": load_peak,
                "after_load_gib": after_load,
                "peak_gib": peak,
                "s": seconds,
            }
        )
    )


def speed(args, work: Path) -> None:
    import torch

    from klstore.core import jacobian, lenses
    from klstore.core.adapter import Adapter
    from klstore.core.models import load_model, quiet_libraries

    print(
        f"\n1. speed against the anchor: {args.prompts} prompt(s) x {args.seq_len} tokens, dim_batch {args.dim_batch}"
    )
    quiet_libraries()
    loaded = load_model(args.model, device="cpu")
    ids = packed_prompts(loaded.tokenizer, args.seq_len, args.prompts)
    anchor_ok = TLENS_PY.is_file() and (TLENS_PY.parent.parent / ".installed").is_file()
    ref: dict | None = None
    if args.skip_anchor or not anchor_ok:
        why = "--skip-anchor" if args.skip_anchor else f"no TransformerLens environment at {TLENS_PY.parent.parent}"
        print(f"anchor skipped: {why} (make bench-tlens-env)")
    else:
        prompts_json, out = work / "prompts.json", work / "tl.pt"
        prompts_json.write_text(json.dumps(ids.tolist()))
        command = [str(TLENS_PY), str(REF_SCRIPT), "fit", str(model_folder(args, work)), str(prompts_json), str(out)]
        command += ["--dim-batch", str(args.dim_batch), "--skip", str(SKIP), "--max-len", str(args.seq_len)]
        command += ["--no-prepend-bos", "--save-dtype", "float32", "--model-name", "bench"]
        log("TransformerLens fit ...")
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"jlens_ref.py fit failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        ref["lens"] = lenses.load(str(out))
    adapter = Adapter.discover(loaded.model)
    log("klstore fit ...")
    start = time.perf_counter()
    sums = jacobian.JacobianSums.zeros(adapter.n_layers, loaded.model.get_input_embeddings().weight.shape[1])
    for row in range(ids.shape[0]):
        sums.add(jacobian.prompt_jacobian(loaded.model, adapter, ids[row : row + 1], SKIP, args.dim_batch))
    mine_s = time.perf_counter() - start
    print(f"klstore:         {mine_s:8.1f} s  ({args.prompts / mine_s:.4f} prompts/s)")
    if ref is None:
        return
    tl_s = ref["fit_s"]
    threads = ref["torch_threads"]
    print(f"TransformerLens: {tl_s:8.1f} s  ({args.prompts / tl_s:.4f} prompts/s, torch threads {threads})")
    eye = torch.eye(sums.total.shape[-1], dtype=torch.float64)
    theirs = ref["lens"].weight.double() + eye
    errors = [
        float((sums.mean()[layer] - theirs[layer]).norm() / theirs[layer].norm())
        for layer in range(adapter.n_layers - 1)
    ]
    worst = max(range(len(errors)), key=errors.__getitem__)
    print(
        f"error: relative Frobenius ||J_klstore - J_TL|| / ||J_TL|| per source block, largest {errors[worst]:.2e} at "
        f"block {worst}, smallest {min(errors):.2e}"
    )
    ok = mine_s <= tl_s
    print(
        f"{'PASS' if ok else 'FAIL'}: klstore's fit no slower than TransformerLens's ({mine_s / tl_s:.2f}x its time). "
        "Both run one forward pass of dim_batch copies per prompt with its graph kept and ceil(d / dim_batch) "
        "backward passes to the block outputs, parameters frozen; the difference: klstore's graph holds only "
        f"the valid positions ({args.seq_len - SKIP - 1} of {args.seq_len}: the first {SKIP} enter as a constant "
        "KV cache, the last is not run), TransformerLens's every position"
    )


def subset(args) -> None:
    import torch

    from klstore.core import jacobian, lenses
    from klstore.core.adapter import Adapter
    from klstore.core.models import load_model, quiet_libraries

    quiet_libraries()
    loaded = load_model(args.model, device="cpu")
    loaded.model.requires_grad_(False)
    adapter = Adapter.discover(loaded.model)
    n = adapter.n_layers
    first = n - 1 - max(1, round((n - 1) * args.subset_fraction))
    blocks = tuple(range(first, n - 1))
    print(
        f"\n4. subset: one prompt x {args.seq_len} tokens, dim_batch {args.dim_batch}: every source block (0-{n - 2}) "
        f"vs blocks {lenses.spans(blocks)} (source_layers), best of {args.subset_repeats} each, alternating"
    )
    ids = packed_prompts(loaded.tokenizer, args.seq_len, 1)
    times: dict[str, list[float]] = {"whole": [], "subset": []}
    rows: dict[str, torch.Tensor] = {}
    for _ in range(args.subset_repeats):
        for name, chosen in (("whole", None), ("subset", blocks)):
            start = time.perf_counter()
            rows[name] = jacobian.prompt_jacobian(loaded.model, adapter, ids, SKIP, args.dim_batch, chosen)
            times[name].append(time.perf_counter() - start)
    whole_s, subset_s = min(times["whole"]), min(times["subset"])
    diff = max(float((rows["subset"][i] - rows["whole"][b]).abs().max()) for i, b in enumerate(blocks))
    print(
        f"every block: {whole_s:7.2f} s   blocks {lenses.spans(blocks)}: {subset_s:7.2f} s ({subset_s / whole_s:.2f}x)"
    )
    print(f"largest |J_subset - J_whole| at the same blocks: {diff:.2e}")


def memory(args) -> None:
    print(f"\n2. memory: one prompt of {args.seq_len} tokens per fresh process")
    print(
        f"{'dim_batch':>9} {'params GiB':>10} {'after load GiB':>14} {'fit peak GiB':>12} {'peak - load':>11} {'s':>7}"
    )
    for dim_batch in args.memory_dim_batches:
        command = [sys.executable, __file__, "memory-one", "--model", args.model]
        command += ["--dim-batch", str(dim_batch), "--seq-len", str(args.seq_len)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory-one failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{dim_batch:>9} {r['params_gib']:>10.3f} {r['after_load_gib']:>14.2f} {r['peak_gib']:>12.2f} "
            f"{r['peak_gib'] - r['after_load_gib']:>11.2f} {r['s']:>7.1f}"
        )
        load_peak = r["load_peak_gib"]
    print(f"(the model's load alone peaked at {load_peak:.2f} GiB resident, before the fit's peak was reset)")


def scale(args, work: Path) -> None:
    from klstore.run.runner import init_ray
    from klstore.spec import parse_fit

    prompts, dim_batch = args.scale_prompts, args.scale_dim_batch
    print(f"\n3. scale: klstore lens fit, {prompts} prompts, one per shard, dim_batch {dim_batch}")
    ray, started_here = init_ray(log_to_driver=False)
    try:
        rates = {}
        for workers in (1, 2):
            spec = parse_fit(
                {
                    "name": f"bench-jlens-scale-{workers}",
                    "store": str(work / f"store-{workers}"),
                    "model": args.model,
                    "kind": "jacobian",
                    "corpus": {
                        "path": str(CORPUS),
                        "seq_len": args.seq_len,
                        "held_out": 1,
                        "train_sequences": args.scale_prompts,
                    },
                    "jacobian": {"skip": SKIP, "dim_batch": args.scale_dim_batch, "shard_size": 1},
                    "workers": workers,
                },
                f"benchmark fit jlens scale {workers}",
            )
            store = work / f"store-{workers}"
            timed = TimedFit(spec, str(store))
            # prompts/s from the shard checkpoints' times (one prompt per shard): from the moment
            # every worker has finished its first prompt (each loaded its model before it) to the last
            done = sorted(path.stat().st_mtime for path in store.glob("lens_fits/*/jacobian-*.pt"))
            ok = len(done) == args.scale_prompts > workers and done[-1] > done[workers - 1]
            rate = (args.scale_prompts - workers) / (done[-1] - done[workers - 1]) if ok else None
            rates[workers] = rate
            shown = "-" if rate is None else f"{rate:.4f}"
            print(f"{workers} worker(s): {shown} prompts/s, fit {timed.wall_s:.0f} s in all")
        if rates[1] and rates[2]:
            print(
                f"2 workers vs 1: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} CPUs (load average "
                f"{os.getloadavg()[0]:.1f}): on one machine the two workers split the same cores"
            )
    finally:
        if started_here:
            ray.shutdown()


def main() -> None:
    if sys.argv[1:2] == ["memory-one"]:
        memory_one(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=2, help="section 1's prompts")
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--dim-batch", type=int, default=8, help="section 1 (the reference's default)")
    parser.add_argument("--memory-dim-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--scale-prompts", type=int, default=4)
    parser.add_argument("--scale-dim-batch", type=int, default=32)
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--sections", default="speed,memory,scale,subset")
    parser.add_argument("--subset-fraction", type=float, default=0.25, help="section 4: the deepest share of blocks")
    parser.add_argument("--subset-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama (the tests)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="klstore-jlens-bench-"))
    try:
        if args.quick:
            args.model = str(tiny_model(work / "tiny-llama"))
            args.seq_len, args.prompts, args.scale_prompts = 24, 2, 4
        print(
            f"J-lens fit benchmark: model {args.model if not args.quick else 'tiny random Llama (--quick)'}, "
            f"CPUs {os.cpu_count()}, load average at the start {os.getloadavg()[0]:.1f}"
        )
        sections = args.sections.split(",")
        if "speed" in sections:
            speed(args, work)
        if "memory" in sections:
            memory(args)
        if "scale" in sections:
            scale(args, work)
        if "subset" in sections:
            subset(args)
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
