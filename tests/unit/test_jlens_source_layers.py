"""A Jacobian lens fitted at some source blocks only (`jacobian.source_layers`): the estimator
over a subset against the independent float64 computation (test_jacobian.reference_jacobian),
its sums, the lens that reads those blocks and refuses the others, and its files both ways
(klstore's folder, TransformerLens's artifact with and without the model's depth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_jacobian import reference_jacobian
from tiny_models import FAMILIES, build

from klstore.core import jacobian, lenses
from klstore.core.adapter import Adapter
from klstore.errors import KlstoreError

D = 32


@pytest.mark.parametrize("family", FAMILIES)
def test_a_subset_of_blocks_matches_the_float64_reference_and_the_whole_estimator(family):
    model64 = build(family, torch.float64).requires_grad_(False)
    adapter = Adapter.discover(model64)
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(5))
    whole = jacobian.prompt_jacobian(model64, adapter, ids, skip=2, dim_batch=7)
    part = jacobian.prompt_jacobian(model64, adapter, ids, skip=2, dim_batch=7, blocks=(1, 2))
    assert part.shape == (2, D, D)
    for row, block in enumerate((1, 2)):
        expected = reference_jacobian(model64, ids, block, skip=2)
        error = (part[row] - expected).norm() / expected.norm()
        assert error < 1e-6, f"{family} block {block}: relative Frobenius error {error:.3g}"  # see test_jacobian
        # the same graph and seeds: the rows of the whole estimator, to float64 summation order
        torch.testing.assert_close(part[row], whole[block], rtol=0, atol=1e-12)


def _sums_over(model, adapter, prompts, blocks):
    sums = jacobian.JacobianSums.zeros(adapter.n_layers, D, blocks)
    for ids in prompts:
        sums.add(jacobian.prompt_jacobian(model, adapter, ids, skip=2, dim_batch=16, blocks=blocks))
    return sums


@pytest.fixture(scope="module")
def fitted():
    """A 4-block llama, its whole J-lens and the J-lens of blocks 0 and 2 over the same prompts."""
    model = build("llama", torch.float32).requires_grad_(False)
    adapter = Adapter.discover(model)
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 96, (1, 8), generator=generator) for _ in range(3)]
    whole = _sums_over(model, adapter, prompts, None)
    part = _sums_over(model, adapter, prompts, (0, 2))
    return model, adapter, prompts, whole, part


def test_partial_sums_merge_in_any_order_and_make_a_lens_of_those_blocks(fitted):
    model, adapter, prompts, whole, part = fitted
    halves = [_sums_over(model, adapter, prompts[:1], (0, 2)), _sums_over(model, adapter, prompts[1:], (0, 2))]
    for order in (halves, halves[::-1]):
        merged = jacobian.JacobianSums.zeros(4, D, (0, 2))
        for sums in order:
            merged.merge(sums)
        torch.testing.assert_close(merged.mean(), part.mean(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="cannot merge sums over blocks"):
        jacobian.JacobianSums.zeros(4, D).merge(part)
    lens = part.lens()
    assert lens.blocks == (0, 2) and lens.n_layers == 4 and lens.readable == (0, 2, 3)
    full = whole.lens()
    for block in (0, 2):  # J_l - I at the fitted blocks, equal to the whole fit's to float32 rounding
        torch.testing.assert_close(lens.weight[block], full.weight[block], rtol=1e-5, atol=1e-6)
    assert not lens.weight[1].any() and not lens.weight[3].any() and lens.id != full.id


def test_a_partial_lens_reads_its_blocks_and_refuses_the_others(fitted):
    _, _, _, _, part = fitted
    lens = part.lens()
    hidden = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    expected = hidden[0] + hidden[0] @ lens.weight[2].T
    torch.testing.assert_close(lens.translate((2, 3), hidden)[0], expected)
    torch.testing.assert_close(lens.translate((2, 3), hidden)[1], hidden[1])  # the last block: the identity
    with pytest.raises(lenses.LensError) as caught:
        lens.translate((1, 2), hidden)
    assert "no translator for layers 1;" in str(caught.value) and "\n" not in str(caught.value)
    lenses.check_layers(lens, (0, 2, 3), "lens x")  # within: no error
    with pytest.raises(lenses.LensError, match=r"no translator for layers 1; ask for layers within 0,2-3"):
        lenses.check_layers(lens, range(4), "lens x")


@pytest.mark.parametrize(
    "spec, expected",
    [(None, None), ("all", None), ("0-2", None), ("1-2", (1, 2)), ("-3,-1", (1,)), ("0,2-3", (0, 2))],
)
def test_source_layers_resolve_against_the_depth(spec, expected):
    assert jacobian.source_blocks(spec, 4, "tiny") == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3", "names only the last block (3 of tiny), whose J is the identity: nothing to fit"),
        ("-1", "names only the last block (3 of tiny)"),
        ("4", "layer 4: tiny has 4 layers, 0-3"),
        ("1-9", "layer 9: tiny has 4 layers, 0-3"),
        ("2-1", "runs backwards"),
    ],
)
def test_bad_source_layers_are_one_line_errors(spec, message):
    with pytest.raises(KlstoreError) as caught:
        jacobian.source_blocks(spec, 4, "tiny")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_partial_lens_files_round_trip_both_formats(fitted, tmp_path):
    _, _, _, _, part = fitted
    lens = part.lens(model="tiny")
    folder = lenses.save(lens, tmp_path / "lens")
    back = lenses.load(folder)
    assert back.blocks == (0, 2) and back.id == lens.id and torch.equal(back.weight, lens.weight)
    artifact = torch.load(folder / lenses.JLENS_FILE, weights_only=True)  # TransformerLens's format
    assert artifact["source_layers"] == [0, 2] and sorted(artifact["J"]) == [0, 2]
    assert artifact["metadata"]["target_layer"] == 3  # the model's depth, as TransformerLens's fits record it
    from_artifact = lenses.load(folder / lenses.JLENS_FILE)
    assert from_artifact.blocks == (0, 2) and from_artifact.depth_known and from_artifact.n_layers == 4
    # J = W + I written in float32, W = J - I read back: within 2^-23 on the diagonal (docs/lenses.md)
    torch.testing.assert_close(from_artifact.weight, lens.weight, rtol=0, atol=2**-23)
    assert not from_artifact.weight[1].any() and not from_artifact.weight[3].any()


def test_a_partial_artifact_without_its_depth_is_padded_to_the_model(fitted, tmp_path):
    _, _, _, _, part = fitted
    eye = torch.eye(D)
    four_keys = {
        "J": {0: part.lens().weight[0] + eye, 2: part.lens().weight[2] + eye},
        "n_prompts": 3,
        "source_layers": [0, 2],
        "d_model": D,
    }
    torch.save(four_keys, tmp_path / "partial.pt")
    lens = lenses.load(tmp_path / "partial.pt")
    assert lens.blocks == (0, 2) and not lens.depth_known and lens.n_layers == 4  # max + 2, the least
    deeper = lenses.check_fits(lens, 6, D, None, "lens p")
    assert deeper.n_layers == 6 and deeper.readable == (0, 2, 5) and deeper.id == lens.id
    torch.testing.assert_close(deeper.weight[:4], lens.weight, rtol=0, atol=0)
    assert not deeper.weight[4:].any()
    with pytest.raises(lenses.LensError, match="cannot be saved as a folder"):
        lenses.save(lens, tmp_path / "nowhere")
    # a whole fit (0..k) without its depth stays what it always was: a (k+2)-block lens
    torch.save({**four_keys, "J": {0: eye, 1: eye, 2: eye}, "source_layers": [0, 1, 2]}, tmp_path / "whole.pt")
    whole = lenses.load(tmp_path / "whole.pt")
    assert whole.blocks is None and whole.depth_known and whole.n_layers == 4
    with pytest.raises(lenses.LensError, match="is for a model with 4 layers of width 32"):
        lenses.check_fits(whole, 6, D, None, "lens w")


def test_existing_lens_ids_are_unchanged():
    """The id formula of a whole lens is the one every stored lens carries (pinned here)."""
    weight = torch.arange(4 * 3 * 3, dtype=torch.float32).reshape(4, 3, 3) / 7
    bias = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3) / 3
    import hashlib

    digest = hashlib.sha256(b"klstore-lens-v1\njacobian\n(4, 3, 3)\n")
    for layer in range(4):
        digest.update(weight[layer].numpy().tobytes())
        digest.update(bias[layer].numpy().tobytes())
    assert lenses.content_id("jacobian", weight, bias) == digest.hexdigest()[:16]
    assert lenses.content_id("jacobian", weight, bias, (0, 2)) != digest.hexdigest()[:16]


def test_the_engine_reads_a_partial_lens_at_its_blocks_as_the_whole_lens_there(tmp_path):
    """Through Engine.compute: a lens of blocks 0 and 2 gives, at layers 0, 2 and 3, exactly the
    rows of a whole lens with the same translators there; asked for layer 1, it stops before any
    prompt with the one-line error (also test_lenses.BAD_LENSES)."""
    from tiny_models import ToyTokenizer

    from klstore.core.engine import Engine
    from klstore.core.models import from_objects
    from klstore.run import lenses as run_lenses
    from klstore.spec import ComputeSpec, GenerationSpec, Prompt

    engine = Engine(from_objects("llama", build("llama"), ToyTokenizer()))
    generator = torch.Generator().manual_seed(4)
    whole_weight = torch.randn(4, D, D, generator=generator) * 0.3 / D**0.5
    whole_weight[-1] = 0.0
    part_weight = torch.zeros_like(whole_weight)
    part_weight[[0, 2]] = whole_weight[[0, 2]]
    whole = lenses.AffineLens("jacobian", whole_weight, torch.zeros(4, D))
    part = lenses.AffineLens("jacobian", part_weight, torch.zeros(4, D), blocks=(0, 2))
    prompt = Prompt("p1", "The quick brown fox", group="g")

    def rows(lens, layers):
        folder = lenses.save(lens, tmp_path / lens.id)
        compute = run_lenses.resolve(
            ComputeSpec(["logit_lens"], layers, ("kl", "js"), GenerationSpec(max_new_tokens=3), lens=[str(folder)])
        )
        ((matrix,),) = engine.compute([prompt], compute)
        return matrix

    got, expected = rows(part, "0,2-3"), rows(whole, "0,2-3")
    assert got.layers == (0, 2, 3) and got.lens_id == part.id and got.lens_id != whole.id
    for name in ("kl", "js"):
        np.testing.assert_array_equal(got.values[name], expected.values[name])
    assert (got.values["kl"] >= 0).all() and got.values["kl"][-1].max() < 1e-6  # the last block: the identity
    with pytest.raises(KlstoreError) as caught:
        rows(part, "all")
    assert "no translator for layers 1;" in str(caught.value) and "\n" not in str(caught.value)


def test_a_whole_lens_translates_without_hashing_itself(monkeypatch):
    """translate runs per prompt and per layer batch: only a partial lens checks its layers (the
    check's message names the id, a hash of every parameter)."""
    lens = lenses.AffineLens("jacobian", torch.zeros(4, D, D), torch.zeros(4, D))
    monkeypatch.setattr(lenses, "content_id", lambda *a, **k: pytest.fail("translate hashed the lens"))
    hidden = torch.randn(2, 3, D)
    torch.testing.assert_close(lens.translate((0, 3), hidden), hidden)


def test_a_partial_lens_of_unknown_depth_reads_only_its_blocks_until_padded(tmp_path):
    torch.save({"J": {0: torch.eye(D), 2: torch.eye(D)}, "d_model": D}, tmp_path / "p.pt")
    lens = lenses.load(tmp_path / "p.pt")
    assert lens.readable == (0, 2) and not lens.depth_known
    with pytest.raises(lenses.LensError, match=r"no translator for layers 3 \(the model's last block"):
        lens.translate((3,), torch.randn(1, 2, D))  # block 3 may be an unfitted block of a deeper model
    assert lenses.check_fits(lens, 4, D, None, "lens p").readable == (0, 2, 3)


def test_the_reference_checkpoints_top_level_target_layer_gives_the_depth(tmp_path):
    sums = {20: torch.eye(D) * 2, 21: torch.eye(D) * 2}
    torch.save({"jacobian_sum": sums, "n_done": 2, "target_layer": 27}, tmp_path / "ref.pt")
    lens = lenses.load(tmp_path / "ref.pt")
    assert lens.depth_known and lens.n_layers == 28 and lens.blocks == (20, 21)
    with pytest.raises(lenses.LensError, match="is for a model with 28 layers"):
        lenses.check_fits(lens, 30, D, None, "lens r")


def _artifact(tmp_path, **payload):
    path = tmp_path / "hostile.pt"
    torch.save({"d_model": D, **payload}, path)
    return path


EYE = torch.eye(D)
HOSTILE_ARTIFACTS = {
    "a huge target_layer": (
        {"J": {0: EYE}, "metadata": {"target_layer": 10**12}},
        "target_layer: 1000000000000 is not a block index",
    ),
    "a huge block index": ({"J": {10**12: EYE}}, "J: 1000000000000 is not a block index"),
    "a negative block index": ({"J": {-1: EYE}}, "J: -1 is not a block index"),
    "a block index that is text": ({"J": {"a": EYE}}, "J: 'a' is not a block index"),
    "a block index that is a bool": ({"J": {True: EYE}}, "J: True is not a block index"),
    "a block index that is a float": ({"J": {1.7: EYE}}, "J: 1.7 is not a block index"),
    "one block twice": ({"J": {1: EYE, "1": EYE}}, "J holds block 1 twice"),
    "a matrix that is not a tensor": ({"J": {0: [[1.0]]}}, "J[0] is not a tensor"),
    "J not a dict": ({"J": [EYE]}, "J must be a dict of block -> matrix"),
    "source_layers not a list": ({"J": {0: EYE}, "source_layers": 0}, "source_layers must be a list"),
    "a negative d_model": ({"J": {0: EYE}, "d_model": -2}, "d_model must be a positive integer, got -2"),
    "a bool n_done": ({"jacobian_sum": {0: EYE}, "n_done": True}, "n_done is True: no prompt was fitted"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARTIFACTS))
def test_hostile_artifacts_are_one_line_errors(case, tmp_path):
    payload, message = HOSTILE_ARTIFACTS[case]
    with pytest.raises(lenses.LensError) as caught:
        lenses.load(_artifact(tmp_path, **payload))
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_store_lens_that_lost_its_klstore_json_is_refused(fitted, tmp_path):
    """Without klstore.json a partial lens would read as a whole one (zeros at its unfitted
    blocks: the logit lens): its checksum record says the file belongs there."""
    from klstore.run import lenses as run_lenses
    from klstore.spec import LensSpec
    from klstore.store.tables import open_store

    _, _, _, _, part = fitted
    lens = part.lens()
    store = open_store(str(tmp_path / "store"), create=True)
    run_lenses.put(store, lenses.save(lens, tmp_path / "folder"), lens.id)
    assert run_lenses.resolve_one(LensSpec(source=lens.id), store).id == lens.id
    (tmp_path / "store" / "lens_files" / lens.id / lenses.KLSTORE_FILE).unlink()
    with pytest.raises(KlstoreError, match="klstore.json is missing, but its checksum record is there"):
        run_lenses.resolve_one(LensSpec(source=lens.id), store)
