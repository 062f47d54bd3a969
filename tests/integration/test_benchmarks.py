"""benchmarks/peers.py and benchmarks/engine.py --roofline run end to end (small) and print every figure.

Speed is not asserted (it is measured by the benchmarks); FLOP counts are, since they do not
depend on the machine: the roofline's lower bound never exceeds the FLOPs torch counts.
"""

import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.real_model

NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)"


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_peers_quick_prints_klstore_and_the_peer_or_says_it_is_missing():
    text = _run("benchmarks/peers.py", "--quick")
    assert "2 prompts x 4 layers x 2 tokens = 16 cells per probe" in text, text
    has_peer = importlib.util.find_spec("nnsight") is not None
    for probe in ("logit_lens", "skip"):
        if has_peer:
            row = re.search(rf"^{probe} +{NUMBER} +{NUMBER} +{NUMBER}x +{NUMBER}$", text, re.M)
            assert row, text
            assert float(row.group(4)) < 1e-2, text  # the two KL matrices agree
        else:
            row = re.search(rf"^{probe} +{NUMBER} +- +- +-$", text, re.M)
            assert row and float(row.group(1)) > 0, text
    if not has_peer:
        assert "nnsight is missing" in text and "make bench" in text, text


@pytest.mark.skipif(
    importlib.util.find_spec("nnsight") is None, reason="without nnsight, the test above already runs klstore alone"
)
def test_peers_without_the_peer_even_when_installed():
    text = _run("benchmarks/peers.py", "--quick", "--no-peer", "--probes", "logit_lens")
    assert re.search(rf"^logit_lens +{NUMBER} +- +- +-$", text, re.M), text


def test_peers_fast_modes_print_time_speedup_and_distance_from_the_default():
    text = _run("benchmarks/peers.py", "--quick", "--no-peer", "--probes", "skip", "--fast")
    for mode, bound in (("cached", 1e-4), ("medium", 5e-2), ("cached+medium", 5e-2)):
        row = re.search(rf"^skip +{re.escape(mode)} +{NUMBER} +{NUMBER}x +- +{NUMBER}$", text, re.M)
        assert row and float(row.group(1)) > 0 and float(row.group(3)) < bound, text


def test_engine_roofline_prints_phases_bounds_and_the_matmul_fraction():
    text = _run("benchmarks/engine.py", "--roofline", "--prompts", "2", "-n", "2", "--repeat", "1")
    assert re.search(rf"plain torch.matmul 2048\^3 \(torch.float32\) {NUMBER} GFLOP/s", text), text
    for probe in ("logit_lens", "skip", "patch"):
        section = text.split(f"\n{probe}: ", 1)[1].split("\n\n", 1)[0]
        for phase in (
            "generation",
            "clean trace",
            "layer sweep",
            "unembedding",
            "divergences",
            "top-1, lens tokens",
            "writing rows",
        ):
            assert re.search(rf"^  {re.escape(phase)} +{NUMBER} +{NUMBER}%", section, re.M), section
        assert re.search(
            r"dominant phase: (generation|clean trace|layer sweep|unembedding|divergences|"
            r"top-1, lens tokens|writing rows) \(",
            section,
        ), section
        assert re.search(rf"end-to-end {NUMBER} s", section), section
        bound = re.search(rf"lower bound \(work the cells require\): {NUMBER} GFLOP", section)
        assert bound and float(bound.group(1)) > 0, section
        achieved = re.search(rf"achieved: {NUMBER} GFLOP/s = {NUMBER}% of the plain matmul rate", section)
        assert achieved and float(achieved.group(1)) > 0, section
        performed = re.search(rf"FLOPs performed \(torch's FlopCounterMode[^)]*\): {NUMBER} G", section)
        assert performed, section
        assert 0 < float(bound.group(1)) <= float(performed.group(1)), section  # a lower bound


