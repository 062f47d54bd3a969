"""Shared fixtures: real offline models are loaded once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import FAMILIES

# Every Ray these tests start on this machine listens on loopback only: Ray's single-node mode
# (klstore.run.runner.SINGLE_NODE_ENV), read when ray is first imported and inherited by the
# node's processes and by the CLI runs the tests start. The multi-node tests run in a private
# network namespace instead (tests/integration/test_multinode.py says why).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """Each supported architecture family, as a tiny random model (tests/tiny_models.py)."""
    return request.param


@pytest.fixture(scope="module")
def engine(family):
    from tiny_models import ToyTokenizer, build

    from klstore.core.engine import Engine
    from klstore.core.models import from_objects

    return Engine(from_objects(family, build(family), ToyTokenizer()))


@pytest.fixture(scope="session")
def smollm2():
    from klstore.core.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    from klstore.core.models import load_model

    return load_model("gemma3-270m", device="cpu")


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m klstore ARGS` as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "klstore", *map(str, args)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (loopback, no dashboard) for the whole test run."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A tiny random Llama saved as a normal HF folder with SmolLM2's tokenizer (loads in < 1 s)."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    config = transformers.LlamaConfig(
        vocab_size=len(smollm2.tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=smollm2.tokenizer.eos_token_id,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket `klbucket`; AWS_* variables point at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="klbucket")
    yield endpoint
    server.stop()


def kill_when_seen(marker: str, delay: float = 0.0, poll: float = 0.05, timeout: float = 120.0):
    """Start a thread that SIGKILLs the first process whose command line contains `marker`
    (a Ray actor's title, e.g. "Worker.run_shard"), `delay` seconds after seeing it.
    Returns (thread, killed pids)."""
    import signal
    import threading
    import time

    import psutil

    killed: list[int] = []

    def killer():
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if marker in " ".join(proc.info["cmdline"] or []):
                    time.sleep(delay)
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
            time.sleep(poll)

    thread = threading.Thread(target=killer)
    thread.start()
    return thread, killed


def stop_processes(markers) -> None:
    """Stop only the processes a test started: those whose command line holds one of the
    markers (a temp dir, a port), and their children; SIGTERM, then SIGKILL after 15 s."""
    import psutil

    procs = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(m in " ".join(p.info["cmdline"] or []) for m in markers)
    ]
    for proc in list(procs):
        try:
            procs += [c for c in proc.children(recursive=True) if c not in procs]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


# Test tiers (pyproject.toml's markers): every test gets the tier of its folder, and
# `acceptance` when it runs a real model end to end or drives the browser, `benchmark_smoke`
# when it runs a benchmark script small. `make test` runs every tier; select one with -m,
# e.g. `make test PYTEST_ARGS="-m 'unit'"` or `-m "not acceptance"`.
_ACCEPTANCE_FILES = ("test_real_models.py", "test_golden.py", "test_report_browser.py", "test_report_layers_browser.py")
_BENCHMARK_FILES = ("test_benchmarks.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path
        item.add_marker(pytest.mark.unit if path.parent.name == "unit" else pytest.mark.integration)
        if path.name in _ACCEPTANCE_FILES:
            item.add_marker(pytest.mark.acceptance)
        if path.name in _BENCHMARK_FILES:
            item.add_marker(pytest.mark.benchmark_smoke)
