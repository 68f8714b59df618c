"""One training cycle: distribute -> train -> commit -> evaluate + merge -> WiSE-FT.

1. distribute: fix the cycle's plan before any candidate exists: each production line's
   contributor id, seed and data shard, the Proof-of-Loss batch seed and the commit deadline
   (written to ``plan.json``); every line's key is registered in the ledger.
2. train: every line is a DeepSpeed job (``python -m factory.train``) training from the current
   version (or the base), concurrently up to ``Settings.max_concurrent_lines``, on
   ``Settings.processes_per_line`` ranks (default: the spec's ``budget.processes_per_line``),
   across nodes when ``Settings.hostfile`` names a DeepSpeed hostfile.
3. commit: each line writes a signed candidate; outside contributors' candidates are collected
   from the submission inbox (``<objects>/inbox/<expert_id>/cycle-<n>/``) up to the deadline.
4. evaluate + merge: the gate, Proof-of-Loss on the seeded held-out batches, the score-weighted
   outer step and reward shares (:func:`merging.cycle_merge.merge_cycle`).
5. WiSE-FT: alpha on held-out data between the previous version and the merged one, then the
   result is re-compressed to the commission's LoRA rank.

A cycle's result is a committed folder (``adapter_model.safetensors``, ``adapter_config.json``,
``cycle.json``: :class:`tasks.cycle_commit.CycleResult`); a rerun finds it and trains nothing
again.
"""

from __future__ import annotations

from prefect import flow

from factory.candidate import CandidateFiles
from infra.launcher import jobs_stopped_on_interrupt
from infra.settings import Settings
from tasks.cycle import (
    TRAIN_TIMEOUT_S,
    CycleInputs,
    CyclePlan,
    collect_candidates,
    distribute,
    line_config,
)
from tasks.cycle_commit import CycleResult, commit_cycle, read_cycle_result
from tasks.scoring import alpha_search_task, merge_cycle_task, scoring_setup
from tasks.training import LineResult, train_line


@flow(name="cycle", log_prints=True)
def cycle_flow(inputs: CycleInputs, settings: Settings) -> CycleResult:
    """Runs one cycle (see the module docstring) and returns its committed result."""
    done = read_cycle_result(inputs.cycle_dir)
    if done is not None:
        print(f"[cycle {inputs.cycle}] already committed; reusing its result")
        return done
    plan = distribute(inputs, settings)
    trained = train_lines(inputs, plan, settings)
    candidates = collect_candidates(inputs, plan, trained, settings)
    setup = scoring_setup(inputs, plan, settings)
    outcome = merge_cycle_task(
        setup.parent, setup.adapter_config, [CandidateFiles(c) for c in candidates], setup.gate,
        setup.domain, setup.merge, setup.momentum, setup.ledger,
        f"{inputs.commission_id}/cycle-{inputs.cycle}",
    )  # fmt: skip
    search = None
    if outcome.improved:
        search = alpha_search_task(
            setup.parent, setup.adapter_config if setup.parent is not None else None,
            outcome.adapter, outcome.adapter_config, inputs.spec.wise_ft.alpha_grid,
            setup.domain, setup.general, inputs.spec.wise_ft.regression_budget,
        )  # fmt: skip
    return commit_cycle(inputs, plan, trained, setup, outcome, search)


def train_lines(inputs: CycleInputs, plan: CyclePlan, settings: Settings) -> list[LineResult]:
    """Runs every line's DeepSpeed job, at most ``max_concurrent_lines`` at a time."""
    tracking_uri = settings.tracking_uri if inputs.run_id else None
    nprocs = settings.processes_per_line or inputs.spec.budget.processes_per_line
    configs = [
        line_config(inputs, line, plan.key_paths[line.contributor_id]) for line in plan.lines
    ]
    results: list[LineResult] = []
    width = settings.max_concurrent_lines
    for start in range(0, len(configs), width):
        futures = [
            train_line.submit(
                config,
                nprocs,
                settings.launcher,
                settings.hostfile,
                TRAIN_TIMEOUT_S,
                tracking_uri,
                inputs.run_id,
            )  # fmt: skip
            for config in configs[start : start + width]
        ]
        with jobs_stopped_on_interrupt():  # a cancelled flow run takes its DeepSpeed jobs down
            results.extend(f.result() for f in futures)
    for result in results:
        print(
            f"[cycle {inputs.cycle}] {result.contributor_id}: {result.outcome}"
            f" final loss {result.final_loss} ({result.reason or 'ok'})"
        )
    return results
