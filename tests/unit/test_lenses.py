"""Trained lenses (klstore.core.lenses): the read-out through a tuned lens against an independent
float64 computation on every tiny family, the tuned-lens file indexing at the first and the last
block, ids, identities, old stores, and every kind of bad lens as a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from reference import reference_matrices
from tiny_models import ToyTokenizer, build

from klstore.core import lenses
from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.errors import KlstoreError
from klstore.run import lenses as run_lenses
from klstore.spec import ComputeSpec, GenerationSpec, LensSpec, Prompt
from klstore.store import views
from klstore.store.tables import KL_SCHEMA, open_store

PROMPT = Prompt("p1", "The quick brown fox", group="g")
DIVS = ("kl", "kl_reverse", "js")


def random_lens(n_layers: int, d_model: int, seed: int = 0, scale: float = 0.3) -> lenses.AffineLens:
    """Translators with visible effect; the last block's is zero (the identity), as in every lens."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_layers, d_model, d_model, generator=generator) * scale / d_model**0.5
    bias = torch.randn(n_layers, d_model, generator=generator) * scale
    weight[-1], bias[-1] = 0.0, 0.0
    return lenses.AffineLens("tuned", weight, bias)


def _close(actual, expected):
    expected = np.asarray(expected, dtype=np.float64)
    excess = np.abs(actual - expected) - 1e-4 * np.maximum(1.0, np.abs(expected))
    assert (excess <= 0).all(), f"max excess {excess.max():.3g}"


def test_tuned_readout_matches_float64_reference(family, engine, tmp_path):
    lens = random_lens(engine.n_layers, engine.hidden_size, seed=3)
    folder = lenses.save(lens, tmp_path / "lens")
    compute = run_lenses.resolve(
        ComputeSpec(["logit_lens", "skip"], "all", DIVS, GenerationSpec(max_new_tokens=4), lens=["logit", str(folder)])
    )
    (matrices,) = engine.compute([PROMPT], compute)
    by_probe = {m.probe: m for m in matrices}
    assert list(by_probe) == ["logit_lens", "tuned_lens", "skip"]
    tuned, logit = by_probe["tuned_lens"], by_probe["logit_lens"]
    assert (tuned.lens, tuned.lens_id) == ("tuned", lens.id)
    assert (logit.lens, logit.lens_id) == ("logit", "logit") and (by_probe["skip"].lens, by_probe["skip"].lens_id) == (
        "logit",
        "logit",
    )
    gen = tuned.generation
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    expected, _ = reference_matrices(
        build(family, torch.float64),
        sequence,
        len(gen.prompt_ids),
        gen.n,
        "tuned_lens",
        tuned.layers,
        params={"weight": lens.weight, "bias": lens.bias},
    )
    for name in DIVS:
        _close(tuned.values[name], expected[name].numpy())
    # the translators move every block but the last, whose row is the logit lens's exactly
    assert (np.abs(tuned.values["kl"][:-1] - logit.values["kl"][:-1]) > 1e-3).all()
    np.testing.assert_array_equal(tuned.values["kl"][-1], logit.values["kl"][-1])


def _tuned_lens_folder(tmp_path, n_layers: int, d_model: int, state: dict, **config) -> str:
    """A lens folder as the tuned-lens package writes it (state-dict keys '<translator>.<param>')."""
    folder = tmp_path / "tl"
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "params.pt")
    base = {"d_model": d_model, "num_hidden_layers": n_layers, "bias": True, "lens_type": "linear_tuned_lens"}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return str(folder)


def test_tuned_lens_indexing_first_and_last_block(tmp_path):
    """Translator i of a tuned-lens file reads hidden_states[i]: block i-1's output. So block 0
    uses translator 1, block L-2 translator L-1, and block L-1 is the identity; translator 0
    (the embeddings) is never read, and klstore writes it as zeros."""
    n, d = 4, 3
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = torch.full((d, d), float(i + 1))
        state[f"{i}.bias"] = torch.full((d,), 10.0 * (i + 1))
    lens = lenses.load(_tuned_lens_folder(tmp_path, n, d, state))
    assert lens.kind == "tuned" and lens.weight.shape == (n, d, d)
    for block in range(n - 1):
        assert torch.equal(lens.weight[block], state[f"{block + 1}.weight"])
        assert torch.equal(lens.bias[block], state[f"{block + 1}.bias"])
    assert not lens.weight[n - 1].any() and not lens.bias[n - 1].any()
    h = torch.randn(2, 5, d)
    assert torch.equal(lens.translate((n - 1, n - 1), h), h)  # the last block: identity, bit for bit
    first = lens.translate((0,), h[:1])
    torch.testing.assert_close(first, h[:1] + h[:1] @ state["1.weight"].T + state["1.bias"])
    written = torch.load(lenses.save(lens, tmp_path / "out") / "params.pt", weights_only=True)
    assert not written["0.weight"].any() and not written["0.bias"].any()
    assert all(torch.equal(written[f"{i}.weight"], state[f"{i}.weight"]) for i in range(1, n))


