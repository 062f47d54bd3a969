"""klstore's trained lenses against the reference package, tuned-lens 0.2.0 (Belrose et al.).

tuned-lens runs in its own environment (`make bench-tunedlens-env` builds build/venv-tunedlens;
.ci/run builds it), driven through benchmarks/tunedlens_ref.py, which never imports klstore.
For each model (a tiny random Llama, and SmolLM2-135M's dequantized folder) one bench process
runs every reference command in turn (each start of that python costs seconds):

- a lens built and saved by tuned-lens's own code (`make`) loads in klstore and decodes, at
  klstore blocks 0, a middle one and L-2, to the logits tuned-lens's `lens(h, l + 1)` gives;
- the indexing at both ends: klstore block l's output is Hugging Face's `hidden_states[l + 1]`
  and is served by translator l + 1 (translator 0, the embeddings', would give other logits);
  block L-1 has no translator, and klstore's read-out there is the model's own logits;
- a lens klstore writes loads in tuned-lens with the unembedding hash klstore wrote accepted
  (`--require-hash-match`) and decodes to klstore's logits; its translator 0 is zeros;
- `lenses.unembed_hash` is tuned-lens's hash of the model's unembedding.

Where build/venv-tunedlens is absent these tests skip, except under CI (CI=true), where they
fail and say to run `make bench-tunedlens-env`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bench_envs import reference_python, run_reference
from conftest import REPO

from klstore.core import lenses
from klstore.core.adapter import Adapter

pytestmark = pytest.mark.real_model  # SmolLM2

TUNEDLENS_VENV = REPO / "build" / "venv-tunedlens"
REF_SCRIPT = REPO / "benchmarks" / "tunedlens_ref.py"
# float32 rounding: the two sides add h + W h + b and reduce the dot products in different
# orders (and, for hidden states, run different transformers versions), so logits agree to a
# few units in the last place of their largest magnitude, not bit for bit.
RTOL = 1e-5


def _reference_python() -> Path:
    return reference_python(TUNEDLENS_VENV, "tuned-lens reference", "bench-tunedlens-env")


def _run_reference(python: Path, commands: list[list[str]]) -> list[dict]:
    """Run tunedlens_ref.py's commands in one process; their JSON results, in order."""
    return run_reference(python, REF_SCRIPT, commands, timeout=600)


def _max_diff(mine: torch.Tensor, ref: torch.Tensor) -> float:
    assert mine.shape == ref.shape, (mine.shape, ref.shape)
    return (mine.float() - ref.float()).abs().max().item()


