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


# ----- ranking a buyer's sample ------------------------------------------------------------
#: ``warm_start: auto`` takes the best match only when its held-out loss is at least this many
#: nats per token below the base's (mean per-batch difference, see :func:`match_sample`).
WARM_START_MARGIN = 0.02
#: how many standard errors below zero the mean difference must lie to be called "confident"
CONFIDENCE_Z = 2.0


@dataclass(frozen=True)
class CandidateLoss:
    """One expert on the sample: ``loss`` alone (base + the adapter, weight 1); ``delta`` the
    mean per-batch loss difference expert - base (negative: the expert fits better) and
    ``delta_stderr`` its standard error (see :func:`match_sample`)."""

    expert_id: str
    loss: float
    delta: float
    delta_stderr: float

    @property
    def confident(self) -> bool:
        """True when the expert beats the base by more than ``CONFIDENCE_Z`` standard errors."""
        return self.delta + CONFIDENCE_Z * self.delta_stderr < 0

    def beats_base(self, margin: float = WARM_START_MARGIN) -> bool:
        return self.delta <= -margin


@dataclass(frozen=True)
class SampleMatch:
    base_loss: float
    candidates: list[CandidateLoss]  # lowest loss first, ties by expert id
    num_blocks: int
    num_batches: int

    def best(self, margin: float = WARM_START_MARGIN) -> CandidateLoss | None:
        """The lowest-loss expert when it beats the base by ``margin``; else None."""
        first = self.candidates[0] if self.candidates else None
        return first if first is not None and first.beats_base(margin) else None


def batch_losses(model: nn.Module, blocks_NT: torch.Tensor, batch_size: int) -> list[float]:
    """Mean next-token cross-entropy of each consecutive batch of ``batch_size`` blocks (the
    last may be smaller) over every predicted position; ``model(ids).logits`` is [B, T, V]."""
    out = []
    with torch.no_grad():
        for start in range(0, blocks_NT.shape[0], batch_size):
            batch = blocks_NT[start : start + batch_size]
            logits = model(batch).logits[:, :-1].float()
            out.append(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
                ).item()
            )
    return out


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean): stderr = s / sqrt(n) with the sample standard
    deviation s (n - 1 in the denominator); 0.0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, (variance / n) ** 0.5


def match_sample(
    base_model: nn.Module,
    experts: Sequence[Expert],
    blocks_NT: torch.Tensor,
    batch_size: int = 4,
) -> SampleMatch:
    """Ranks ``experts`` and reports the base on a sample's blocks, with a per-batch confidence.

    The blocks are cut into consecutive batches b = 1..B of ``batch_size`` blocks. For each
    batch, L_base(b) and L_e(b) are the mean next-token cross-entropy over every predicted
    position of the batch under the base alone and under expert e alone. The expert's
    ``delta`` is mean_b (L_e(b) - L_base(b)) and ``delta_stderr`` the standard error of that
    mean, sd_b(L_e(b) - L_base(b)) / sqrt(B) (sample sd, B - 1; 0 when B = 1): paired per batch,
    so the spread of the text itself cancels. ``loss`` and ``base_loss`` are the batch means.
    """
    if blocks_NT.ndim != 2 or blocks_NT.shape[0] == 0:
        raise ValueError("blocks must be a non-empty [N, T] LongTensor of token ids")
    alone = MixtureModel.from_experts(base_model, experts, top_k=1)
    with alone.forced_route(BASE_ROUTE):
        base = batch_losses(alone, blocks_NT, batch_size)
    candidates = []
    for expert_id in alone.expert_ids:
        with alone.forced_route(expert_id):
            losses = batch_losses(alone, blocks_NT, batch_size)
        delta, stderr = mean_stderr([e - b for e, b in zip(losses, base, strict=True)])
        candidates.append(CandidateLoss(expert_id, sum(losses) / len(losses), delta, stderr))
    candidates.sort(key=lambda c: (c.loss, c.expert_id))
    return SampleMatch(sum(base) / len(base), candidates, int(blocks_NT.shape[0]), len(base))