def test_lens_fit_quick_prints_the_table_the_targets_and_both_worker_counts():
    text = _run("benchmarks/lens_fit.py", "--quick")  # a tiny random Llama (4 blocks), 256 training tokens
    quality = text.split("\n1. quality", 1)[1].split("\n2. ", 1)[0]
    row = rf" +{NUMBER} +{NUMBER}"
    layers = re.findall(rf"^ +([0-9]+){row * 3}$", quality, re.M)
    assert [int(layer[0]) for layer in layers] == [0, 1, 2, 3], quality
    assert re.search(rf"^ +mean{row * 3}$", quality, re.M), quality
    assert re.search(
        rf"^target: tuned KL <= logit KL \+ 0\.01 nats at every layer: (PASS|FAIL) "
        rf"\(max tuned - logit = [+-]{NUMBER} nats at layer [0-9]+\)$",
        quality,
        re.M,
    ), quality
    assert re.search(
        rf"^target: tuned mean KL over layers 0-1 <= 0\.5 x logit's: (PASS|FAIL) \({NUMBER} vs {NUMBER} nats, "
        rf"ratio {NUMBER}\)$",
        quality,
        re.M,
    ), quality
    speed = text.split("\n2. ", 1)[1].split("\n3. ", 1)[0]
    line = r"^target: klstore's time to tuned-lens's held-out KL <= 0\.33 x tuned-lens's time: "
    if (REPO / "build" / "venv-tunedlens" / ".installed").is_file():
        assert "anchor path: tuned-lens's trainer" in speed, speed
        assert re.search(rf"^tuned-lens: {NUMBER} s in all", speed, re.M), speed
        assert len(re.findall(rf"^ +[0-9]+{row * 4}$", speed, re.M)) == 4, speed  # + tuned-lens's column
        assert re.search(
            rf"{line}(PASS|FAIL) \(({NUMBER} s vs {NUMBER} s, ratio {NUMBER}"
            rf"|klstore did not reach {NUMBER} nats .*)\)$",
            speed,
            re.M,
        ), speed
    else:
        assert re.search(rf"{line}SKIP \(anchor skipped: no tuned-lens environment", speed, re.M), speed
    scale = text.split("\n3. ", 1)[1]
    for workers in (1, 2):
        rate = re.search(rf"^{workers} worker\(s\): {NUMBER} tokens/s", scale, re.M)
        assert rate and float(rate.group(1)) > 0, scale
    assert re.search(rf"^2 workers vs 1: {NUMBER}x", scale, re.M), scale


def test_jlens_fit_quick_prints_both_fits_their_error_memory_and_both_worker_counts():
    text = _run("benchmarks/jlens_fit.py", "--quick")  # a tiny random Llama, 2 prompts of 24 tokens
    speed = text.split("\n1. speed", 1)[1].split("\n2. ", 1)[0]
    assert re.search(rf"^klstore: +{NUMBER} s", speed, re.M), speed
    if (REPO / "build" / "venv-tlens" / ".installed").is_file():
        assert re.search(rf"^TransformerLens: +{NUMBER} s", speed, re.M), speed
        error = re.search(rf"per source block, largest {NUMBER} at block [0-9]+", speed)
        assert error and float(error.group(1)) < 1e-5, speed  # the same lens (float32 rounding)
        assert re.search(rf"^(PASS|FAIL): klstore's fit no slower than TransformerLens's \({NUMBER}x", speed, re.M)
    else:
        assert "anchor skipped: no TransformerLens environment" in speed, speed
    memory = text.split("\n2. ", 1)[1].split("\n3. ", 1)[0]
    rows = re.findall(rf"^ +([0-9]+){rf' +{NUMBER}' * 5}$", memory, re.M)
    assert [int(r[0]) for r in rows] == [1, 8, 32], memory
    assert all(float(r[3]) >= float(r[2]) > 0 for r in rows), memory  # peak >= resident after the load
    scale, subset = text.split("\n3. ", 1)[1].split("\n4. subset", 1)
    ratio = re.search(rf"^every block: +{NUMBER} s +blocks 2: +{NUMBER} s \({NUMBER}x\)", subset, re.M)
    assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(3)) > 0, subset
    same = re.search(rf"at the same blocks: {NUMBER}", subset)
    assert same and float(same.group(1)) < 1e-12, subset  # the same rows
    for workers in (1, 2):
        rate = re.search(rf"^{workers} worker\(s\): {NUMBER} prompts/s", scale, re.M)
        assert rate and float(rate.group(1)) > 0, scale
