"""A production line's training config: what :mod:`factory.train` runs, as one typed record.

Kept apart from the worker so that whoever only builds, ships or hashes a config (a cycle, a
pool line's flow run, the dispatcher) never imports torch: a flow-run process on a worker starts
in seconds less for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.commission import BudgetSection, ExpertSection
from factory.hashing import json_sha256

# Test-only knobs: excluded from the config hash so a resumed run matches its checkpoints.
_TEST_KNOBS = ("inject_nonfinite_steps", "kill_during_save_at_step")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model_path: Path
    base_model_sha256: str
    init_adapter: Path | None
    data_path: Path
    shard_index: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    seed: int
    steps: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1)
    grad_accum: int = Field(default=1, ge=1)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)  # global L2 norm clipped to before a step
    lora_rank: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    target_modules: list[str]
    zero_stage: int = Field(ge=0, le=3)
    precision: Literal["fp32", "bf16"]
    # A user's DeepSpeed config JSON merged over the worker's (infra.hardware); the sha256 of
    # its bytes puts the overlay in the config hash, so a changed overlay never resumes.
    ds_config_overlay: Path | None = None
    ds_config_overlay_sha256: str | None = None
    checkpoint_dir: Path
    checkpoint_every: int = Field(ge=1)
    keep_last: int = Field(default=2, ge=1)
    max_nonfinite: int = Field(default=3, ge=1)
    output_dir: Path
    contributor_id: str = Field(min_length=1)
    key_path: Path
    expert_id: str = Field(min_length=1)
    cycle: int = Field(ge=0)
    parent_adapter_sha256: str | None
    inject_nonfinite_steps: list[int] = []
    kill_during_save_at_step: int | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.shard_index >= self.num_shards:
            raise ValueError("shard_index must be < num_shards")
        if (self.init_adapter is None) != (self.parent_adapter_sha256 is None):
            raise ValueError("init_adapter and parent_adapter_sha256: give both or neither")
        if (self.ds_config_overlay is None) != (self.ds_config_overlay_sha256 is None):
            raise ValueError("ds_config_overlay and ds_config_overlay_sha256: give both or neither")
        return self

    def sha256(self) -> str:
        body = self.model_dump(mode="json", exclude=set(_TEST_KNOBS))
        return json_sha256(body)

    @classmethod
    def for_line(
        cls,
        budget: BudgetSection,
        expert: ExpertSection,
        precision: Literal["fp32", "bf16"],
        **line: object,
    ) -> TrainConfig:
        """One production line's config: the commission's ``budget`` and ``expert`` sections
        mapped onto the worker's names, plus the line's own fields (paths, seed, shard, key).

        Derived, not copied: warmup is a tenth of the steps and a checkpoint is written every
        quarter of them (at least one step each), so a resumed line loses little work.
        """
        steps = budget.steps_per_cycle
        return cls.model_validate(
            {
                "steps": steps,
                "micro_batch_size": budget.batch_size,
                "learning_rate": budget.learning_rate,
                "warmup_steps": max(1, steps // 10),
                "checkpoint_every": max(1, steps // 4),
                "zero_stage": budget.zero_stage,
                "lora_rank": expert.rank,
                "lora_alpha": expert.alpha,
                "target_modules": list(expert.target_modules),
                "precision": precision,
                **line,
            }
        )
