"""Shared fixtures: real offline models are loaded once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2():
    from klstore.models import load

    return load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    from klstore.models import load

    return load("gemma3-270m", device="cpu")


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m klstore ARGS` as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "klstore", *map(str, args)], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
