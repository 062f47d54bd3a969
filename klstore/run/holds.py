"""A test hook of the fits (run/fit.py, run/jacobian_fit.py): stop at a named point."""

from __future__ import annotations

import os
import time

HOLD_VARIABLE = "KLSTORE_TEST_HOLD"  # tests: stop a fit at a named point (`hold`)


def hold(point: str) -> None:
    """For the crash-and-resume tests: when the environment variable KLSTORE_TEST_HOLD names
    `point` (e.g. `tuned-step-4`, `jacobian-shard-2`), the worker stops here, after the
    checkpoint of that point is written, until it is killed. A tiny model's fit finishes within
    a progress poll, so a kill timed from outside would race it; this makes the killed state
    exact. Unset (always, outside those tests) it does nothing."""
    if os.environ.get(HOLD_VARIABLE) == point:
        while True:
            time.sleep(1.0)
