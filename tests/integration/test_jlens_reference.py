"""klstore's Jacobian lens against the reference implementation, TransformerLens 4.3's `JacobianLens`.

TransformerLens runs in its own environment (`make bench-tlens-env` builds build/venv-tlens; .ci/run
builds it), driven through benchmarks/jlens_ref.py, which never imports klstore. For each model (the
tiny random Llama of conftest's `tiny_model_dir`, and SmolLM2-135M's dequantized folder) one bench
process runs every reference command in turn, on the same token-id prompts klstore fits on:

- the fit: klstore's J_l (`JacobianSums` of `prompt_jacobian` over the prompts, `mean()`) equals
  TransformerLens's `fit` (saved in float32) at every source block, to float32 rounding (FIT_RTOL);
- the read-out: TransformerLens's artifact (its default float16 storage), loaded by `lenses.load`,
  decodes block outputs to the logits TransformerLens's own `readout` gives for them;
- merging (the tiny model: 4 prompts split 1 + 3): klstore's shard sums merged equal the whole fit,
  and TransformerLens's `merge` of its two shards equals klstore's merge of the same split
  (prompt-weighted: the unweighted mean of the shards is far off);
- the artifact both ways: TransformerLens's float16 file loads in klstore with its float16 values;
  a file klstore's `save_jlens` writes (float32, `model_name` in the metadata) loads in
  TransformerLens, whose `readout` of it gives klstore's logits.

Cost: a J-lens fit is d_model backward rows per prompt. SmolLM2's (d = 576; one prompt of 21 tokens,
skip 16, 6 passes of 96 rows) dominate the file: 4 to 6 CPU-minutes in all, about two thirds of them
klstore's fit (its estimator repeats the forward pass for every 96 rows; TransformerLens runs one forward
and keeps the graph); the tiny model's fits take seconds. 8 to 10 minutes on 2 busy shared CPUs.

Where build/venv-tlens is absent these tests skip, except under CI (CI=true), where they fail and say
to run `make bench-tlens-env`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bench_envs import reference_python, run_reference
from conftest import REPO

from klstore.core import jacobian, lenses
from klstore.core.adapter import Adapter

pytestmark = pytest.mark.real_model  # SmolLM2 (and the tiny model's tokenizer is SmolLM2's)

TLENS_VENV = REPO / "build" / "venv-tlens"
REF_SCRIPT = REPO / "benchmarks" / "jlens_ref.py"

# The fit, measured per source block as the relative Frobenius error ||J_klstore - J_TL||_F / ||J_TL||_F.
# Both sides compute every gradient in float32 (the model's dtype) but through different code: klstore
# differentiates Hugging Face's forward (sdpa attention) from the embeddings, TransformerLens its bridge
# (eager attention) from block 0's output, with other batch shapes, so each matrix product and
# reduction rounds in its own order; TransformerLens then averages the positions and sums the prompts in
# float32, klstore in float64. Each step rounds at float32's unit roundoff u = 2^-24 (6e-8), and the
# differences add up block by block down the backward pass: on SmolLM2 they grow from 4.5e-7 (8 u) at
# block L-2 to 4.8e-6 (80 u) at block 0, about 3 u per block; on the 4-block tiny model 5e-8 (1 u).
# 5e-5 (800 u, 28 u per SmolLM2 block) leaves a factor of 10 for other CPUs' kernels and stays four
# orders below a real difference (a wrong position set, skip or block index moves J by O(0.1-1)
# relative: the tests check that J is far from the identity and the unweighted shard mean far from
# the merge).
FIT_RTOL = 5e-5
# Logits: the two sides apply J (or I + W) and the head in different orders; agree to a few units in
# the last place of the largest logit (as in test_tunedlens_reference.py).
LOGIT_RTOL = 1e-5
# klstore's merge is float64 addition in another order than the whole fit's: float64 roundoff (1e-16).
MERGE64_RTOL = 1e-12


def _reference_python() -> Path:
    return reference_python(TLENS_VENV, "TransformerLens reference", "bench-tlens-env")


def _run_reference(python: Path, commands: list[list[str]]) -> list[dict]:
    """Run jlens_ref.py's commands in one process; their JSON results, in order."""
    return run_reference(python, REF_SCRIPT, commands, timeout=900)


