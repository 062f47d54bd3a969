"""The reference environments (build/venv-*, built by `make bench-*-env`, which .ci/run runs): their
python, or a skip when one is not built (a failure under CI=true, where .ci/run builds them all)."""

from __future__ import annotations

import json
import os
import subprocess
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


# One python for every reference command of a model: imports the reference script once and runs
# its main() per command, collecting the JSON line each prints (with its time, `command_s`);
# stops at the first that exits.
_DRIVER = """
import contextlib, importlib, io, json, sys, time
sys.path.insert(0, sys.argv[1])
reference = importlib.import_module(sys.argv[2])
results = []
for argv in json.loads(sys.argv[3]):
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            reference.main(argv)
    except SystemExit as exc:
        print(json.dumps({"failed": argv, "error": str(exc.code), "output": out.getvalue()}))
        sys.exit(1)
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    result["command_s"] = round(time.perf_counter() - start, 2)
    results.append(result)
print(json.dumps(results))
"""


def run_reference(python: Path, script: Path, commands: list[list[str]], timeout: int) -> list[dict]:
    """Run a reference script's (benchmarks/*_ref.py) commands on `python` in one process; their
    JSON results, in order (the test fails with the output when one fails)."""
    proc = subprocess.run(
        [str(python), "-c", _DRIVER, str(script.parent), script.stem, json.dumps(commands)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"{script.name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
