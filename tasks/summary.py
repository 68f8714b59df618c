"""The commission's summary (``summary.json``, the flow's result) and its Proof-of-Loss plot."""

from __future__ import annotations

import io
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from evaluation.benchmark import BenchmarkResult
from factory.commission import CommissionSpec
from tasks.compose import ComposeResult
from tasks.cycle_commit import CycleResult
from tasks.job import Job
from tasks.registration import Registration

SUMMARY_FILE = "summary.json"


class CommissionSummary(BaseModel):
    """What a finished commission reports (printed by ``taas demo``, returned by the flow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commission_id: str
    expert_id: str
    domain: str
    pol: dict[str, dict[str, float]]  # cycle-<n> -> contributor -> PoL score
    rejections: dict[str, dict[str, str]]  # cycle-<n> -> candidate -> reason
    alpha: dict[str, float | None]  # cycle-<n> -> WiSE-FT alpha
    heldout_loss_base: float
    heldout_loss_expert: float
    heldout_loss_mixture: float
    router_accepted: bool
    # held-out tokens of each domain that route to that domain's own route (the new expert for
    # its domain, the null route "base" for general text): the router's own-domain share
    routing_share: dict[str, float] = {}
    benchmark: dict[str, dict[str, dict[str, float]]]  # model -> task -> metric -> value
    registered: Registration | None
    mlflow_run_id: str
    tracking_uri: str


def summarize(
    job: Job,
    spec: CommissionSpec,
    cycles: list[CycleResult],
    composed: ComposeResult,
    bench: BenchmarkResult,
    registered: Registration | None,
) -> CommissionSummary:
    return CommissionSummary(
        commission_id=job.commission_id,
        expert_id=job.expert_id,
        domain=spec.domain,
        pol={f"cycle-{c.cycle}": c.pol for c in cycles},
        rejections={f"cycle-{c.cycle}": c.rejections for c in cycles},
        alpha={f"cycle-{c.cycle}": c.alpha for c in cycles},
        heldout_loss_base=composed.base_heldout_loss,
        heldout_loss_expert=composed.expert_heldout_loss,
        heldout_loss_mixture=composed.mixture_heldout_loss,
        router_accepted=composed.accepted,
        routing_share=own_route_shares(job.expert_id, composed.routing_stats),
        benchmark=bench.table,
        registered=registered,
        mlflow_run_id=job.run_id,
        tracking_uri=job.tracking_uri,
    )


def own_route_shares(
    expert_id: str, routing_stats: dict[str, dict[str, float]]
) -> dict[str, float]:
    """For each domain of the routing stats, the share of its tokens on its own route: the
    expert's domain on the expert, "general" on the base, another expert's replay on it."""
    own = {expert_id: expert_id, "general": "base"}
    return {
        domain: shares.get(own.get(domain, domain), 0.0) for domain, shares in routing_stats.items()
    }


def read_summary(path: Path) -> CommissionSummary:
    return CommissionSummary.model_validate_json(path.read_text())


@task(name="plot-pol", cache_policy=NO_CACHE)
def plot_pol(job: Job, cycles: list[CycleResult]) -> Path:
    """Bar chart of Proof-of-Loss score per line per cycle (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infra.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 3.2))
    lines = sorted({line for c in cycles for line in c.pol})
    width = 0.8 / max(1, len(lines))
    for k, line in enumerate(lines):
        xs = [c.cycle + k * width for c in cycles]
        ax.bar(xs, [c.pol.get(line, 0.0) for c in cycles], width, label=line)
    ax.set_xlabel("cycle")
    ax.set_ylabel("PoL score (loss drop)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = job.root / "plots" / "pol_per_line.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path
