"""One training cycle: distribute -> train -> commit -> evaluate + merge -> WiSE-FT.

1. distribute: fix the cycle's plan before any candidate exists: each production line's
   contributor id, seed and data shard, the Proof-of-Loss batch seed and the commit deadline
   (written to ``plan.json``); every line's key is registered in the ledger.
2. train: every line is a DeepSpeed job (``python -m factory.train``) training from the current
   version (or the base), concurrently up to ``Settings.max_concurrent_lines``.
3. commit: each line writes a signed candidate; outside contributors' candidates are collected
   from the submission inbox (``<objects>/inbox/<expert_id>/cycle-<n>/``) up to the deadline.
4. evaluate + merge: the gate, Proof-of-Loss on the seeded held-out batches, the score-weighted
   outer step and reward shares (:func:`merging.cycle_merge.merge_cycle`).
5. WiSE-FT: alpha on held-out data between the previous version and the merged one, then the
   result is re-compressed to the commission's LoRA rank.

A cycle's result is a committed folder (``adapter_model.safetensors``, ``adapter_config.json``,
``cycle.json``); a rerun finds it and trains nothing again.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, task
from pydantic import BaseModel, ConfigDict

from factory.candidate import CandidateFiles
from factory.commission import CommissionSpec
from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE, lora_config_dict, read_adapter
from factory.hashing import json_sha256, tensors_sha256
from factory.ledger import Ledger
from infra.atomic import atomic_write_json, committed_dir, verify_committed
from infra.launcher import jobs_stopped_on_interrupt
from infra.settings import Settings
from tasks.scoring import alpha_search_task, merge_cycle_task
from tasks.training import train_line

CYCLE_FILE = "cycle.json"
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


def read_cycle_result(cycle_dir: Path) -> dict[str, Any] | None:
    """The committed result of a cycle, or None when it never finished."""
    if not verify_committed(cycle_dir):
        return None
    return json.loads((cycle_dir / CYCLE_FILE).read_text())


def pol_plan(num_blocks: int, seed: int, cycle: int) -> dict[str, int]:
    """The Proof-of-Loss batch plan, fixed before any candidate is collected."""
    batch_size = min(POL_BATCH_SIZE, num_blocks)
    num_batches = max(1, min(POL_MAX_BATCHES, num_blocks // batch_size))
    return {
        "batch_size": batch_size,
        "num_batches": num_batches,
        "seed": int(json_sha256({"seed": seed, "cycle": cycle})[:8], 16),
    }


@task(name="distribute")
def distribute(inputs: CycleInputs, settings: Settings) -> dict[str, Any]:
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
    deadline = datetime.now(UTC) + timedelta(seconds=TRAIN_TIMEOUT_S)
    plan = {
        "lines": [line.model_dump(mode="json") for line in lines],
        "keys": {k: str(v) for k, v in keys.items()},
        "pol": pol_plan(num_heldout, spec.seed, inputs.cycle),
        "deadline": deadline.isoformat(),
        "parent_dir": str(inputs.parent_dir) if inputs.parent_dir else None,
    }
    atomic_write_json(inputs.cycle_dir.with_name(inputs.cycle_dir.name + ".plan.json"), plan)
    return plan


def line_config(inputs: CycleInputs, line: dict, key_path: str) -> dict[str, Any]:
    """The training worker's config for one production line."""
    spec = inputs.spec
    parent_sha = None
    if inputs.parent_dir is not None:
        parent_sha = tensors_sha256(read_adapter(inputs.parent_dir / ADAPTER_FILE))
    work = inputs.cycle_dir.with_name(inputs.cycle_dir.name + ".lines") / line["contributor_id"]
    steps = spec.budget.steps_per_cycle
    return {
        "base_model_path": str(inputs.base_model_path),
        "base_model_sha256": inputs.base_model_sha256,
        "init_adapter": str(inputs.parent_dir) if inputs.parent_dir else None,
        "data_path": str(inputs.data_dir),
        "shard_index": line["shard_index"],
        "num_shards": line["num_shards"],
        "seed": line["seed"],
        "steps": steps,
        "micro_batch_size": spec.budget.batch_size,
        "learning_rate": spec.budget.learning_rate,
        "warmup_steps": max(1, steps // 10),
        "lora_rank": spec.expert.rank,
        "lora_alpha": spec.expert.alpha,
        "target_modules": list(spec.expert.target_modules),
        "zero_stage": spec.budget.zero_stage,
        "precision": "fp32",
        "checkpoint_dir": str(work / "checkpoints"),
        "checkpoint_every": max(1, steps // 4),
        "output_dir": str(work / "candidate"),
        "contributor_id": line["contributor_id"],
        "key_path": key_path,
        "expert_id": inputs.expert_id,
        "cycle": inputs.cycle,
        "parent_adapter_sha256": parent_sha,
    }


def train_lines(inputs: CycleInputs, plan: dict, settings: Settings) -> list[dict[str, Any]]:
    """Runs every line's DeepSpeed job, at most ``max_concurrent_lines`` at a time."""
    tracking_uri = settings.tracking_uri if inputs.run_id else None
    configs = [line_config(inputs, line, plan["keys"][line["contributor_id"]])
               for line in plan["lines"]]  # fmt: skip
    results: list[dict[str, Any]] = []
    width = settings.max_concurrent_lines
    for start in range(0, len(configs), width):
        futures = [
            train_line.submit(
                config,
                nprocs=inputs.spec.budget.processes_per_line,
                launcher=settings.launcher,
                timeout_s=TRAIN_TIMEOUT_S,
                tracking_uri=tracking_uri,
                run_id=inputs.run_id,
            )
            for config in configs[start : start + width]
        ]
        with jobs_stopped_on_interrupt():  # a cancelled flow run takes its DeepSpeed jobs down
            results.extend(f.result() for f in futures)
    for line, result in zip(plan["lines"], results, strict=True):
        result["contributor_id"] = line["contributor_id"]
        print(
            f"[cycle {inputs.cycle}] {line['contributor_id']}: {result['outcome']}"
            f" final loss {result.get('final_loss')} ({result.get('reason') or 'ok'})"
        )
    return results


@task(name="collect-candidates", retries=2, retry_delay_seconds=5)
def collect_candidates(
    inputs: CycleInputs, plan: dict, trained: list[dict], settings: Settings
) -> list[str]:
    """The lines' candidates plus the inbox's on-time ones, as staged local folders."""
    from factory.inbox import collect_inbox
    from infra.storage import open_store

    folders = [r["candidate_path"] for r in trained if r.get("candidate_path")]
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    staging = inputs.cycle_dir.with_name(inputs.cycle_dir.name + ".inbox")
    inbox = collect_inbox(
        store, inputs.expert_id, inputs.cycle, datetime.fromisoformat(plan["deadline"]), staging
    )
    return folders + [str(p) for p in inbox]


def _scores_by_contributor(candidates: list[dict]) -> dict[str, float]:
    """PoL score per contributor (candidate id where a contributor sent several)."""
    owners = [c["contributor_id"] or c["candidate_id"] for c in candidates]
    return {
        (owner if owners.count(owner) == 1 else c["candidate_id"]): float(c["score"])
        for owner, c in zip(owners, candidates, strict=True)
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@flow(name="cycle", log_prints=True)
def cycle_flow(inputs: CycleInputs, settings: Settings) -> dict[str, Any]:
    """Runs one cycle (see the module docstring) and returns its committed ``cycle.json``."""
    done = read_cycle_result(inputs.cycle_dir)
    if done is not None:
        print(f"[cycle {inputs.cycle}] already committed; reusing its result")
        return done
    plan = distribute(inputs, settings)
    trained = train_lines(inputs, plan, settings)
    candidates = collect_candidates(inputs, plan, trained, settings)
    outcome, search, evaluator = evaluate_and_merge(inputs, plan, candidates, settings)
    return commit_cycle(inputs, plan, trained, outcome, search, evaluator)


def evaluate_and_merge(inputs: CycleInputs, plan: dict, candidates: list[str], settings):
    """Gate + Proof-of-Loss + outer step, then the WiSE-FT alpha search on held-out data."""
    from evaluation.gate import GateContext
    from evaluation.proof_of_loss import PolEvaluator
    from merging.cycle_merge import MergeConfig
    from merging.lora_algebra import lora_shapes

    spec = inputs.spec
    config = lora_config_dict(
        spec.expert.rank, spec.expert.alpha, tuple(spec.expert.target_modules)
    )
    base_config = json.loads((inputs.base_model_path / "config.json").read_text())
    parent = read_adapter(inputs.parent_dir / ADAPTER_FILE) if inputs.parent_dir else None
    pol = plan["pol"]
    evaluator = PolEvaluator(
        inputs.base_model_path, inputs.data_dir / "heldout", pol["batch_size"],
        pol["num_batches"], pol["seed"], config,
    )  # fmt: skip
    ledger = Ledger(settings.db_url)
    ctx = GateContext(
        expert_id=inputs.expert_id,
        cycle=inputs.cycle,
        base_model_sha256=inputs.base_model_sha256,
        current_adapter_sha256=tensors_sha256(parent) if parent is not None else None,
        deadline=datetime.fromisoformat(plan["deadline"]),
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
    )
    merge_cfg = MergeConfig(
        space=spec.merge.space,
        outer_lr=spec.merge.outer_lr,
        top_k=spec.merge.top_k,
        power=spec.merge.power,
        nesterov_momentum=spec.merge.nesterov_momentum,
    )
    momentum = _load_momentum(inputs.parent_dir)
    outcome = merge_cycle_task(
        parent, config, [CandidateFiles(Path(c)) for c in candidates], ctx, evaluator,
        merge_cfg, momentum, ledger, f"{inputs.commission_id}/cycle-{inputs.cycle}",
    )  # fmt: skip
    search = None
    if outcome.improved:
        general = PolEvaluator(
            inputs.base_model_path, inputs.general_dir, pol["batch_size"],
            pol["num_batches"], pol["seed"], config,
        )  # fmt: skip
        parent_config = config if parent is not None else None
        search = alpha_search_task(
            parent, parent_config, outcome.adapter, outcome.adapter_config,
            spec.wise_ft.alpha_grid, evaluator, general, spec.wise_ft.regression_budget,
        )  # fmt: skip
    return outcome, search, evaluator


def _load_momentum(parent_dir: Path | None):
    from safetensors.torch import load_file

    if parent_dir is None or not (parent_dir / "momentum.safetensors").exists():
        return None
    return load_file(str(parent_dir / "momentum.safetensors"))


def commit_cycle(inputs: CycleInputs, plan, trained, outcome, search, evaluator) -> dict:
    """Re-compresses the chosen adapter to the commission's rank and commits the cycle."""
    from safetensors.torch import save_file

    from factory.expert import write_adapter_files
    from merging.cycle_merge import to_json
    from merging.lora_algebra import recompress, rescale_to_config
    from merging.wise_ft import alpha_curve_plot

    spec = inputs.spec
    config = lora_config_dict(
        spec.expert.rank, spec.expert.alpha, tuple(spec.expert.target_modules)
    )
    merged = to_json(outcome)
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
    parent = read_adapter(inputs.parent_dir / ADAPTER_FILE) if inputs.parent_dir else None
    improved = adapter is not None
    if not improved and parent is not None:
        adapter = parent
        config = json.loads((inputs.parent_dir / ADAPTER_CONFIG).read_text())
    loss_before = outcome.current_loss.mean
    loss_after = evaluator.loss(adapter, config).mean if adapter is not None else loss_before
    result = {
        "cycle": inputs.cycle,
        "commission_id": inputs.commission_id,
        "expert_id": inputs.expert_id,
        "improved": improved and loss_after < loss_before,
        "note": outcome.note,
        "heldout_loss_before": _finite(loss_before),
        "heldout_loss_after": _finite(loss_after),
        "base_heldout_loss": None,
        "alpha": alpha,
        "alpha_search": search.to_json() if search is not None else None,
        "recompress_error": recompress_error,
        "pol": _scores_by_contributor(merged["candidates"]),
        "rejections": {
            c["candidate_id"]: c["reason"] for c in merged["candidates"] if not c["accepted"]
        },
        "shares": {k: str(v) for k, v in outcome.shares.items()},
        "lines": [
            {
                k: r.get(k)
                for k in (
                    "contributor_id",
                    "outcome",
                    "reason",
                    "final_loss",
                    "tokens_seen",
                    "config_sha256",
                )
            }
            for r in trained
        ],  # fmt: skip
        "tokens_seen": sum(int(r.get("tokens_seen") or 0) for r in trained),
        "pol_plan": plan["pol"],
        "merge": merged,
        "adapter_sha256": tensors_sha256(adapter) if adapter is not None else None,
        "parent_adapter_sha256": tensors_sha256(parent) if parent is not None else None,
    }
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
        atomic_write_json(tmp / CYCLE_FILE, result)
    return result
