"""One cycle's evaluate-and-merge: gate -> Proof-of-Loss -> score-weighted outer step -> shares.

:func:`merge_cycle` reads top to bottom:

1. gate every candidate (:func:`evaluation.gate.screen_candidates`);
2. L(current) on the seeded held-out batches (the base's loss when there is no current adapter);
3. L(candidate) for each accepted one, then the same-loss duplicate screen;
4. scores ``max(0, L(current) - L(candidate)) ** power`` (rejected: 0), weights over the positive
   scores (top_k), so a candidate that does not lower the loss is never merged;
5. the outer step over the weighted candidates by the registered method ``space``
   (:mod:`merging.methods`: "delta" on effective LoRA deltas, exact at the stacked rank;
   "factors": A and B averaged separately, with optional Nesterov momentum), and L(new) under
   the merged adapter's own config;
6. reward shares per contributor (the sum of its candidates' weights), recorded in the ledger.

When no candidate scores above 0, or the merged adapter's loss is not below L(current) by more
than ``min_gain``, the current adapter and its config stay (``improved`` False, the momentum
state unchanged). Shares
follow the weights either way: a contributor whose candidate lowered the loss did the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evaluation.gate import GateContext, GateDecision, screen_candidates, screen_losses
from evaluation.proof_of_loss import LossReport, PolEvaluator, pol_score
from factory.candidate import CandidateFiles
from factory.hashing import tensors_sha256
from merging.aggregate import merge_weights
from merging.methods import METHODS, MethodName, get_method
from merging.rewards import reward_shares

Adapter = dict[str, torch.Tensor]


class MergeConfig(BaseModel):
    """How a cycle merges: method (``space``), outer learning rate, top_k candidates, score
    power, Nesterov mu, and the least held-out gain a merge must bring to count.

    ``space`` names a registered merge method (:data:`merging.methods.METHODS`): "delta" merges
    effective LoRA deltas exactly (the merged adapter has the stacked rank); "factors" averages
    A and B separately and is the only one with Nesterov momentum. ``min_gain``: the merged
    adapter replaces the current one only when ``L(current) - L(merged) > min_gain`` (mean
    token cross-entropy on the seeded held-out batches, nats; 0: any decrease counts).
    The commission spec's ``merge`` section has the same fields (with defaults).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: MethodName
    outer_lr: float = Field(gt=0, le=2)
    top_k: int | None = Field(ge=1)
    power: float = Field(gt=0, le=4)
    nesterov_momentum: float = Field(ge=0, lt=1)
    min_gain: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _momentum_needs_factor_space(self) -> MergeConfig:
        if self.nesterov_momentum > 0 and not METHODS[self.space].momentum:
            with_momentum = [name for name, info in METHODS.items() if info.momentum]
            raise ValueError(
                f"merge.nesterov_momentum is {self.nesterov_momentum} but Nesterov momentum is"
                f" only available in factor space: set merge.nesterov_momentum to 0 or"
                f" merge.space to {' or '.join(repr(n) for n in with_momentum)}"
            )
        return self


@dataclass
class CycleOutcome:
    decisions: list[GateDecision]
    batch_indices: list[list[int]]
    current_loss: LossReport
    reports: list[LossReport | None]  # aligned with decisions; None where not evaluated
    scores: list[float]  # aligned with decisions; rejected candidates score 0
    weights: list[float]  # aligned with decisions
    shares: dict[str, Decimal]
    adapter: Adapter | None
    adapter_config: dict[str, Any]  # the config `adapter` is evaluated under (stacked rank: delta)
    adapter_sha256: str | None
    new_loss: LossReport
    improved: bool
    note: str
    momentum_state: Adapter | None = field(default=None, repr=False)


def contributor_weights(decisions: list[GateDecision], weights: list[float]) -> dict[str, float]:
    """Sum of candidate weights per verified contributor (a forged claim earns no row)."""
    totals: dict[str, float] = {}
    for decision, weight in zip(decisions, weights, strict=True):
        if decision.signature_verified and decision.contributor_id is not None:
            totals[decision.contributor_id] = totals.get(decision.contributor_id, 0.0) + weight
    return totals


