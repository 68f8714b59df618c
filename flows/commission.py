"""The commission flow: intake -> cycles -> compose -> benchmark -> gate -> register.

``taas commission submit spec.yaml`` (or ``taas demo``) calls :func:`run_commission`; a Prefect
deployment calls :func:`commission_flow` with the spec path. Every step is a task in
:mod:`tasks` whose result is a typed model committed under ``<home>/commissions/<id>/``, so a
rerun after a crash trains nothing again, and registration is exactly-once on (commission id,
adapter sha256).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from evaluation.benchmark import benchmark_texts
from factory.commission import CommissionSpec, load_spec
from factory.commission_store import CommissionStore
from flows.cycle import cycle_flow
from infra.atomic import atomic_write_text
from infra.settings import Settings, get_settings
from tasks.artifacts import commission_run_name, publish_registration
from tasks.benchmarking import benchmark
from tasks.compose import build_expert, compose, stage_library
from tasks.cycle import CycleInputs
from tasks.cycle_commit import CycleResult
from tasks.intake import intake_task
from tasks.job import Job, fail_job, finish_job, log_cycle, open_job
from tasks.registration import gate_inputs, promote_task, provenance_for, register_task
from tasks.summary import SUMMARY_FILE, CommissionSummary, plot_pol, read_summary, summarize

#: stop early when the held-out gain stays under this (relative) for two cycles in a row
EARLY_STOP_GAIN = 0.002


class CommissionCancelled(RuntimeError):
    """``taas commission cancel`` marked the commission; the flow stops at the next step."""


@flow(name="commission", flow_run_name=commission_run_name)
def commission_flow(
    spec_path: str, settings: Settings | None = None, warm_start: str | None = None
) -> CommissionSummary:
    """Runs one commission end to end and returns its summary (see :func:`print_summary`).

    ``warm_start``: a library expert (``name`` or ``name@alias``) the production lines start
    from instead of the base; retraining passes the expert's champion.
    """
    settings = settings or get_settings()
    spec = load_spec(Path(spec_path))
    intake = intake_task(Path(spec_path), settings, benchmark_items=benchmark_texts())
    done = settings.home / "commissions" / intake.commission_id / SUMMARY_FILE
    # The store, not the (possibly cached) intake result, knows the commission's state now.
    state = CommissionStore(settings.db_url).get(intake.commission_id).state
    if state == "registered" and done.exists():
        get_run_logger().info("commission %s already registered; nothing to do",
                              intake.commission_id)  # fmt: skip
        return read_summary(done)
    job = open_job(intake, spec, settings, warm_start)
    try:
        cycles = run_cycles(job, spec, settings)
        expert_dir = build_expert(job, cycles)
        library = stage_library(job, settings)
        composed = compose(job, spec, expert_dir, library)
        bench = benchmark(job, spec, composed, library, settings)
        gate = gate_inputs(job, spec, cycles, composed, bench, library)
        plots = [*composed.plots, plot_pol(job, cycles)]
        version = register_task(settings, composed.expert_dir, provenance_for(job, spec, cycles),
                                bench, plots, job.run_id)  # fmt: skip
        registered = promote_task(settings, version, gate)
        publish_registration(registered.name, registered.version, registered.promoted,
                             registered.gate_reasons, registered.pol_gain_over_reference,
                             registered.aliases, settings.tracking_uri)  # fmt: skip
    except BaseException as exc:
        fail_job(job, settings, exc)
        raise
    summary = summarize(job, spec, cycles, composed, bench, registered)
    atomic_write_text(job.root / SUMMARY_FILE, summary.model_dump_json(indent=2))
    finish_job(job, settings, registered)
    return summary


def run_cycles(job: Job, spec: CommissionSpec, settings: Settings) -> list[CycleResult]:
    """Runs up to ``budget.cycles`` cycles, each from the last accepted version."""
    results: list[CycleResult] = []
    parent = job.parent_dir
    stalled = 0
    store = CommissionStore(settings.db_url)
    logger = get_run_logger()
    for number in range(1, spec.budget.cycles + 1):
        if store.get(job.commission_id).state == "cancelled":
            raise CommissionCancelled(f"commission {job.commission_id} was cancelled")
        logger.info("commission %s: cycle %d/%d", job.commission_id, number, spec.budget.cycles)
        inputs = CycleInputs(
            commission_id=job.commission_id,
            expert_id=job.expert_id,
            cycle=number,
            spec=spec,
            base_model_path=job.base_model_path,
            base_model_sha256=job.base_model_sha256,
            data_dir=job.data_dir,
            general_dir=job.general_dir,
            parent_dir=parent,
            cycle_dir=job.cycle_dir(number),
            run_id=job.run_id,
        )
        result = cycle_flow(inputs, settings)
        log_cycle(job, settings, result)
        results.append(result)
        if result.improved:
            parent = inputs.cycle_dir
        stalled = stalled + 1 if result.relative_gain() < EARLY_STOP_GAIN else 0
        if stalled >= 2:
            logger.info("commission %s: held-out gain under %s twice; stopping early",
                        job.commission_id, EARLY_STOP_GAIN)  # fmt: skip
            break
    return results


def run_commission(spec_path: Path, settings: Settings) -> dict[str, Any]:
    """Validates the spec (one-line errors, nothing written), then runs the flow; the summary
    as JSON-ready data (what ``taas commission submit`` prints)."""
    load_spec(Path(spec_path))
    return commission_flow(spec_path=str(spec_path), settings=settings).model_dump(mode="json")


def print_summary(summary: dict[str, Any]) -> None:
    print("\n=== commission", summary["commission_id"], "->", summary["expert_id"], "===")
    for cycle, scores in summary["pol"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())) or "none"
        print(f"Proof-of-Loss {cycle}: {shown}; WiSE-FT alpha {summary['alpha'][cycle]}")
        if summary["rejections"][cycle]:
            print(f"  rejected: {summary['rejections'][cycle]}")
    print(
        f"held-out loss: base {summary['heldout_loss_base']:.4f} -> expert "
        f"{summary['heldout_loss_expert']:.4f} (mixture {summary['heldout_loss_mixture']:.4f}, "
        f"router {'accepted' if summary['router_accepted'] else 'rejected'})"
    )
    shares = summary.get("routing_share") or {}
    if shares:
        shown = ", ".join(f"{domain} {share:.2f}" for domain, share in sorted(shares.items()))
        print(f"own-route share of held-out tokens: {shown}")
    for model, tasks in summary["benchmark"].items():
        shown = ", ".join(
            f"{task} {metric} {value:.4g}"
            for task, metrics in sorted(tasks.items())
            for metric, value in sorted(metrics.items())
        )
        print(f"benchmark {model}: {shown}")
    reg = summary["registered"]
    if reg:
        print(
            f"registered: model '{reg['name']}' version {reg['version']} aliases "
            f"{reg['aliases']} (gate: {'promoted' if reg['promoted'] else reg['gate_reasons']})"
        )
    print(f"look at it: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    print(json.dumps({"commission_id": summary["commission_id"], "registered": reg}))
