"""Prefect tasks for the first three phases of a cycle: distribute, (train), collect.

:func:`distribute` fixes the cycle's :class:`CyclePlan` before any candidate exists (each line's
contributor, seed and shard, the Proof-of-Loss batch plan, the commit deadline) and registers the
lines' keys; :func:`line_config` is one line's training config; :func:`collect_candidates`
stages the lines' candidates plus the inbox's on-time ones. Training itself is
:func:`tasks.training.train_line`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from factory.commission import CommissionSpec
from factory.expert import ADAPTER_FILE, read_adapter
from factory.hashing import json_sha256, tensors_sha256
from factory.ledger import Ledger
from factory.production_line import LineSpec
from factory.train_config import TrainConfig
from infra.atomic import atomic_write_text
from infra.hardware import line_hardware_fields
from infra.settings import Settings
from tasks.training import LineResult

POL_BATCH_SIZE = 8
POL_MAX_BATCHES = 16
TRAIN_TIMEOUT_S = 6 * 3600


class CycleInputs(BaseModel):
    """Everything one cycle needs; the flow's only parameter besides the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commission_id: str
    expert_id: str
    cycle: int
    spec: CommissionSpec
    base_model_path: Path
    base_model_sha256: str
    data_dir: Path
    general_dir: Path
    parent_dir: Path | None  # committed adapter folder of the current version; None: the base
    cycle_dir: Path
    run_id: str | None = None

    def work_dir(self, suffix: str) -> Path:
        """A sibling of the cycle folder (``cycle-<n>.<suffix>``) for the cycle's own files."""
        return self.cycle_dir.with_name(f"{self.cycle_dir.name}.{suffix}")


class PolPlan(BaseModel):
    """The Proof-of-Loss batch plan, fixed before any candidate is collected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int
    num_batches: int
    seed: int


class CyclePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lines: list[LineSpec]
    key_paths: dict[str, Path]  # contributor id -> its signing key (not `keys`: Prefect
    # treats a model with a `keys` attribute as a mapping when it walks task results)
    pol: PolPlan
    deadline: datetime
    parent_dir: Path | None


def pol_plan(num_blocks: int, seed: int, cycle: int, max_batches: int = POL_MAX_BATCHES) -> PolPlan:
    """``min(8, num_blocks)`` blocks per batch, up to ``max_batches`` batches (the spec's
    ``heldout.pol_batches``; never more than the split's distinct batches), a seed from
    (seed, cycle)."""
    batch_size = min(POL_BATCH_SIZE, num_blocks)
    return PolPlan(
        batch_size=batch_size,
        num_batches=max(1, min(max_batches, num_blocks // batch_size)),
        seed=int(json_sha256({"seed": seed, "cycle": cycle})[:8], 16),
    )


@task(name="distribute", cache_policy=NO_CACHE)
def distribute(inputs: CycleInputs, settings: Settings) -> CyclePlan:
    """Plans the lines, registers their keys and fixes the PoL seed and the deadline."""
    from datasets import load_from_disk

    from factory.production_line import ensure_line_keys, plan_lines

    spec = inputs.spec
    lines = plan_lines(
        spec.budget.production_lines,
        base_seed=spec.seed * 1000 + inputs.cycle * 100,
        num_shards=spec.budget.production_lines,
    )
    keys = ensure_line_keys(settings.home, Ledger(settings.db_url), lines)
    num_heldout = len(load_from_disk(str(inputs.data_dir / "heldout")))
    plan = CyclePlan(
        lines=lines,
        key_paths=keys,
        pol=pol_plan(num_heldout, spec.seed, inputs.cycle, spec.heldout.pol_batches),
        deadline=datetime.now(UTC) + timedelta(seconds=TRAIN_TIMEOUT_S),
        parent_dir=inputs.parent_dir,
    )
    atomic_write_text(inputs.work_dir("plan.json"), plan.model_dump_json(indent=2))
    return plan


def line_config(inputs: CycleInputs, line: LineSpec, key_path: Path) -> TrainConfig:
    """The training worker's config for one production line."""
    parent_sha = None
    if inputs.parent_dir is not None:
        parent_sha = tensors_sha256(read_adapter(inputs.parent_dir / ADAPTER_FILE))
    work = inputs.work_dir("lines") / line.contributor_id
    return TrainConfig.for_line(
        inputs.spec.budget,
        inputs.spec.expert,
        **line_hardware_fields(),  # precision and the DeepSpeed overlay, from the settings
        base_model_path=inputs.base_model_path,
        base_model_sha256=inputs.base_model_sha256,
        init_adapter=inputs.parent_dir,
        data_path=inputs.data_dir,
        shard_index=line.shard_index,
        num_shards=line.num_shards,
        seed=line.seed,
        checkpoint_dir=work / "checkpoints",
        output_dir=work / "candidate",
        contributor_id=line.contributor_id,
        key_path=key_path,
        expert_id=inputs.expert_id,
        cycle=inputs.cycle,
        parent_adapter_sha256=parent_sha,
    )


@task(name="collect-candidates", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def collect_candidates(
    inputs: CycleInputs, plan: CyclePlan, trained: list[LineResult], settings: Settings
) -> list[Path]:
    """The lines' candidates plus the inbox's on-time ones, as staged local folders."""
    from factory.inbox import collect_inbox
    from infra.storage import open_store

    folders = [r.candidate_path for r in trained if r.candidate_path is not None]
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    inbox = collect_inbox(
        store, inputs.expert_id, inputs.cycle, plan.deadline, inputs.work_dir("inbox")
    )
    return folders + [Path(p) for p in inbox]
