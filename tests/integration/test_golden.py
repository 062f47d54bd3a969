"""The golden run: a fixed SmolLM2 command must store the very same kl rows, bit for bit.

tests/golden/make_kl_golden.py holds the command, the query and the encoding (float32
bit patterns as hex), and regenerates tests/golden/kl_smollm2.json; this test reruns its
command into a temporary store and compares. A refactoring may move no number, no row
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


def test_stored_rows_equal_the_golden_file(tmp_path):
    golden = _golden_module()
    expected = json.loads(golden.GOLDEN.read_text())
    actual = golden.stored_rows(str(tmp_path / "store"))
    assert len(expected) > 0
    assert {r["run_id"] for r in actual} == {r["run_id"] for r in expected}
    assert len(actual) == len(expected)
    changed = [(want, got) for want, got in zip(expected, actual) if want != got]
    assert not changed, f"{len(changed)} rows differ, e.g. expected {changed[0][0]}, got {changed[0][1]}"
    assert actual == expected