def test_lens_id_is_the_content_not_the_path(tmp_path):
    lens = random_lens(4, 8, seed=1)
    a = lenses.load(lenses.save(lens, tmp_path / "a"))
    b = lenses.load(lenses.save(a, tmp_path / "b" / "deeper"))
    assert a.id == b.id == lens.id and len(lens.id) == 16
    assert random_lens(4, 8, seed=2).id != lens.id
    moved = lenses.AffineLens("tuned", lens.weight.clone(), lens.bias.clone())
    moved.bias[0, 0] += 1e-3
    assert moved.id != lens.id


def test_run_identity_records_lens_ids_never_paths(tmp_path):
    lens = random_lens(4, 8, seed=1)
    a, b = lenses.save(lens, tmp_path / "a"), lenses.save(lens, tmp_path / "b")
    first = run_lenses.resolve(ComputeSpec(lens=["logit", str(a)])).identity()
    second = run_lenses.resolve(ComputeSpec(lens=["logit", str(b)])).identity()
    assert first == second and first["lens"] == [{"kind": "logit", "id": "logit"}, {"kind": "tuned", "id": lens.id}]
    assert "lens" not in ComputeSpec(lens="logit").identity()  # every run id from before lenses stays valid
    assert str(tmp_path) not in json.dumps(first)


def test_a_lens_in_the_store_by_id(tmp_path):
    store = open_store(str(tmp_path / "store"), create=True)
    lens = random_lens(4, 8, seed=5)
    run_lenses.put(store, lenses.save(lens, tmp_path / "written"), lens.id)
    resolved = run_lenses.resolve_one(LensSpec.of(lens.id), store)
    assert (resolved.kind, resolved.id) == ("tuned", lens.id)
    assert torch.equal(lenses.load(resolved.source).weight, lens.weight)
    # a damaged file in the store is named, never read as a lens
    params = tmp_path / "store" / "lens_files" / lens.id / "params.pt"
    params.write_bytes(params.read_bytes()[:-1] + b"x")
    with pytest.raises(KlstoreError, match="params.pt: checksum mismatch"):
        run_lenses.resolve_one(LensSpec.of(lens.id), store)


def test_stores_from_before_lenses_read_as_logit(tmp_path):
    store = tmp_path / "store"
    old_schema = pa.schema([f for f in KL_SCHEMA if f.name not in ("lens", "lens_id")])
    folder = store / "kl" / "model=m" / "probe=logit_lens" / "run_id=r"
    folder.mkdir(parents=True)
    row = {f.name: [None] for f in old_schema}
    row.update(prompt_id=["p"], prompt_group=["g"], layer=[0], gen_idx=[0], kl=[0.5])
    pq.write_table(pa.table(row, schema=old_schema), folder / "part-a.parquet")
    _, rows = views.sql(str(store), "SELECT probe, lens, lens_id, kl FROM kl")
    assert rows == [("logit_lens", "logit", "logit", 0.5)]


@pytest.fixture(scope="module")
def llama():
    return Engine(from_objects("llama", build("llama"), ToyTokenizer()))


