"""benchmarks/gpu_check.py runs end to end on a CPU and prints every figure."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.real_model


def test_gpu_check_on_cpu_prints_every_figure():
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--device",
            "cpu",
            "--big",
            "tiny",
            "--prompts",
            "4",
            "--tokens",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for model in ("smollm2-135m", "tiny"):
        agreement = re.search(rf"bf16 vs fp32 \[{model}\]: (\d+) cells, max \|dKL\| ([0-9.e+-]+) nats", text)
        assert agreement and int(agreement.group(1)) > 0 and float(agreement.group(2)) >= 0, text
        mfu = re.search(
            rf"MFU \[{model}, logit_lens, float32\]: ([0-9.]+) GFLOP/s achieved vs ([0-9.]+) "
            r"GFLOP/s plain matmul \((\d+)%",
            text,
        )
        assert mfu and float(mfu.group(1)) > 0 and float(mfu.group(2)) > 0, text
        memory = re.search(
            rf"memory \[{model}\]: peak resident memory \(process\) ([0-9.]+) GiB for a "
            r"([0-9.]+) GiB model",
            text,
        )
        assert memory and float(memory.group(1)) > float(memory.group(2)), text
        speed = re.search(
            rf"throughput \[{model}, logit_lens, cells/s\]: batch 1: (\d+), batch 4: (\d+), "
            r"batch 16: (\d+)",
            text,
        )
        assert speed and all(int(v) > 0 for v in speed.groups()), text
    fit = re.search(  # on a CPU only for the small model (gpu_check.py: SmolLM2's takes minutes there)
        r"lens fit \[tiny\]: tuned-lens training (\d+) tokens/s \(sequences of 64\), "
        r"Jacobian lens ([0-9.e+-]+) prompts/s",
        text,
    )
    assert fit and int(fit.group(1)) > 0 and float(fit.group(2)) > 0, text
    floor = re.search(
        r"noise floor \[smollm2-135m, float32\]: max \|KL\(batch of 16\) - KL\(alone\)\| = "
        r"([0-9.e+-]+) nats",
        text,
    )
    assert floor and 0 <= float(floor.group(1)) < 1e-3, text  # fp32 on CPU: rounding only
    assert "split over devices: skipped (0 CUDA device(s)" in text
    for probe in ("logit_lens", "skip"):
        modes = re.search(
            rf"speed modes \[smollm2-135m, {probe}, float32, default ([0-9.]+) s\]: "
            r"matmul_precision high ([0-9.]+)x, max \|dKL\| ([0-9.e+-]+); "
            r"matmul_precision medium ([0-9.]+)x, max \|dKL\| ([0-9.e+-]+); "
            r"clean_pass cached ([0-9.]+)x, max \|dKL\| ([0-9.e+-]+)",
            text,
        )
        assert modes, text
        assert float(modes.group(3)) == 0  # high is TF32 on NVIDIA GPUs only: the CPU computes as before
        assert 0 < float(modes.group(5)) < 0.1 and float(modes.group(7)) < 1e-4, text
