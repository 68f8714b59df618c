"""One training cycle: distribute -> train -> commit -> evaluate + merge -> WiSE-FT.

1. distribute: fix the cycle's plan before any candidate exists: each production line's
   contributor id, seed and data shard, the Proof-of-Loss batch seed and the commit deadline
   (written to ``plan.json``); every line's key is registered in the ledger.
2. train: every line is a DeepSpeed job (``python -m factory.train``) training from the current
   version (or the base), as slots of the Prefect global concurrency limit
   ``taas-train-slots`` free up, on ``Settings.processes_per_line`` ranks (default: the
   spec's ``budget.processes_per_line``), across nodes when ``Settings.hostfile`` names a
   DeepSpeed hostfile.
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

import logging

from prefect import flow, get_run_logger

from factory.candidate import CandidateFiles
from factory.inbox import watching_arrivals
from factory.train_config import TrainConfig
from infra.launcher import jobs_stopped_on_interrupt, line_rendezvous
from infra.settings import Settings
from infra.storage import open_store
from tasks.artifacts import cycle_run_name, publish_cycle
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
from tasks.slots import TRAIN_SLOTS, ensure_limit
from tasks.training import LineResult, train_line


@flow(name="cycle", flow_run_name=cycle_run_name)
def cycle_flow(inputs: CycleInputs, settings: Settings) -> CycleResult:
    """Runs one cycle (see the module docstring) and returns its committed result; its PoL
    table, rejections and WiSE-FT curve are published as artifacts (:mod:`tasks.artifacts`)."""
    done = read_cycle_result(inputs.cycle_dir)
    if done is not None:
        get_run_logger().info("cycle %d already committed; reusing its result", inputs.cycle)
        publish_cycle(done)  # this run shows the cycle too (a crash may have beaten the first)
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
    result = commit_cycle(inputs, plan, trained, setup, outcome, search)
    publish_cycle(result)
    return result


def train_lines(inputs: CycleInputs, plan: CyclePlan, settings: Settings) -> list[LineResult]:
    """Runs every line's DeepSpeed job; each holds ``nprocs`` slots of the Prefect global
    concurrency limit :data:`tasks.slots.TRAIN_SLOTS` (created, when absent, with
    ``max_concurrent_lines * nprocs`` slots), so lines start as slots free up."""
    tracking_uri = settings.tracking_uri if inputs.run_id else None
    nprocs = settings.processes_per_line or inputs.spec.budget.processes_per_line
    configs = [
        line_config(inputs, line, plan.key_paths[line.contributor_id]) for line in plan.lines
    ]
    # Outside candidates arrive while the lines train: their arrival order is what the factory
    # sees then, not what a single listing at collection time would make of folder names.
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    watch = watching_arrivals(
        store, inputs.expert_id, inputs.cycle, inputs.work_dir("inbox"), settings.inbox_poll_s
    )
    with watch:
        results = _run_lines(inputs, configs, nprocs, plan, settings, tracking_uri)
    logger = get_run_logger()
    for result in results:
        level = logging.INFO if result.outcome == "ok" else logging.WARNING
        logger.log(level, "cycle %d line %s: %s, final loss %s (%s)", inputs.cycle,
                   result.contributor_id, result.outcome, result.final_loss,
                   result.reason or "ok")  # fmt: skip
    return results


def _run_lines(
    inputs: CycleInputs,
    configs: list[TrainConfig],
    nprocs: int,
    plan: CyclePlan,
    settings: Settings,
    tracking_uri: str | None,
) -> list[LineResult]:
    if settings.line_work_pool:  # each line a deployment run on the pool's machines
        from flows.line_dispatch import dispatch_lines

        return dispatch_lines(configs, nprocs, settings, plan.deadline, inputs.run_id)
    limit = ensure_limit(TRAIN_SLOTS, settings.max_concurrent_lines * nprocs)
    # A line wider than the whole limit would wait forever: it takes all slots instead.
    slots = min(nprocs, limit)
    futures = [
        train_line.submit(
            config,
            nprocs,
            settings.launcher,
            settings.hostfile,
            TRAIN_TIMEOUT_S,
            tracking_uri,
            inputs.run_id,
            slots,
            rendezvous=line_rendezvous(settings.rdzv_endpoint, settings.nnodes, config.sha256()),
        )  # fmt: skip
        for config in configs
    ]
    with jobs_stopped_on_interrupt():  # a cancelled flow run takes its DeepSpeed jobs down
        return [f.result() for f in futures]
