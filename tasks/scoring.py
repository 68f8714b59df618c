"""Prefect tasks for a cycle's evaluate-and-merge phase and for the WiSE-FT alpha search.

:func:`scoring_setup` gathers what scoring needs (the current version, the factory's LoRA config,
the Proof-of-Loss evaluators on the plan's seeded batches, the gate context, the merge config);
:func:`merge_cycle_task` and :func:`alpha_search_task` are thin wrappers over
:func:`merging.cycle_merge.merge_cycle` and :func:`merging.wise_ft.alpha_search`. No retries:
all of it runs locally on files already staged, so a failure is a real error, not a flaky
network. No input caching either: the inputs are a loaded model and tensors, and a cached cycle
outcome would skip the ledger write; results are not persisted (they hold tensors, the cycle
commit saves the adapter itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from evaluation.gate import GateContext
from evaluation.proof_of_loss import PolEvaluator
from factory.candidate import CandidateFiles
from factory.expert import ADAPTER_FILE, lora_config_dict, read_adapter
from factory.hashing import tensors_sha256
from factory.ledger import Ledger
from infra.settings import Settings
from merging.cycle_merge import CycleOutcome, MergeConfig, merge_cycle
from merging.wise_ft import AlphaSearch, LossFn, alpha_search
from tasks.cycle import CycleInputs, CyclePlan

Adapter = dict[str, torch.Tensor]
_LOCAL = {"retries": 0, "cache_policy": NO_CACHE, "persist_result": False}


@dataclass(frozen=True)
class ScoringSetup:
    """What evaluate-and-merge reads: held in memory for the cycle, never persisted."""

    parent: Adapter | None
    adapter_config: dict[str, Any]  # the commission's LoRA config
    domain: PolEvaluator  # the commission's held-out batches
    general: PolEvaluator  # general text, for WiSE-FT's regression budget
    gate: GateContext
    merge: MergeConfig
    momentum: Adapter | None
    ledger: Ledger


@task(name="scoring-setup", **_LOCAL)
def scoring_setup(inputs: CycleInputs, plan: CyclePlan, settings: Settings) -> ScoringSetup:
    """Loads the current version and the evaluators, fixes the gate's reference shapes."""
    from merging.lora_algebra import lora_shapes

    spec = inputs.spec
    config = lora_config_dict(
        spec.expert.rank, spec.expert.alpha, tuple(spec.expert.target_modules)
    )
    base_config = json.loads((inputs.base_model_path / "config.json").read_text())
    parent = read_adapter(inputs.parent_dir / ADAPTER_FILE) if inputs.parent_dir else None
    pol = plan.pol

    def evaluator(folder: Path) -> PolEvaluator:
        # Losses are cached beside the cycles, keyed by base, batch plan and adapter: a rerun,
        # the merge and the alpha search never evaluate the same adapter twice.
        return PolEvaluator(inputs.base_model_path, folder, pol.batch_size, pol.num_batches,
                            pol.seed, config, inputs.base_model_sha256,
                            inputs.cycle_dir.parent / "pol-cache")  # fmt: skip

    ledger = Ledger(settings.db_url)
    gate = GateContext(
        expert_id=inputs.expert_id,
        cycle=inputs.cycle,
        base_model_sha256=inputs.base_model_sha256,
        current_adapter_sha256=tensors_sha256(parent) if parent is not None else None,
        deadline=plan.deadline,
        keys=ledger,
        reference_shapes=lora_shapes(
            base_config["num_hidden_layers"],
            base_config["hidden_size"],
            base_config["intermediate_size"],
            spec.expert.rank,
            list(spec.expert.target_modules),
        ),  # fmt: skip
        adapter_config=config,
        current_adapter=parent,
        # Inbox candidates must name this commission (an old one cannot replay into it).
        commission_id=inputs.commission_id,
    )
    return ScoringSetup(
        parent=parent,
        adapter_config=config,
        domain=evaluator(inputs.data_dir / "heldout"),
        general=evaluator(inputs.general_dir),
        gate=gate,
        merge=MergeConfig.model_validate(spec.merge.model_dump()),
        momentum=_load_momentum(inputs.parent_dir),
        ledger=ledger,
    )


def _load_momentum(parent_dir: Path | None) -> Adapter | None:
    from safetensors.torch import load_file

    if parent_dir is None or not (parent_dir / "momentum.safetensors").exists():
        return None
    return load_file(str(parent_dir / "momentum.safetensors"))


@task(name="score-and-merge-cycle", **_LOCAL)
def merge_cycle_task(
    current_adapter: Adapter | None,
    adapter_config: dict[str, Any],
    candidates: list[CandidateFiles],
    ctx: GateContext,
    evaluator: PolEvaluator,
    cfg: MergeConfig,
    momentum_state: Adapter | None = None,
    ledger: Ledger | None = None,
    cycle_key: str | None = None,
) -> CycleOutcome:
    """Gate, Proof-of-Loss, outer step and shares: :func:`merging.cycle_merge.merge_cycle`."""
    return merge_cycle(current_adapter, adapter_config, candidates, ctx, evaluator, cfg,
                       momentum_state, ledger, cycle_key)  # fmt: skip


@task(name="wise-ft-alpha-search", **_LOCAL)
def alpha_search_task(
    prev: Adapter | None,
    prev_config: dict[str, Any] | None,
    merged: Adapter,
    merged_config: dict[str, Any],
    alphas: list[float],
    domain: LossFn,
    general: LossFn,
    regression_budget: float,
) -> AlphaSearch:
    """WiSE-FT's alpha on held-out data: :func:`merging.wise_ft.alpha_search`."""
    return alpha_search(prev, prev_config, merged, merged_config, alphas, domain, general,
                        regression_budget)  # fmt: skip
