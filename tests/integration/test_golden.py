"""The golden runs: fixed SmolLM2 commands must store the very same kl rows, bit for bit.

tests/golden/make_kl_golden.py holds the commands, the queries and the encoding (float32
bit patterns as hex), and regenerates tests/golden/kl_smollm2.json (three divergences: the
row path) and kl_smollm2_head_pass.json (`kl` alone, with lens tokens: the head pass of
klstore/core/unembed.py, the default path); this test reruns each command into a
temporary store and compares. A refactoring may move no number, no row
and no run id; a deliberate change of the numbers regenerates the file in the same commit.
"""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

SCRIPT = Path(__file__).resolve().parents[1] / "golden" / "make_kl_golden.py"


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_kl_golden", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", ["row path", "head pass"])
def test_stored_rows_equal_the_golden_file(tmp_path, path):
    golden = _golden_module()
    command, query, golden_file = golden.RUNS[path]
    expected = json.loads(golden_file.read_text())
    actual = golden.stored_rows(str(tmp_path / "store"), command, query)
    assert len(expected) > 0
    assert {r["run_id"] for r in actual} == {r["run_id"] for r in expected}
    assert len(actual) == len(expected)
    changed = [(want, got) for want, got in zip(expected, actual) if want != got]
    assert not changed, f"{len(changed)} rows differ, e.g. expected {changed[0][0]}, got {changed[0][1]}"
    assert actual == expected
