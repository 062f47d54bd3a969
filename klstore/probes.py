"""Probes: what replaces the clean model's distribution at layer l (CONVENTIONS.md §5).

A probe is either a *read-out* (logit_lens: decode block l's output, no extra
forward pass) or an *intervention* (everything else): it says what block l's
output becomes, given the block, its clean input and its clean output, and the
model's output distribution after that change is Q. The engine runs every
intervention through one shared layer sweep (engine.py), so a probe only has to
describe its change to one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from klstore.errors import KlstoreError

PROBES = ("logit_lens", "skip")


@dataclass(frozen=True)
class ProbeSpec:
    """A probe name plus its parameters (e.g. noise scale and seed)."""

    name: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in PROBES:
            raise KlstoreError(f"unknown probe {self.name!r}: choose from {', '.join(PROBES)}")

    @property
    def is_readout(self) -> bool:
        return self.name == "logit_lens"


@dataclass
class BlockSite:
    """What an intervention sees at block `layer` for the rows it acts on.

    hidden_in:  (R, T, H) the block's clean input (everything below is clean)
    clean_out:  (R, T, H) the block's clean output
    run:        computes the block on given inputs: (R, T, H) -> (R, T, H)
    """

    layer: int
    hidden_in: torch.Tensor
    clean_out: torch.Tensor
    run: Callable[[torch.Tensor], torch.Tensor]


def intervene(spec: ProbeSpec, site: BlockSite) -> torch.Tensor:
    """Block `site.layer`'s output under the probe. Returns (R, T, H)."""
    if spec.name == "skip":
        return site.hidden_in  # the block is bypassed: output := input
    raise KlstoreError(f"probe {spec.name!r} is not an intervention")
