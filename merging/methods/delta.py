"""Merge method ``delta``: the outer step on effective LoRA deltas (exact at the stacked rank).

``delta_W' = (1 - lr) * delta_W_current + lr * sum_i w_i delta_W_i``; see
:func:`merging.aggregate.delta_outer_step`. No momentum state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from merging.aggregate import delta_outer_step
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
    merged, merged_config = delta_outer_step(
        current, adapter_config, candidates, adapter_config, weights, cfg.outer_lr
    )
    return MergeStep(merged, merged_config, None)
