"""Prefect tasks for composing a new expert into the routed mixture (router annealing + gate).

Thin wrappers: load the experts, call :mod:`merging.router_annealing`, write a committed folder
with the new router rows, the mixture's null route, routing stats, the acceptance report and a
routing heatmap, and return a small dict. No retries: the work is local computation on files the
factory wrote itself, so a failure is not transient.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE
from safetensors.torch import save_file

from factory.base_model import load_base
from factory.expert import load_expert
from factory.mixture import load_mixture
from infra.atomic import atomic_write_json, committed_dir
from merging.router_annealing import (
    AnnealConfig,
    accept_addition,
    anneal_router,
    routing_heatmap,
)


@task(cache_policy=NONE)
def compose_expert(
    base_path: Path,
    library_folders: list[Path],
    new_expert_folder: Path,
    domain_blocks: torch.Tensor,
    replay_blocks: dict[str, torch.Tensor],
    heldout_by_domain: dict[str, torch.Tensor],
    cfg: AnnealConfig,
    tolerance: float,
    out_folder: Path,
) -> dict:
    """Anneals the new expert's router rows into the library mixture and gates the addition.

    Returns {"accepted", "router_path", "null_route_path", "stats", "report", "folder"}; the
    folder is written whether or not the addition is accepted (the report says which).
    """
    base, _ = load_base(Path(base_path))
    before = load_mixture(base.eval(), library_folders, top_k=cfg.top_k)
    new_expert = load_expert(Path(new_expert_folder))
    result = anneal_router(before, new_expert, domain_blocks, replay_blocks, cfg)
    new_id = new_expert.manifest.expert_id
    with result.mixture.forced_route(new_id):
        alone = result.mixture.lm_loss(heldout_by_domain[new_id])
    accepted, report = accept_addition(
        before, result.mixture, new_expert, heldout_by_domain, alone, tolerance
    )
    summary = {"loss_curve": result.loss_curve, "stats": result.routing_stats, "report": report}
    with committed_dir(Path(out_folder), overwrite=True) as tmp:
        save_file({"router": result.router_rows.contiguous()}, str(tmp / "router.safetensors"))
        # Annealing may retune the other experts' rows too: keep the whole router of the mixture.
        rows = result.mixture.router_rows.detach()
        mixture_router = {
            f"rows.{e}": rows[:, i].contiguous() for i, e in enumerate(result.mixture.expert_ids)
        }
        save_file(
            {**{k: v.contiguous() for k, v in result.null_route.items()}, **mixture_router},
            str(tmp / "null_route.safetensors"),
        )
        atomic_write_json(tmp / "composition.json", summary)
        routing_heatmap(result.routing_stats, tmp / "routing_heatmap.png")
    out = Path(out_folder)
    return {
        "accepted": accepted,
        "router_path": str(out / "router.safetensors"),
        "null_route_path": str(out / "null_route.safetensors"),
        "stats": result.routing_stats,
        "report": report,
        "folder": str(out),
    }
