"""Layer specs: `all`, `0,15-21,27`, `-4--1` -> sorted block indices.

Negative indices count from the end (`-1` is the last block), as in CONVENTIONS.md.
"""

from __future__ import annotations

import re

from klstore.errors import KlstoreError

_INT = r"-?\d+"
_ITEM = re.compile(rf"^({_INT})(?:-({_INT}))?$")


def parse_layers(spec: str, n_layers: int, model_name: str = "the model") -> tuple[int, ...]:
    """Resolve a layer spec against a model with `n_layers` decoder blocks.

    Returns the distinct block indices in increasing order. Raises KlstoreError
    for a malformed spec or a layer the model does not have.
    """
    text = str(spec).strip().replace(" ", "")
    if text.lower() == "all":
        return tuple(range(n_layers))
    if not text:
        raise KlstoreError("empty layer spec: use 'all' or e.g. '0,15-21,27'")
    chosen: set[int] = set()
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise KlstoreError(
                f"malformed layer spec {spec!r}: {item!r} is not a layer or a range "
                "(examples: all, 0,15-21,27, -4--1)"
            )
        start = _resolve(int(match.group(1)), n_layers, model_name)
        end = start if match.group(2) is None else _resolve(int(match.group(2)), n_layers, model_name)
        if end < start:
            raise KlstoreError(f"malformed layer spec {spec!r}: range {item!r} runs backwards")
        chosen.update(range(start, end + 1))
    return tuple(sorted(chosen))


def _resolve(index: int, n_layers: int, model_name: str) -> int:
    resolved = index + n_layers if index < 0 else index
    if not 0 <= resolved < n_layers:
        raise KlstoreError(
            f"layer {index}: {model_name} has {n_layers} layers, 0-{n_layers - 1}"
        )
    return resolved