def _write(tmp_path, lens, **config_changes):
    folder = lenses.save(lens, tmp_path / "bad")
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def _truncated(tmp_path, lens):
    folder = _write(tmp_path, lens)
    data = (folder / "params.pt").read_bytes()
    (folder / "params.pt").write_bytes(data[: len(data) // 2])
    return folder


def _no_translator(tmp_path, lens):
    folder = _write(tmp_path, lens)
    state = torch.load(folder / "params.pt", weights_only=True)
    del state["2.weight"]
    torch.save(state, folder / "params.pt")
    return folder


def _not_json(tmp_path, lens):
    folder = _write(tmp_path, lens)
    (folder / "config.json").write_text("{not json")
    return folder


def _non_finite(tmp_path, lens):
    weight = lens.weight.clone()
    weight[1, 0, 0] = float("nan")
    return _write(tmp_path, lenses.AffineLens("tuned", weight, lens.bias))


def _jlens(tmp_path, n_blocks=4, d=32, truncate=False, **changes):
    generator = torch.Generator().manual_seed(9)
    payload = {
        "J": {l: torch.randn(d, d, generator=generator).half() for l in range(n_blocks - 1)},
        "n_prompts": 3,
        "source_layers": list(range(n_blocks - 1)),
        "d_model": d,
        **changes,
    }
    path = tmp_path / "lens.pt"
    torch.save(payload, path)
    if truncate:
        path.write_bytes(path.read_bytes()[:100])
    return path


def _not_jlens(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"something": torch.zeros(3)}, path)
    return path


BAD_LENSES = {
    "another depth": (lambda p, lens: _write(p, random_lens(6, 32)), "is for a model with 6 layers of width 32"),
    "another width": (lambda p, lens: _write(p, random_lens(4, 16)), "is for a model with 4 layers of width 16"),
    "another unembedding": (
        lambda p, lens: _write(p, lens, unembed_hash="0" * 64),
        "was fitted on another model",
    ),
    "truncated params.pt": (_truncated, "params.pt is truncated or not a torch file"),
    "a missing translator": (_no_translator, "params.pt has no 2.weight"),
    "config.json not JSON": (_not_json, "config.json is not valid JSON"),
    "non-finite values": (_non_finite, "params.pt holds non-finite values"),
    "no such path": (lambda p, lens: p / "nowhere", "no such file or folder"),
    "an id not in the store": (lambda p, lens: "0123456789abcdef", "lens 0123456789abcdef is not in the store"),
    "a J-lens for another depth": (lambda p, lens: _jlens(p, n_blocks=6), "is for a model with 6 layers of width 32"),
    "a J-lens for another width": (lambda p, lens: _jlens(p, d=16), "is for a model with 4 layers of width 16"),
    "a truncated J-lens artifact": (lambda p, lens: _jlens(p, truncate=True), "not a readable J-lens artifact"),
    "a partial J-lens read at a block it lacks": (  # the run asks for every layer (1 is not fitted)
        lambda p, lens: _jlens(p, J={0: torch.eye(32), 2: torch.eye(32)}, source_layers=[0, 2]),
        "is fitted at blocks 0,2 only (it reads the last, 3, as the identity): no translator for layers 1;",
    ),
    "a partial J-lens fitted beyond the model": (
        lambda p, lens: _jlens(p, J={0: torch.eye(32), 4: torch.eye(32)}, source_layers=[0, 4]),
        "is fitted at block 4; this model has 4 layers, whose source blocks are 0-2",
    ),
    "a J-lens whose target layer is not above its sources": (
        lambda p, lens: _jlens(p, metadata={"target_layer": 2}),
        "metadata target_layer 2 is not above source layer 2",
    ),
    "a .pt that is not a J-lens": (lambda p, lens: _not_jlens(p), "not a J-lens"),
}


def test_jlens_artifacts_round_trip_and_read_the_reference_format(tmp_path):
    path = _jlens(tmp_path)
    lens = lenses.load(path)
    state = torch.load(path, weights_only=True)
    assert lens.kind == "jacobian" and lens.n_layers == 4 and not lens.bias.any() and not lens.weight[-1].any()
    for layer in range(3):  # float16 values, read exactly
        assert torch.equal(lens.weight[layer] + torch.eye(32), state["J"][layer].float())
    written = lenses.save_jlens(lens, tmp_path / "again.pt", n_prompts=3)
    back = torch.load(written, weights_only=True)
    assert back["source_layers"] == [0, 1, 2] and back["d_model"] == 32 and back["n_prompts"] == 3
    assert all(back["J"][l].dtype == torch.float32 for l in range(3))
    assert lenses.load(written).id == lens.id
    # the reference implementation's checkpoint: sums and a prompt count
    sums = {l: state["J"][l].float() * 4 for l in range(3)}
    torch.save({"jacobian_sum": sums, "n_done": 4}, tmp_path / "ref.pt")
    torch.testing.assert_close(lenses.load(tmp_path / "ref.pt").weight, lens.weight)
    # a klstore J-lens folder carries the TransformerLens artifact too
    folder = lenses.save(lens, tmp_path / "folder", base_model="tiny")
    assert lenses.load(folder).id == lens.id == lenses.load(folder / "jlens.pt").id


@pytest.mark.parametrize("case", list(BAD_LENSES))
def test_bad_lenses_are_one_line_errors(case, llama, tmp_path):
    make, message = BAD_LENSES[case]
    source = make(tmp_path, random_lens(4, 32))
    store = open_store(str(tmp_path / "store"), create=True)
    with pytest.raises(KlstoreError) as caught:
        compute = run_lenses.resolve(ComputeSpec(lens=["logit", str(source)]), store)
        llama.compute([PROMPT], compute)
    assert message in str(caught.value) and "\n" not in str(caught.value)
