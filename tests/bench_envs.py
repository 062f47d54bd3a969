"""The reference environments (build/venv-*, built by `make bench-*-env`, which .ci/run runs): their
python, or a skip when one is not built (a failure under CI=true, where .ci/run builds them all)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO


def reference_python(venv: Path, what: str, target: str) -> Path:
    """`venv`'s python; `what` names the environment and `target` the make target that builds it."""
    python = venv / "bin" / "python"
    if python.exists() and (venv / ".installed").exists():
        return python
    problem = f"the {what} environment {venv.relative_to(REPO)} is not built"
    if os.environ.get("CI") == "true":
        pytest.fail(f"these tests need it under CI: {problem}; run `make {target}`")
    pytest.skip(f"{problem} (`make {target}` builds it)")