def merge_cycle(
    current_adapter: Adapter | None,
    adapter_config: dict[str, Any],
    candidates: list[CandidateFiles],
    ctx: GateContext,
    evaluator: PolEvaluator,
    cfg: MergeConfig,
    momentum_state: Adapter | None = None,
    ledger: Any | None = None,
    cycle_key: str | None = None,
) -> CycleOutcome:
    """Gates, scores and merges one cycle's candidates; records shares when a ledger is given."""
    decisions = screen_candidates(candidates, ctx)
    current_loss = evaluator.loss(current_adapter, adapter_config)
    losses: list[float | None] = []
    reports: list[LossReport | None] = []
    for decision in decisions:
        report = evaluator.loss(decision.adapter, adapter_config) if decision.accepted else None
        reports.append(report)
        losses.append(report.mean if report else None)
    decisions = screen_losses(decisions, losses)
    scores = [
        pol_score(current_loss.mean, loss, cfg.power) if d.accepted and loss is not None else 0.0
        for d, loss in zip(decisions, losses, strict=True)
    ]
    weights = merge_weights(scores, cfg.top_k)
    shares = reward_shares(contributor_weights(decisions, weights))

    adapter, config, momentum = current_adapter, dict(adapter_config), momentum_state
    new_loss = current_loss
    improved, note = False, "no improvement: no candidate lowered the held-out loss"
    chosen = [i for i, w in enumerate(weights) if w > 0]
    if chosen:
        step = get_method(cfg.space).merge(
            current_adapter,
            adapter_config,
            [decisions[i].adapter for i in chosen],
            [weights[i] for i in chosen],
            cfg,
            momentum_state,
        )
        merged_loss = evaluator.loss(step.adapter, step.adapter_config)
        gain = current_loss.mean - merged_loss.mean
        if gain > cfg.min_gain:
            adapter, config, momentum = step.adapter, step.adapter_config, step.momentum_state
            new_loss = merged_loss
            improved, note = True, f"merged {len(chosen)} candidate(s)"
        elif gain > 0:
            note = f"no improvement: gain {gain:.6f} <= merge.min_gain {cfg.min_gain}"
        else:
            note = f"no improvement: merged loss {merged_loss.mean:.6f} >= current"
    digest = tensors_sha256(adapter) if adapter is not None else None
    if ledger is not None:
        by_contributor: dict[str, float] = {}
        for decision, score in zip(decisions, scores, strict=True):
            if decision.contributor_id in shares:
                by_contributor[decision.contributor_id] = (
                    by_contributor.get(decision.contributor_id, 0.0) + score
                )
        ledger.record_shares(
            ctx.expert_id,
            cycle_key or f"cycle-{ctx.cycle}",
            shares,
            by_contributor,
            expert_version=digest or "",
        )
    return CycleOutcome(
        decisions=decisions,
        batch_indices=current_loss.batch_indices,
        current_loss=current_loss,
        reports=reports,
        scores=scores,
        weights=weights,
        shares=shares,
        adapter=adapter,
        adapter_config=config,
        adapter_sha256=digest,
        new_loss=new_loss,
        improved=improved,
        note=note,
        momentum_state=momentum,
    )


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def to_json(outcome: CycleOutcome) -> dict[str, Any]:
    """A JSON-ready summary for MLflow (per-batch losses kept for audit; no tensors)."""
    return {
        "improved": outcome.improved,
        "note": outcome.note,
        "adapter_sha256": outcome.adapter_sha256,
        "adapter_rank": outcome.adapter_config.get("r"),
        "batch_indices": outcome.batch_indices,
        "current_loss": outcome.current_loss.to_json(),
        "new_loss": outcome.new_loss.to_json(),
        "candidates": [
            {
                **d.to_json(),
                "score": _num(score),
                "weight": weight,
                "loss": report.to_json() if report else None,
            }
            for d, report, score, weight in zip(
                outcome.decisions, outcome.reports, outcome.scores, outcome.weights, strict=True
            )
        ],
        "shares": {c: str(s) for c, s in sorted(outcome.shares.items())},
    }