def _rel_frobenius(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """||mine - ref||_F / ||ref||_F, in float64."""
    assert mine.shape == ref.shape, (mine.shape, ref.shape)
    return ((mine.double() - ref.double()).norm() / ref.double().norm()).item()


def _max_diff(mine: torch.Tensor, ref: torch.Tensor) -> float:
    assert mine.shape == ref.shape, (mine.shape, ref.shape)
    return (mine.float() - ref.float()).abs().max().item()


def _assert_logits_close(mine: torch.Tensor, ref: torch.Tensor, what: str) -> str:
    """|mine - ref| <= LOGIT_RTOL * max(1, max |ref|) everywhere; returns 'max difference / tolerance'."""
    diff = _max_diff(mine, ref)
    tol = LOGIT_RTOL * max(1.0, ref.abs().max().item())
    assert diff <= tol, f"{what}: max |difference| {diff:.3g} > {tol:.3g}"
    return f"{diff:.2g} / {tol:.2g}"


@contextmanager
def _frozen(model):
    """Parameters without gradients for the fit (the J-lens needs activation gradients only); the
    flags are restored after, since the SmolLM2 model is shared by the whole session."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _klstore_sums(model, adapter, prompts, skip, dim_batch, blocks=None) -> jacobian.JacobianSums:
    """klstore's estimator over `prompts` (token-id lists), as `klstore lens fit` runs it per shard."""
    d_model = model.get_input_embeddings().weight.shape[1]
    sums = jacobian.JacobianSums.zeros(adapter.n_layers, d_model, blocks)
    with _frozen(model):
        for ids in prompts:
            ids = torch.tensor([ids])
            sums.add(jacobian.prompt_jacobian(model, adapter, ids, skip=skip, dim_batch=dim_batch, blocks=blocks))
    return sums


PARTIAL = (1, 2)  # the tiny model's fit of some source blocks (source_layers), both sides


# ------------------------------------------------------------------ the models
@dataclass(frozen=True)
class Setup:
    """How one model is fitted: the same prompts, skip and dim_batch on both sides."""

    prompts: list[list[int]]
    skip: int
    dim_batch: int
    shards: tuple[int, ...] = ()  # prompts per shard for the merge checks (empty: none)


def _tiny_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (22, 30, 25, 28)]


SMOLLM2_TEXT = "The capital of France is Paris, and the quick brown fox jumps over the lazy dog by the river."


@dataclass
class Case:
    """One model, klstore's fit of it, and what the reference commands wrote."""

    name: str
    setup: Setup
    model: object
    adapter: Adapter
    work: Path
    whole: jacobian.JacobianSums  # klstore's fit over every prompt
    shard_sums: list[jacobian.JacobianSums]  # klstore's fit per shard
    blocks: tuple[int, ...]  # read-out blocks: 0, a middle one, L-2 and L-1 (the identity)
    hidden: dict[int, torch.Tensor]  # klstore block l's output for the first prompt, (T, d)
    mine: lenses.AffineLens  # klstore's lens, as save_jlens wrote it
    results: dict[str, dict]  # reference command -> its JSON line
    klstore_fit_s: float
    reference_s: float
    partial: jacobian.JacobianSums | None = None  # the tiny model: klstore's fit of blocks PARTIAL
    hidden_all: dict[int, torch.Tensor] | None = None  # the tiny model: every block's output

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    def artifact(self, name: str) -> dict:
        return torch.load(self.work / name, map_location="cpu", weights_only=True)

    def tl_matrices(self, name: str) -> torch.Tensor:
        """An artifact's J as (L-1, d, d), blocks 0..L-2."""
        J = self.artifact(name)["J"]
        assert sorted(J) == list(range(self.n_layers - 1)), sorted(J)
        return torch.stack([J[layer] for layer in range(self.n_layers - 1)])

    def readout(self, name: str) -> dict[int, torch.Tensor]:
        return {int(k): v for k, v in torch.load(self.work / name, weights_only=True).items()}


_CASES: dict[str, Case] = {}


