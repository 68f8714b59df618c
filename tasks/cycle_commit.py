"""The committed result of one cycle (``cycle.json``) and the task that commits it.

:func:`commit_cycle` re-compresses the chosen adapter to the commission's rank, measures the
held-out loss before and after, and writes the cycle folder (adapter, momentum, alpha curve,
``cycle.json``) under one commit marker. :func:`read_cycle_result` reads a committed cycle back
into the same :class:`CycleResult`; a folder without its marker is no result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from factory.expert import ADAPTER_CONFIG, lora_config_dict
from factory.hashing import tensors_sha256
from infra.atomic import atomic_write_text, committed_dir, verify_committed
from merging.cycle_merge import CycleOutcome, to_json
from merging.wise_ft import AlphaSearch
from tasks.cycle import CycleInputs, CyclePlan, PolPlan
from tasks.scoring import ScoringSetup
from tasks.training import LineResult

CYCLE_FILE = "cycle.json"

Number = float | str  # a float, or its name ("inf", "nan") where it is not finite


class _Record(BaseModel):
    # "constants" writes inf/nan as JSON's Infinity/NaN, as json.dumps did, and reads them back.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class LossRecord(_Record):
    mean: Number
    per_batch: list[Number]


class CandidateRecord(_Record):
    candidate_id: str
    accepted: bool
    reason: str | None
    detail: str | None
    contributor_id: str | None
    adapter_sha256: str | None
    score: Number
    weight: float
    loss: LossRecord | None


class MergeRecord(_Record):
    """:func:`merging.cycle_merge.to_json` of the cycle's outcome (kept for audit)."""

    improved: bool
    note: str
    adapter_sha256: str | None
    adapter_rank: int | None
    batch_indices: list[list[int]]
    current_loss: LossRecord
    new_loss: LossRecord
    candidates: list[CandidateRecord]
    shares: dict[str, str]


class AlphaPointRecord(_Record):
    alpha: float
    domain_loss: float
    general_loss: float


class AlphaSearchRecord(_Record):
    curve: list[AlphaPointRecord]
    chosen_alpha: float
    base_general_loss: float


class LineRecord(_Record):
    contributor_id: str
    outcome: str
    reason: str
    final_loss: float | None
    tokens_seen: int
    config_sha256: str
    # Set by a line run on a work pool (tasks.training.LineResult): its worker and resumed step.
    worker: str | None = None
    resumed_from_step: int | None = None


class CycleResult(_Record):
    """One committed cycle: what the flow, the registration and the audit read."""

    cycle: int
    commission_id: str
    expert_id: str
    improved: bool
    note: str
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    alpha: float | None
    alpha_search: AlphaSearchRecord | None
    recompress_error: float
    pol: dict[str, float]  # PoL score per contributor (per candidate where one sent several)
    rejections: dict[str, str]  # candidate id -> gate reason
    shares: dict[str, str]  # contributor -> exact decimal share
    lines: list[LineRecord]
    tokens_seen: int
    pol_plan: PolPlan
    merge: MergeRecord
    adapter_sha256: str | None
    parent_adapter_sha256: str | None

    def relative_gain(self) -> float:
        """(before - after) / before on the held-out batches; 0 where either is unknown."""
        before, after = self.heldout_loss_before, self.heldout_loss_after
        return (before - after) / before if before and after is not None else 0.0


def read_cycle_result(cycle_dir: Path) -> CycleResult | None:
    """The committed result of a cycle, or None when it never finished."""
    if not verify_committed(cycle_dir):
        return None
    return CycleResult.model_validate_json((cycle_dir / CYCLE_FILE).read_text())


def _scores_by_contributor(candidates: list[CandidateRecord]) -> dict[str, float]:
    """PoL score per contributor (candidate id where a contributor sent several)."""
    owners = [c.contributor_id or c.candidate_id for c in candidates]
    return {
        (owner if owners.count(owner) == 1 else c.candidate_id): float(c.score)
        for owner, c in zip(owners, candidates, strict=True)
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@task(name="commit-cycle", cache_policy=NO_CACHE)
def commit_cycle(
    inputs: CycleInputs,
    plan: CyclePlan,
    trained: list[LineResult],
    setup: ScoringSetup,
    outcome: CycleOutcome,
    search: AlphaSearch | None,
) -> CycleResult:
    """Re-compresses the chosen adapter to the commission's rank and commits the cycle."""
    from safetensors.torch import save_file

    from factory.expert import write_adapter_files
    from merging.lora_algebra import recompress, rescale_to_config
    from merging.wise_ft import alpha_curve_plot

    spec = inputs.spec
    config = lora_config_dict(
        spec.expert.rank, spec.expert.alpha, tuple(spec.expert.target_modules)
    )
    merged = MergeRecord.model_validate(json.loads(json.dumps(to_json(outcome))))
    adapter, recompress_error, alpha = None, 0.0, None
    if search is not None and search.adapter is not None:
        alpha = search.chosen
        packed = recompress(search.adapter, search.adapter_config, spec.expert.rank)
        # Saved under the commission's own config, so the next cycle's lines, the gate and
        # Proof-of-Loss all read the parent with the scaling it was trained under.
        adapter = rescale_to_config(packed.adapter, packed.adapter_config, config)
        recompress_error = packed.overall_error
    elif search is not None:
        alpha = search.chosen  # alpha 0 from the base: the version does not move
    parent = setup.parent
    improved = adapter is not None
    if not improved and parent is not None:
        adapter = parent
        config = json.loads((inputs.parent_dir / ADAPTER_CONFIG).read_text())
    loss_before = outcome.current_loss.mean
    loss_after = setup.domain.loss(adapter, config).mean if adapter is not None else loss_before
    result = CycleResult(
        cycle=inputs.cycle,
        commission_id=inputs.commission_id,
        expert_id=inputs.expert_id,
        improved=improved and loss_after < loss_before,
        note=outcome.note,
        heldout_loss_before=_finite(loss_before),
        heldout_loss_after=_finite(loss_after),
        alpha=alpha,
        alpha_search=AlphaSearchRecord.model_validate(search.to_json()) if search else None,
        recompress_error=recompress_error,
        pol=_scores_by_contributor(merged.candidates),
        rejections={c.candidate_id: c.reason for c in merged.candidates if not c.accepted},
        shares={k: str(v) for k, v in outcome.shares.items()},
        lines=[
            LineRecord.model_validate(r.model_dump(exclude={"candidate_path", "events"}))
            for r in trained
        ],  # fmt: skip
        tokens_seen=sum(r.tokens_seen for r in trained),
        pol_plan=plan.pol,
        merge=merged,
        adapter_sha256=tensors_sha256(adapter) if adapter is not None else None,
        parent_adapter_sha256=tensors_sha256(parent) if parent is not None else None,
    )
    with committed_dir(inputs.cycle_dir, overwrite=True) as tmp:
        if adapter is not None:
            write_adapter_files(tmp, adapter, config)
        if outcome.momentum_state is not None and improved:
            save_file(
                {k: v.contiguous() for k, v in outcome.momentum_state.items()},
                str(tmp / "momentum.safetensors"),
            )
        if search is not None:
            alpha_curve_plot(search.curve, search.chosen, tmp / "alpha_curve.png",
                             search.base_general_loss)  # fmt: skip
        atomic_write_text(tmp / CYCLE_FILE, result.model_dump_json(indent=2))
    return result
