"""The commission flow: intake -> cycles -> compose -> benchmark -> gate -> register.

``taas commission submit spec.yaml`` (or ``taas demo``) calls :func:`run_commission`; a Prefect
deployment calls :func:`commission_flow` with the spec path. Every step's result is a committed
folder under ``<home>/commissions/<id>/``, so a rerun after a crash trains nothing again, and
registration is exactly-once on (commission id, adapter sha256).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from evaluation.benchmark import benchmark_texts
from factory.commission import CommissionSpec, load_spec
from factory.commission_store import CommissionStore
from flows.cycle import CycleInputs, cycle_flow
from flows.steps import (
    Job,
    benchmark,
    build_expert,
    compose,
    gate_and_register,
    open_job,
    plot_pol,
)
from infra.atomic import atomic_write_json
from infra.settings import Settings, get_settings
from tasks.intake import intake_task

SUMMARY_FILE = "summary.json"
#: stop early when the held-out gain stays under this (relative) for two cycles in a row
EARLY_STOP_GAIN = 0.002


class CommissionCancelled(RuntimeError):
    """``taas commission cancel`` marked the commission; the flow stops at the next step."""


@flow(name="commission", log_prints=True)
def commission_flow(
    spec_path: str, settings: Settings | None = None, warm_start: str | None = None
) -> dict[str, Any]:
    """Runs one commission end to end and returns its summary (see :func:`print_summary`).

    ``warm_start``: a library expert (``name`` or ``name@alias``) the production lines start
    from instead of the base; retraining passes the expert's champion.
    """
    settings = settings or get_settings()
    spec = load_spec(Path(spec_path))
    intake = intake_task(Path(spec_path), settings, benchmark_items=benchmark_texts())
    done = settings.home / "commissions" / intake["commission_id"] / SUMMARY_FILE
    # The store, not the (possibly cached) intake result, knows the commission's state now.
    state = CommissionStore(settings.db_url).get(intake["commission_id"]).state
    if state == "registered" and done.exists():
        print(f"[commission {intake['commission_id']}] already registered; nothing to do")
        return json.loads(done.read_text())
    job = open_job(intake, spec, settings, warm_start)
    try:
        cycles = run_cycles(job, spec, settings)
        expert_dir = build_expert(job, spec, cycles)
        composed = compose(job, spec, expert_dir, settings)
        bench = benchmark(job, spec, composed, settings)
        plots = [*composed["plots"], plot_pol(job, cycles)]
        registered = gate_and_register(job, spec, cycles, composed, bench, plots, settings)
    except BaseException as exc:
        job.fail(settings, exc)
        raise
    summary = summarize(job, spec, cycles, composed, bench, registered)
    atomic_write_json(job.root / SUMMARY_FILE, summary)
    job.finish(settings, registered)
    return summary


def run_cycles(job: Job, spec: CommissionSpec, settings: Settings) -> list[dict[str, Any]]:
    """Runs up to ``budget.cycles`` cycles, each from the last accepted version."""
    results: list[dict[str, Any]] = []
    parent = job.parent_dir
    stalled = 0
    store = CommissionStore(settings.db_url)
    for number in range(1, spec.budget.cycles + 1):
        if store.get(job.commission_id).state == "cancelled":
            raise CommissionCancelled(f"commission {job.commission_id} was cancelled")
        print(f"[commission {job.commission_id}] cycle {number}/{spec.budget.cycles}")
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
            cycle_dir=job.root / "cycles" / f"cycle-{number}",
            run_id=job.run_id,
        )
        result = cycle_flow(inputs, settings)
        job.log_cycle(settings, result)
        results.append(result)
        if result["improved"]:
            parent = inputs.cycle_dir
        before, after = result["heldout_loss_before"], result["heldout_loss_after"]
        gain = (before - after) / before if before and after is not None else 0.0
        stalled = stalled + 1 if gain < EARLY_STOP_GAIN else 0
        if stalled >= 2:
            print(f"[commission {job.commission_id}] gain under {EARLY_STOP_GAIN} twice: stop")
            break
    return results


def summarize(job, spec, cycles, composed, bench, registered) -> dict[str, Any]:
    table = bench.get("table", {})
    return {
        "commission_id": job.commission_id,
        "expert_id": job.expert_id,
        "domain": spec.domain,
        "pol": {f"cycle-{c['cycle']}": c["pol"] for c in cycles},
        "rejections": {f"cycle-{c['cycle']}": c["rejections"] for c in cycles},
        "alpha": {f"cycle-{c['cycle']}": c["alpha"] for c in cycles},
        "heldout_loss_base": composed["base_heldout_loss"],
        "heldout_loss_expert": composed["expert_heldout_loss"],
        "heldout_loss_mixture": composed["mixture_heldout_loss"],
        "router_accepted": composed["accepted"],
        "benchmark": table,
        "registered": registered,
        "mlflow_run_id": job.run_id,
        "tracking_uri": job.tracking_uri,
    }


def run_commission(spec_path: Path, settings: Settings) -> dict[str, Any]:
    """Validates the spec (one-line errors, nothing written), then runs the flow."""
    load_spec(Path(spec_path))
    return commission_flow(spec_path=str(spec_path), settings=settings)


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