def _model_for(name: str, request) -> tuple[object, Path, Setup]:
    if name == "tiny-llama":
        from klstore.core.models import load_model

        folder = request.getfixturevalue("tiny_model_dir")
        loaded = load_model(str(folder), device="cpu")
        return loaded.model, folder, Setup(_tiny_prompts(), skip=4, dim_batch=8, shards=(1, 3))
    from klstore.core.models import _gguf_cache_folder, resolve

    smollm2 = request.getfixturevalue("smollm2")
    assert smollm2.dtype == torch.float32
    folder = _gguf_cache_folder(resolve("smollm2-135m"))
    assert (folder / "config.json").exists(), f"no dequantized SmolLM2 in {folder}"
    ids = smollm2.tokenizer(SMOLLM2_TEXT).input_ids
    return smollm2.model, folder, Setup([ids], skip=16, dim_batch=96)


def _build(name: str, request, tmp_path_factory) -> Case:
    python = _reference_python()
    model, folder, setup = _model_for(name, request)
    work = tmp_path_factory.mktemp(f"jlens-{name}")
    adapter = Adapter.discover(model)
    n_layers = adapter.n_layers

    start = time.perf_counter()
    whole = _klstore_sums(model, adapter, setup.prompts, setup.skip, setup.dim_batch)
    klstore_fit_s = time.perf_counter() - start
    bounds = [sum(setup.shards[:i]) for i in range(len(setup.shards) + 1)]
    shards = [setup.prompts[a:b] for a, b in zip(bounds, bounds[1:])]
    shard_sums = [_klstore_sums(model, adapter, shard, setup.skip, setup.dim_batch) for shard in shards]

    mine = whole.lens()
    lenses.save_jlens(mine, work / "klstore.pt", n_prompts=whole.prompts, metadata={"model_name": name})

    blocks = tuple(sorted({0, n_layers // 2, n_layers - 2, n_layers - 1}))
    captured: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for block in adapter.blocks
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([setup.prompts[0]]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == n_layers
    hidden = {layer: captured[layer][0].float() for layer in blocks}  # the last one before the final norm
    torch.save(hidden, work / "hidden.pt")
    partial = hidden_all = None
    if setup.shards:  # the tiny model: a fit of blocks PARTIAL, read at every block it reads
        partial = _klstore_sums(model, adapter, setup.prompts, setup.skip, setup.dim_batch, PARTIAL)
        lenses.save_jlens(partial.lens(), work / "klstore_partial.pt", n_prompts=partial.prompts)
        hidden_all = {layer: captured[layer][0].float() for layer in (*PARTIAL, n_layers - 1)}
        torch.save(hidden_all, work / "hidden_partial.pt")

    def at(file: str) -> str:
        return str(work / file)

    def fit(prompts: list[list[int]], out: str) -> list[str]:
        (work / f"{out}.json").write_text(json.dumps(prompts))
        return [
            *["fit", str(folder), at(f"{out}.json"), at(out), "--skip", str(setup.skip)],
            *["--dim-batch", str(setup.dim_batch), "--max-len", "512", "--save-dtype", "float32"],
            *["--model-name", name, "--corpus", f"{name}-prompts"],  # shards share the corpus name: merge checks it
        ]

    def readout(lens: str, out: str, *extra: str) -> list[str]:
        return ["readout", str(folder), at(lens), at("hidden.pt"), at(out), "--model-name", name, *extra]

    commands = {
        "fit": fit(setup.prompts, "tl.pt"),
        "save16": ["merge", at("tl.pt"), at("tl16.pt")],  # TL's own save of its fit, in its default float16
        "info16": ["info", at("tl16.pt")],
        **{f"fit-shard{i}": fit(shard, f"tl_shard{i}.pt") for i, shard in enumerate(shards)},
        "readout-tl16": readout("tl16.pt", "ro_tl16.pt"),
        "logit-lens": readout("tl16.pt", "ro_logit.pt", "--logit-lens"),
        "load-klstore": ["merge", at("klstore.pt"), at("klstore_via_tl.pt"), "--save-dtype", "float32"],
        "readout-klstore": readout("klstore.pt", "ro_klstore.pt"),
    }
    if shards:
        merge = [at(f"tl_shard{i}.pt") for i in range(len(shards))]
        commands["merge"] = ["merge", *merge, at("tl_merged.pt"), "--save-dtype", "float32"]
        commands["fit-partial"] = [*fit(setup.prompts, "tl_partial.pt"), "--layers", *map(str, PARTIAL)]
        for lens in ("tl_partial", "klstore_partial"):
            commands[f"readout-{lens}"] = [
                *["readout", str(folder), at(f"{lens}.pt"), at("hidden_partial.pt"), at(f"ro_{lens}.pt")],
                *["--model-name", name],
            ]
    start = time.perf_counter()
    results = dict(zip(commands, _run_reference(python, list(commands.values())), strict=True))
    reference_s = time.perf_counter() - start
    print(
        f"\n{name}: klstore fit {klstore_fit_s:.1f} s; reference {reference_s:.1f} s",
        f"(TL fit {results['fit']['fit_s']} s)",
        {k: v["command_s"] for k, v in results.items()},
    )
    return Case(
        name=name,
        setup=setup,
        model=model,
        adapter=adapter,
        work=work,
        whole=whole,
        shard_sums=shard_sums,
        blocks=blocks,
        hidden=hidden,
        mine=mine,
        results=results,
        klstore_fit_s=klstore_fit_s,
        reference_s=reference_s,
        partial=partial,
        hidden_all=hidden_all,
    )


def _case(name: str, request, tmp_path_factory) -> Case:
    if name not in _CASES:
        _CASES[name] = _build(name, request, tmp_path_factory)
    return _CASES[name]


@pytest.fixture(params=["tiny-llama", "smollm2-135m"])
def case(request, tmp_path_factory) -> Case:
    return _case(request.param, request, tmp_path_factory)


@pytest.fixture
def tiny(request, tmp_path_factory) -> Case:
    """The tiny model's case: its 4 prompts split 1 + 3 for the merge checks."""
    return _case("tiny-llama", request, tmp_path_factory)


def _klstore_logits(case: Case, lens: lenses.AffineLens) -> dict[int, torch.Tensor]:
    """klstore's read-out of the block outputs through `lens`: adapter.logits(lens.translate(...))."""
    with torch.no_grad():
        return {
            layer: case.adapter.logits(lens.translate((layer,), case.hidden[layer][None]))[0] for layer in case.blocks
        }


# ------------------------------------------------------------------ the tests
def test_fitted_matrices_equal_transformer_lens_fit(case):
    fit = case.results["fit"]
    n_layers, prompts = case.n_layers, case.setup.prompts
    assert fit["prompt_tokens"] == [len(p) for p in prompts]  # the ids went in unchanged (no BOS, no cut)
    assert fit["n_prompts"] == case.whole.prompts == len(prompts) and case.whole.skipped == 0
    assert fit["source_layers"] == list(range(n_layers - 1))
    meta = fit["metadata"]
    assert (meta["skip_first_positions"], meta["dim_batch"]) == (case.setup.skip, case.setup.dim_batch)
    assert meta["fit_dtype"] == "float32" and meta["model_name"] == case.name
    ref = case.tl_matrices("tl.pt")
    assert ref.dtype == torch.float32
    mine = case.whole.mean()
    eye = torch.eye(mine.shape[-1], dtype=torch.float64)
    assert torch.equal(mine[-1], eye)  # the last block: the identity, which TL does not store
    errors = [_rel_frobenius(mine[layer], ref[layer]) for layer in range(n_layers - 1)]
    worst = max(errors)
    print(f"\n{case.name}: J rel. Frobenius error per block, max {worst:.3g}: {[f'{e:.2g}' for e in errors]}")
    assert worst <= FIT_RTOL, f"{case.name}: J differs from TransformerLens's by {worst:.3g} > {FIT_RTOL} ({errors})"
    # the check has teeth: every J is far from the identity (the logit lens)
    far = min(_rel_frobenius(eye, ref[layer]) for layer in range(n_layers - 1))
    assert far > 100 * FIT_RTOL, f"{case.name}: some J is within {far:.3g} of the identity"


def test_transformer_lens_artifact_loads_with_its_float16_values(case):
    info = case.results["info16"]
    assert {v["dtype"] for v in info["J"].values()} == {"float16"}  # TL's default storage
    j16 = case.tl_matrices("tl16.pt")
    assert j16.dtype == torch.float16
    # TL's float16 save of the same fit (its merge of one lens: J * n / n, exact for n = 1 and 4)
    assert torch.equal(j16, case.tl_matrices("tl.pt").half())
    lens = lenses.load(case.work / "tl16.pt")
    n_layers, d_model = case.n_layers, j16.shape[-1]
    assert (lens.kind, lens.n_layers, lens.d_model) == ("jacobian", n_layers, d_model)
    assert lens.model == case.name and lens.provenance["n_prompts"] == len(case.setup.prompts)
    eye = torch.eye(d_model)
    assert lens.weight.dtype == torch.float32
    # TL's float16 values: off the diagonal W = J16 exactly; on it W = J16 - 1 in float32, exact
    # unless the entry has bits below 2^-23 (|J16| < 2^-13), then rounded by at most 2^-24
    off = ~torch.eye(d_model, dtype=torch.bool)
    assert torch.equal(lens.weight[:-1][:, off], j16.float()[:, off])
    diagonal = (lens.weight[:-1] + eye).diagonal(dim1=1, dim2=2) - j16.float().diagonal(dim1=1, dim2=2)
    assert diagonal.abs().max().item() <= 2**-24
    assert (j16.float() - case.tl_matrices("tl.pt")).abs().max().item() > 2**-20  # not the float32 fit's values
    assert not lens.weight[-1].any() and not lens.bias.any()


def test_readout_of_transformer_lens_artifact_matches_its_readout(case):
    ref = case.readout("ro_tl16.pt")
    logit_lens = case.readout("ro_logit.pt")
    assert sorted(ref) == list(case.blocks) and case.results["readout-tl16"]["identity_layers"] == [case.n_layers - 1]
    mine = _klstore_logits(case, lenses.load(case.work / "tl16.pt"))
    diffs = {}
    for layer in case.blocks:
        what = f"{case.name} block {layer}: klstore vs TL readout"
        diffs[layer] = _assert_logits_close(mine[layer], ref[layer], what)
        with torch.no_grad():
            _assert_logits_close(case.adapter.logits(case.hidden[layer]), logit_lens[layer], f"{case.name} logit lens")
        moved = _max_diff(ref[layer], logit_lens[layer])
        if layer < case.n_layers - 1:  # the lens moves the logits far more than the tolerance
            assert moved > 1e3 * LOGIT_RTOL * max(1.0, ref[layer].abs().max().item()), (layer, moved)
        else:  # the last block reads with the identity
            assert moved == 0.0
    print(f"\n{case.name}: read-out max |logit difference| per block: {diffs}")


def test_klstore_artifact_loads_in_transformer_lens(case):
    written = case.artifact("klstore.pt")
    assert {v.dtype for v in written["J"].values()} == {torch.float32}
    summary = case.results["load-klstore"]  # TL's load (and save) of klstore's file
    assert summary["n_prompts"] == len(case.setup.prompts)
    assert summary["source_layers"] == list(range(case.n_layers - 1))
    assert summary["d_model"] == case.mine.d_model and summary["metadata"]["model_name"] == case.name
    # TL's merge of one lens is J * n / n in float32: J again, to float32 rounding
    written_j = case.tl_matrices("klstore.pt")
    assert (case.tl_matrices("klstore_via_tl.pt") - written_j).abs().max() <= 2**-23 * written_j.abs().max()
    # back into klstore: the file stores J = I + W in float32, so W comes back to float32 rounding
    # of J (not bit for bit: the lens id of the read-back differs from the written lens's)
    back = lenses.load(case.work / "klstore.pt")
    scale = case.tl_matrices("klstore.pt").abs().amax(dim=(1, 2)).clamp(min=1.0)
    assert ((back.weight[:-1] - case.mine.weight[:-1]).abs().amax(dim=(1, 2)) <= 2**-23 * scale).all()
    ref = case.readout("ro_klstore.pt")
    mine = _klstore_logits(case, case.mine)
    diffs = {
        layer: _assert_logits_close(mine[layer], ref[layer], f"{case.name} block {layer}: TL readout of klstore's lens")
        for layer in case.blocks
    }
    print(f"\n{case.name}: TL read-out of klstore's artifact, max |logit difference| per block: {diffs}")


def test_klstore_shards_merge_to_the_whole_fit(tiny):
    merged = jacobian.JacobianSums.zeros(tiny.n_layers, tiny.mine.d_model)
    for shard in tiny.shard_sums:
        merged.merge(shard)
    assert [s.prompts for s in tiny.shard_sums] == list(tiny.setup.shards)
    assert (merged.prompts, merged.skipped) == (tiny.whole.prompts, 0)
    errors = [_rel_frobenius(merged.mean()[layer], tiny.whole.mean()[layer]) for layer in range(tiny.n_layers)]
    print(f"\nklstore merge vs whole fit: max rel. Frobenius error {max(errors):.3g}")
    assert max(errors) <= MERGE64_RTOL, errors


def test_transformer_lens_merge_equals_klstore_merge(tiny):
    result = tiny.results["merge"]
    assert result["n_prompts"] == len(tiny.setup.prompts)
    merged = jacobian.JacobianSums.zeros(tiny.n_layers, tiny.mine.d_model)
    for shard in tiny.shard_sums:
        merged.merge(shard)
    mine = merged.mean()
    ref = tiny.tl_matrices("tl_merged.pt")
    errors = [_rel_frobenius(mine[layer], ref[layer]) for layer in range(tiny.n_layers - 1)]
    print(f"\nTL merge vs klstore merge: max rel. Frobenius error {max(errors):.3g}")
    assert max(errors) <= FIT_RTOL, errors
    # each TL shard is klstore's shard, and the merge is prompt-weighted: the plain mean of the two
    # shard means (1 and 3 prompts) is far from both merges (far beyond the tolerance, and beyond the
    # agreement seen by a factor of 1000 at least)
    shards = [tiny.tl_matrices(f"tl_shard{i}.pt") for i in range(len(tiny.shard_sums))]
    for shard, sums in zip(shards, tiny.shard_sums, strict=True):
        assert max(_rel_frobenius(sums.mean()[l], shard[l]) for l in range(tiny.n_layers - 1)) <= FIT_RTOL
    unweighted = sum(shards) / len(shards)
    off = min(_rel_frobenius(unweighted[l], ref[l]) for l in range(tiny.n_layers - 1))
    print(f"unweighted shard mean vs TL merge: min rel. Frobenius difference {off:.3g}")
    assert off > max(100 * FIT_RTOL, 1e3 * max(errors)), off


def test_a_fit_of_some_source_layers_equals_transformer_lens_both_ways(tiny):
    """source_layers (1, 2) of the 4-block model on both sides: the matrices agree as the whole
    fits do; each side's artifact names the blocks and the depth (target_layer) and loads in the
    other; each side's read-out of the other's lens gives its own logits at blocks 1, 2 and 3."""
    assert tiny.partial is not None and tiny.hidden_all is not None
    result = tiny.results["fit-partial"]
    assert result["source_layers"] == list(PARTIAL) and result["metadata"]["target_layer"] == tiny.n_layers - 1
    ref = tiny.artifact("tl_partial.pt")["J"]
    assert sorted(ref) == list(PARTIAL)
    mine = tiny.partial.mean()
    errors = [_rel_frobenius(mine[row], ref[block]) for row, block in enumerate(PARTIAL)]
    print(f"\npartial fit: J rel. Frobenius error per block {[f'{e:.2g}' for e in errors]}")
    assert max(errors) <= FIT_RTOL, errors
    whole = tiny.whole.mean()  # the same rows as the whole fit (float64 summation order)
    for row, block in enumerate(PARTIAL):
        assert _rel_frobenius(mine[row], whole[block]) <= MERGE64_RTOL
    theirs = lenses.load(tiny.work / "tl_partial.pt")
    assert theirs.blocks == PARTIAL and theirs.depth_known and theirs.n_layers == tiny.n_layers
    with pytest.raises(lenses.LensError, match="no translator for layers 0;"):
        theirs.translate((0,), tiny.hidden_all[1][None])
    readable = (*PARTIAL, tiny.n_layers - 1)
    for lens, name in ((theirs, "ro_tl_partial.pt"), (tiny.partial.lens(), "ro_klstore_partial.pt")):
        ref_logits = tiny.readout(name)
        assert sorted(ref_logits) == list(readable)
        with torch.no_grad():
            for layer in readable:
                logits = tiny.adapter.logits(lens.translate((layer,), tiny.hidden_all[layer][None]))[0]
                _assert_logits_close(logits, ref_logits[layer], f"partial lens {name} block {layer}")
