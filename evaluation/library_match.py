"""Library match: which library experts fit a held-out sample best, next to the mixture and base.

Loss everywhere is the mean next-token cross-entropy over every predicted position of the
held-out blocks (see :meth:`factory.mixture.MixtureModel.lm_loss`). An expert "alone" is the
base model plus that one adapter with weight 1 (the mixture's forced route), which equals PEFT's
own output for the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from factory.expert import Expert
from factory.mixture import BASE_ROUTE, MixtureModel


@dataclass(frozen=True)
class LibraryMatch:
    ranking: list[tuple[str, float]]  # (expert_id, loss), lowest loss (nearest expert) first
    mixture_loss: float
    base_loss: float


def library_match(
    base_model: nn.Module,
    experts: Sequence[Expert],
    mixture: MixtureModel,
    heldout_blocks: torch.Tensor,
) -> LibraryMatch:
    """Ranks ``experts`` by their loss alone on ``heldout_blocks`` (ties by expert id)."""
    if heldout_blocks.ndim != 2 or heldout_blocks.shape[0] == 0:
        raise ValueError("heldout_blocks must be a non-empty [N, T] LongTensor of token ids")
    alone = MixtureModel.from_experts(base_model, experts, top_k=1)
    losses = []
    for expert_id in alone.expert_ids:
        with alone.forced_route(expert_id):
            losses.append((expert_id, alone.lm_loss(heldout_blocks)))
    with alone.forced_route(BASE_ROUTE):
        base_loss = alone.lm_loss(heldout_blocks)
    ranking = sorted(losses, key=lambda item: (item[1], item[0]))
    return LibraryMatch(ranking, mixture.lm_loss(heldout_blocks), base_loss)
