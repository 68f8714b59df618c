"""Merge method ``factors``: A and B averaged separately, with optional Nesterov momentum.

Keeps the commission's rank (cross terms B_i A_j make it inexact); see
:func:`merging.aggregate.outer_step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from merging.aggregate import outer_step
from merging.methods import MergeStep

if TYPE_CHECKING:
    from merging.cycle_merge import MergeConfig

Adapter = dict[str, torch.Tensor]


def merge(
    current: Adapter | None,
    adapter_config: dict,
    candidates: list[Adapter],
    weights: list[float],
    cfg: MergeConfig,
    momentum_state: Adapter | None,
) -> MergeStep:
    merged, momentum = outer_step(
        current, candidates, weights, cfg.outer_lr, momentum_state, cfg.nesterov_momentum
    )
    return MergeStep(merged, dict(adapter_config), momentum)