def _assert_close(mine: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """|mine - ref| <= RTOL * max(1, max |ref|) everywhere; returns the max difference."""
    diff = _max_diff(mine, ref)
    tol = RTOL * max(1.0, ref.abs().max().item())
    assert diff <= tol, f"{what}: max |difference| {diff:.3g} > {tol:.3g}"
    return diff


def _assert_same_states(mine: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """Hidden states, element by element: |mine - ref| <= RTOL * (1 + |ref|) (massive
    activations would make a tolerance scaled by the largest one blind to the rest)."""
    assert mine.shape == ref.shape, (mine.shape, ref.shape)
    excess = (mine.float() - ref.float()).abs() - RTOL * (1 + ref.float().abs())
    assert excess.max().item() <= 0, f"{what}: differs by up to {_max_diff(mine, ref):.3g}"
    return _max_diff(mine, ref)


# ------------------------------------------------------------------ the models
def _folder_for_transformers4(source: Path, folder: Path) -> None:
    """`folder`: the model folder `source` (written by transformers 5) as the reference env's
    transformers 4.57 reads it right. Weights are linked; config.json gets `rope_theta` beside
    5.x's `rope_parameters` (4.57 reads only the former, and would silently use its default
    10000: SmolLM2's is 100000), and tokenizer_config.json PreTrainedTokenizerFast for 5.x's
    TokenizersBackend. The source folder (e.g. klstore's model cache) is never written."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.name == "config.json":
            config = json.loads(path.read_text())
            rope = config.get("rope_parameters") or {}
            assert rope.get("rope_type", "default") == "default", f"{source}: rope {rope} needs more than rope_theta"
            if "rope_theta" in rope:
                config.setdefault("rope_theta", rope["rope_theta"])
            (folder / path.name).write_text(json.dumps(config))
        elif path.name == "tokenizer_config.json":
            config = json.loads(path.read_text())
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            (folder / path.name).write_text(json.dumps(config))
        else:
            (folder / path.name).symlink_to(path.resolve())


def _tiny_llama(folder: Path):
    """A tiny random Llama (6 blocks, untied head, SmolLM2's rope base) saved as an HF folder."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,  # attention far from uniform, so positions (and rope) matter
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(folder.with_name("tiny-llama-hf"))
    _folder_for_transformers4(folder.with_name("tiny-llama-hf"), folder)
    return model, list(range(3, 240, 23))


def _smollm2(smollm2, folder: Path):
    """SmolLM2-135M (float32) and its dequantized cache folder, as the reference env reads it."""
    from klstore.core.models import _gguf_cache_folder, resolve

    cache = _gguf_cache_folder(resolve("smollm2-135m"))
    assert (cache / "config.json").exists(), f"no dequantized SmolLM2 in {cache}"
    _folder_for_transformers4(cache, folder)
    assert smollm2.dtype == torch.float32
    ids = smollm2.tokenizer("The capital of France is Paris, and the quick brown fox jumps").input_ids
    return smollm2.model, ids


@dataclass
class Case:
    """One model, klstore's view of it, and what the reference commands wrote."""

    name: str
    model: object
    adapter: Adapter
    ids: list[int]
    blocks: tuple[int, ...]  # klstore blocks compared: 0, a middle one, L-2
    block_out: list[torch.Tensor]  # klstore block l's output, (n, d), for every l
    own_logits: torch.Tensor  # the model's own forward, (n, vocab)
    mine: lenses.AffineLens  # klstore's random lens
    mine_dir: Path  # where klstore saved it
    tuned_dir: Path  # the lens tuned-lens's `make` wrote
    results: dict  # command -> its JSON line
    ref_hidden: dict  # tuned-lens `hidden`: {idx: (n, d)}, idx 0..L
    ref_tuned: dict  # tuned-lens `logits` of its own lens: {idx: (n, vocab)}
    ref_mine: dict  # tuned-lens `logits` of klstore's lens
    ref_logit_lens: dict  # tuned-lens `logit-lens`

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers


MODELS = {"tiny-llama": 0.05, "smollm2-135m": 0.02}  # model -> std of every random lens parameter


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory) -> Case:
    python = _reference_python()
    name, std = request.param, MODELS[request.param]
    work = tmp_path_factory.mktemp(f"tunedlens-{name}")
    if name == "tiny-llama":
        model, ids = _tiny_llama(work / "model")
    else:
        model, ids = _smollm2(request.getfixturevalue("smollm2"), work / "model")
    adapter = Adapter.discover(model)
    n_layers = adapter.n_layers
    blocks = (0, n_layers // 2, n_layers - 2)

    captured: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for block in adapter.blocks
    ]
    try:
        with torch.no_grad():
            own_logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        for hook in hooks:
            hook.remove()
    block_out = [h[0].float() for h in captured]
    assert len(block_out) == n_layers

    # klstore's lens: random translators for blocks 0..L-2, the identity at L-1
    d = block_out[0].shape[-1]
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(n_layers, d, d, generator=gen) * std
    bias = torch.randn(n_layers, d, generator=gen) * std
    weight[-1], bias[-1] = 0, 0
    mine = lenses.AffineLens("tuned", weight, bias, unembed_hash=lenses.unembed_hash(model))
    lenses.save(mine, work / "mine", base_model=name)

    # translator l+1 on block l's output; translator 0 on block 0's output (which it must not serve)
    hidden = {0: block_out[0], **{l + 1: block_out[l] for l in blocks}}
    torch.save(hidden, work / "hidden.pt")
    model_dir, tuned_dir = str(work / "model"), work / "tuned"
    commands = {
        "unembed-hash": ["unembed-hash", model_dir],
        "hidden": ["hidden", model_dir, str(work / "ref_hidden.pt"), "--ids", ",".join(map(str, ids))],
        "make": ["make", model_dir, str(tuned_dir), "--seed", "0", "--std", str(std)],
        "logits-tuned": ["logits", model_dir, str(tuned_dir), str(work / "hidden.pt"), str(work / "ref_tuned.pt")],
        "logits-mine": [
            *["logits", model_dir, str(work / "mine"), str(work / "hidden.pt"), str(work / "ref_mine.pt")],
            "--require-hash-match",
        ],
        "logit-lens": ["logit-lens", model_dir, str(work / "hidden.pt"), str(work / "ref_logit_lens.pt")],
    }
    results = dict(zip(commands, _run_reference(python, list(commands.values())), strict=True))

    def read(file: str) -> dict:
        return {int(k): v for k, v in torch.load(work / file, weights_only=True).items()}

    return Case(
        name=name,
        model=model,
        adapter=adapter,
        ids=ids,
        blocks=blocks,
        block_out=block_out,
        own_logits=own_logits,
        mine=mine,
        mine_dir=work / "mine",
        tuned_dir=tuned_dir,
        results=results,
        ref_hidden=read("ref_hidden.pt"),
        ref_tuned=read("ref_tuned.pt"),
        ref_mine=read("ref_mine.pt"),
        ref_logit_lens=read("ref_logit_lens.pt"),
    )


def _readout(case: Case, lens: lenses.AffineLens, blocks) -> torch.Tensor:
    """klstore's read-out of block outputs through `lens`: (len(blocks), n, vocab)."""
    hidden = torch.stack([case.block_out[l] for l in blocks])
    with torch.no_grad():
        return case.adapter.logits(lens.translate(tuple(blocks), hidden))


# ------------------------------------------------------------------ the tests
def test_lens_made_by_tuned_lens_loads_and_gives_its_logits(case):
    assert case.results["make"]["translators"] == case.n_layers
    lens = lenses.load(case.tuned_dir)
    assert (lens.kind, lens.n_layers, lens.d_model) == ("tuned", case.n_layers, case.block_out[0].shape[-1])
    mine = _readout(case, lens, case.blocks)
    with torch.no_grad():
        logit_lens = case.adapter.logits(torch.stack([case.block_out[l] for l in case.blocks]))
    for row, block in enumerate(case.blocks):
        ref = case.ref_tuned[block + 1]
        _assert_close(mine[row], ref, f"{case.name} block {block}: klstore vs tuned-lens lens(h, {block + 1})")
        moved = _max_diff(ref, logit_lens[row])
        assert moved > 1e3 * RTOL * max(1.0, ref.abs().max().item()), (
            f"{case.name} block {block}: the lens barely moves the logits ({moved:.3g}); the check is too weak"
        )


def test_logit_lens_matches_tuned_lens(case):
    for idx, h in case.ref_logit_lens.items():
        block = max(idx - 1, 0)  # hidden.pt's entry idx holds block idx-1's output (0: block 0's)
        with torch.no_grad():
            _assert_close(case.adapter.logits(case.block_out[block]), h, f"{case.name} logit lens at idx {idx}")


def test_indexing_at_the_first_and_last_block(case):
    n_layers = case.n_layers
    # Hugging Face's hidden_states (tuned-lens's translator indices): idx l+1 is klstore block l's output
    assert sorted(case.ref_hidden) == list(range(n_layers + 1))
    with torch.no_grad():
        embeddings = case.model.get_input_embeddings()(torch.tensor(case.ids)).float()
    _assert_same_states(embeddings, case.ref_hidden[0], f"{case.name}: hidden idx 0 is the embeddings")
    for block in range(n_layers - 1):
        what = f"{case.name}: block {block} vs hidden idx {block + 1}"
        _assert_same_states(case.block_out[block], case.ref_hidden[block + 1], what)
    # ... except the last, which Llama hands out after the final norm
    with torch.no_grad():
        last = case.block_out[n_layers - 1]
        _assert_same_states(case.adapter.final_norm(last), case.ref_hidden[n_layers], f"{case.name}: normed idx L")

    # block 0 is served by translator 1: translator 0 (the embeddings') on the same states differs
    lens = lenses.load(case.tuned_dir)
    first = _readout(case, lens, (0,))[0]
    _assert_close(first, case.ref_tuned[1], f"{case.name}: block 0 vs translator 1")
    wrong = _max_diff(first, case.ref_tuned[0])
    assert wrong > 1e3 * RTOL * max(1.0, first.abs().max().item()), f"translator 0 gives block 0's logits too ({wrong})"

    # block L-1 has no translator: identity in klstore, and its read-out is the model's own logits
    assert case.results["make"]["translators"] == n_layers  # tuned-lens's translators: idx 0..L-1
    assert not lens.weight[n_layers - 1].any() and not lens.bias[n_layers - 1].any()
    assert lens.weight[n_layers - 2].any()  # translator L-1 (block L-2's) was loaded, not dropped
    readout = _readout(case, lens, (n_layers - 1,))[0]
    _assert_close(readout, case.own_logits, f"{case.name}: block L-1 read-out vs the model's logits")
    with torch.no_grad():
        from_ref = case.model.get_output_embeddings()(case.ref_hidden[n_layers]).float()
    _assert_close(readout, from_ref, f"{case.name}: block L-1 read-out vs head(hidden idx L)")


def test_lens_written_by_klstore_loads_in_tuned_lens(case):
    result = case.results["logits-mine"]
    assert result["hash_match"] is True, result  # --require-hash-match also exits on a mismatch
    assert result["unembed_hash_lens"] == case.mine.unembed_hash
    assert lenses.load(case.mine_dir).id == case.mine.id
    mine = _readout(case, case.mine, case.blocks)
    with torch.no_grad():
        logit_lens = case.adapter.logits(torch.stack([case.block_out[l] for l in case.blocks]))
    for row, block in enumerate(case.blocks):
        ref = case.ref_mine[block + 1]
        _assert_close(mine[row], ref, f"{case.name} block {block}: tuned-lens lens(h, {block + 1}) of klstore's lens")
        assert _max_diff(ref, logit_lens[row]) > 1e3 * RTOL * max(1.0, ref.abs().max().item())
    # translator 0, which klstore writes as zeros, is the logit lens in tuned-lens
    _assert_close(case.ref_mine[0], logit_lens[0], f"{case.name}: klstore's translator 0 is zeros")


def test_unembed_hash_is_tuned_lens_hash(case):
    ours = lenses.unembed_hash(case.model)
    assert ours == case.results["unembed-hash"]["unembed_hash"]
    assert ours == case.results["make"]["unembed_hash"] == lenses.load(case.tuned_dir).unembed_hash
