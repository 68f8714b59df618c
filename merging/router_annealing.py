"""Router annealing: fit a new expert's router rows into a mixture, then decide whether to keep it.

0. Router inputs are centered (see :mod:`factory.mixture`). If the mixture's center is still
   unset (all zero), it is set to the mean of the per-set mean MLP inputs over the new domain and
   every replay set (each set weighs the same, whatever its size), under the mixture before the
   addition. Once set, it never changes: existing rows are relative to it.
1. The new expert's row at layer l starts at the centered centroid of its domain: the mean MLP
   input of its training tokens at layer l minus the center. If replay blocks named "general"
   are given and the mixture's null route is still untrained (rows and bias all zero), the null
   row starts at the general text's centered centroid the same way.
2. Only router parameters train: the rows and the mixture's null route (row and bias). The base
   model and every expert's LoRA factors are frozen; existing experts' rows train only with
   ``train_existing_rows``.
3. Each step's batch mixes new-domain blocks with replay blocks (``replay_fraction`` of the rows,
   drawn round-robin over the replay sets). Loss = LM + route_supervision * ROUTE
   + load_balance * BALANCE, where

   - LM is the mean next-token cross-entropy of the mixture on the batch;
   - ROUTE is supervised router calibration: the mean over layers and tokens of the
     cross-entropy -log p_label(token) of the router's distribution (softmax of logits /
     temperature over the E + 1 routes) toward the route its block belongs to: the new domain's
     blocks -> the new expert, replay blocks named after an expert in the mixture -> that
     expert, replay blocks named "general" -> the null route; blocks of any other replay set
     carry no label and do not enter ROUTE. Annealing runs on data whose domain is known, and
     LM alone does not separate domains whose hidden states differ little (two experts that
     both lower the loss a bit on each other's text win each other's tokens); this term uses
     the labels directly;
   - BALANCE = R * sum_r f_r * P_r, the Switch-Transformer balance term over the R = E + 1
     routes, f_r the share of tokens whose top-1 route is r and P_r the mean routing
     probability of r (averaged over layers; gradient flows through P_r only).
4. The softmax temperature follows :func:`temperature_at`, from soft (high) to sharp (low).

The input mixture is never modified: annealing works on a copy, and :func:`accept_addition`
compares the copy against the original, so a rejected addition leaves the previous mixture as is.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.commission import RouterSection
from factory.expert import Expert
from factory.mixture import MixtureModel, majority_route
from infra.atomic import atomic_write_bytes


class AnnealConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    seed: int
    temperature_start: float = Field(default=2.0, gt=0)
    temperature_end: float = Field(default=0.5, gt=0)
    schedule: Literal["cosine", "linear", "exponential"] = "cosine"
    load_balance: float = Field(default=0.0, ge=0)
    replay_fraction: float = Field(default=0.5, ge=0, le=1)
    # Weight of the supervised routing term ROUTE (module docstring, step 3); 0 turns it off.
    route_supervision: float = Field(default=3.0, ge=0)
    top_k: int = Field(default=2, ge=1)
    batch_size: int = Field(default=8, ge=1)
    train_existing_rows: bool = True

    @model_validator(mode="after")
    def _soft_to_sharp(self) -> AnnealConfig:
        if self.temperature_end > self.temperature_start:
            raise ValueError(
                "temperature_end must be <= temperature_start (annealing goes soft -> sharp); "
                f"got start={self.temperature_start}, end={self.temperature_end}"
            )
        return self

    @classmethod
    def for_commission(
        cls, router: RouterSection, seed: int, train_existing_rows: bool
    ) -> AnnealConfig:
        """The annealer's config from a commission's ``router`` section (same field names).

        Two values are read leniently, as specs have always been: ``steps`` 0 anneals for one
        step (the new row still needs its centroid start checked), and a ``temperature_end``
        above ``temperature_start`` is lowered to it (a constant temperature) rather than
        refused, so no spec that ran before fails now.
        """
        fields = router.model_dump()
        fields["steps"] = max(1, router.steps)
        fields["temperature_end"] = min(router.temperature_end, router.temperature_start)
        return cls(**fields, seed=seed, train_existing_rows=train_existing_rows)


def temperature_at(step: int, cfg: AnnealConfig) -> float:
    """Temperature at ``step`` in [0, steps-1]: start at 0, end at steps-1, non-increasing.

    cosine: end + (start - end) * (1 + cos(pi * s)) / 2; linear: start + (end - start) * s;
    exponential: start * (end / start) ** s; with s = step / (steps - 1) clamped to [0, 1].
    """
    s = min(max(step / max(cfg.steps - 1, 1), 0.0), 1.0)
    start, end = cfg.temperature_start, cfg.temperature_end
    if cfg.schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * s))
    if cfg.schedule == "linear":
        return start + (end - start) * s
    return start * (end / start) ** s


@dataclass
class AnnealResult:
    router_rows: torch.Tensor  # [L, H], the new expert's rows
    null_route: dict[str, torch.Tensor]  # the mixture's trained null rows [L, H] and bias [L]
    loss_curve: list[float]
    temperatures: list[float]
    routing_stats: dict[str, dict[str, float]]
    mixture: MixtureModel = field(repr=False)  # the annealed copy, new expert included

    def annealed_expert(self, expert: Expert) -> Expert:
        from factory.mixture import clone_expert_with_rows

        return clone_expert_with_rows(expert, self.router_rows)


def _balance_term(trace) -> torch.Tensor:
    terms = []
    for routing in trace:
        probs = routing.logits_BTR.reshape(-1, routing.logits_BTR.shape[-1]).softmax(-1)
        num_routes = probs.shape[-1]
        top1 = routing.route_ids_BTK[..., 0].reshape(-1) % num_routes
        share = torch.bincount(top1, minlength=num_routes).to(probs.dtype) / top1.numel()
        terms.append(num_routes * (share * probs.mean(0)).sum())
    return torch.stack(terms).mean()


def route_loss(trace, labels_B: torch.Tensor) -> torch.Tensor:
    """ROUTE of the module docstring: mean over layers of the mean over labelled tokens of
    -log softmax(logits_BTR)[label]; a block's label applies to all its tokens, -100 = none."""
    terms = []
    for routing in trace:
        logits_BTR = routing.logits_BTR
        labels_BT = labels_B[:, None].expand(logits_BTR.shape[:2])
        terms.append(
            torch.nn.functional.cross_entropy(
                logits_BTR.reshape(-1, logits_BTR.shape[-1]), labels_BT.reshape(-1)
            )
        )
    return torch.stack(terms).mean()


def _route_labels(names: list[str], expert_ids: list[str], new_id: str) -> dict[str, int]:
    """{block set name: route column}; the null route is the last column (index E)."""
    labels = {new_id: expert_ids.index(new_id), "general": len(expert_ids)}
    labels.update({n: expert_ids.index(n) for n in names if n in expert_ids})
    return labels


def _batch(domain_blocks, replay_blocks, cfg: AnnealConfig, step: int, generator):
    """(blocks [B, T], the name of the set each block came from; None = the new domain)."""
    num_replay = round(cfg.batch_size * cfg.replay_fraction) if replay_blocks else 0
    sources: list[str | None] = [None] * (cfg.batch_size - num_replay)
    names = sorted(replay_blocks)
    sources += [names[(step + i) % len(names)] for i in range(num_replay)]
    rows = []
    for source in sources:
        pool = domain_blocks if source is None else replay_blocks[source]
        rows.append(pool[int(torch.randint(0, pool.shape[0], (1,), generator=generator))])
    return torch.stack(rows), sources


def _set_means(mixture: MixtureModel, blocks: torch.Tensor) -> torch.Tensor:
    """[L, H]: per layer, the mean MLP input over every token of ``blocks``."""
    return torch.stack([x.mean(0) for x in mixture.mlp_inputs(blocks)])


def anneal_router(
    mixture: MixtureModel,
    new_expert: Expert,
    domain_blocks: torch.Tensor,
    replay_blocks: dict[str, torch.Tensor],
    cfg: AnnealConfig,
) -> AnnealResult:
    """Adds ``new_expert`` to a copy of ``mixture`` and trains only the router (see module doc)."""
    if domain_blocks.ndim != 2 or domain_blocks.shape[0] == 0:
        raise ValueError("domain_blocks must be a non-empty [N, T] LongTensor of token ids")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    names = sorted(replay_blocks)
    means = {name: _set_means(mixture, replay_blocks[name]) for name in names}
    domain_mean = _set_means(mixture, domain_blocks)
    after = mixture.copy()
    after.top_k = cfg.top_k
    if not bool(after.router_center.any()):
        after.set_router_center(torch.stack([domain_mean, *means.values()]).mean(0))
    center = after.router_center.detach().clone()
    untrained_null = not (after.null_rows.detach().any() or after.null_bias.detach().any())
    if "general" in means and untrained_null:
        with torch.no_grad():
            after.null_rows.copy_(means["general"] - center)
    after.add_expert(new_expert, domain_mean - center)
    new_index = len(after.experts) - 1
    labels = _route_labels(names, after.expert_ids, new_expert.manifest.expert_id)
    mask = torch.zeros_like(after.router_rows)
    mask[:, new_index] = 1.0
    if cfg.train_existing_rows:
        mask.fill_(1.0)
    after.router_rows.register_hook(lambda grad: grad * mask)
    params = [after.router_rows, after.null_rows, after.null_bias]
    # Adam without weight decay: rows whose gradient is always masked to zero never move.
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    losses, temperatures = [], []
    for step in range(cfg.steps):
        after.temperature = temperature_at(step, cfg)
        batch, sources = _batch(domain_blocks, replay_blocks, cfg, step, generator)
        output, trace = after(batch, labels=batch, return_routing=True)
        loss = output.loss
        if cfg.route_supervision > 0:
            ids = [labels.get(new_expert.manifest.expert_id if s is None else s, -100)
                   for s in sources]  # fmt: skip
            if any(i >= 0 for i in ids):
                loss = loss + cfg.route_supervision * route_loss(trace, torch.tensor(ids))
        if cfg.load_balance > 0:
            loss = loss + cfg.load_balance * _balance_term(trace)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        temperatures.append(after.temperature)
    after.temperature = cfg.temperature_end
    stats = routing_stats(
        after, {new_expert.manifest.expert_id: domain_blocks, **dict(sorted(replay_blocks.items()))}
    )
    return AnnealResult(
        router_rows=after.router_rows.detach()[:, new_index].clone(),
        null_route=after.null_route(),
        loss_curve=losses,
        temperatures=temperatures,
        routing_stats=stats,
        mixture=after,
    )


def routing_stats(
    mixture: MixtureModel, blocks_by_domain: dict[str, torch.Tensor], batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """{domain: {route name: share of the domain's tokens}}; a token's route is the majority over
    layers of its top-1 route (:func:`factory.mixture.majority_route`); shares sum to 1."""
    names = [*mixture.expert_ids, "base"]
    stats = {}
    with torch.no_grad():
        for domain, blocks in blocks_by_domain.items():
            counts = torch.zeros(len(names))
            for start in range(0, blocks.shape[0], batch_size):
                _, trace = mixture(blocks[start : start + batch_size], return_routing=True)
                routes = majority_route(trace).reshape(-1) % len(names)
                counts += torch.bincount(routes, minlength=len(names)).float()
            stats[domain] = {n: float(c / counts.sum()) for n, c in zip(names, counts, strict=True)}
    return stats


def routing_heatmap(stats: dict[str, dict[str, float]], path: Path) -> Path:
    """Writes a domains x routes heatmap of token shares as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(stats)
    routes = sorted({r for shares in stats.values() for r in shares})
    grid = [[stats[d].get(r, 0.0) for r in routes] for d in domains]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(routes), 1.0 + 0.6 * len(domains)))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(routes)), routes, rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for i, row in enumerate(grid):
        for j, share in enumerate(row):
            ax.text(
                j, i, f"{share:.2f}", ha="center", va="center", color="w" if share < 0.6 else "k"
            )
    ax.set_xlabel("route (majority top-1 over layers)")
    fig.colorbar(image, ax=ax, label="share of tokens")
    buffer = io.BytesIO()
    # "tight" grows the canvas to the labels (long expert ids); tight_layout can only shrink
    # the axes and gives up with a warning when the names do not fit
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def accept_addition(
    before_mixture: MixtureModel,
    after_mixture: MixtureModel,
    new_expert: Expert,
    heldout_by_domain: dict[str, torch.Tensor],
    expert_alone_loss: float,
    tolerance: float,
) -> tuple[bool, dict]:
    """Accept when both hold (losses: mean next-token cross-entropy on held-out blocks):

    - new domain (key = the new expert's id): (L_after - L_alone) / L_alone <= tolerance;
    - every other key (existing experts' ids, "general"): (L_after - L_before) / L_before
      <= tolerance.
    Neither mixture is modified.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 (a relative loss increase), got {tolerance}")
    new_id = new_expert.manifest.expert_id
    if new_id not in heldout_by_domain:
        raise ValueError(
            f"heldout_by_domain needs the new expert's held-out blocks under {new_id!r}"
        )
    after_loss = after_mixture.lm_loss(heldout_by_domain[new_id])
    gap = (after_loss - expert_alone_loss) / expert_alone_loss
    report: dict = {
        "tolerance": tolerance,
        "new": {
            "expert_id": new_id,
            "mixture_loss": after_loss,
            "expert_alone_loss": expert_alone_loss,
            "relative_gap": gap,
            "ok": gap <= tolerance,
        },
        "existing": {},
    }
    for domain, blocks in sorted(heldout_by_domain.items()):
        if domain == new_id:
            continue
        before, after = before_mixture.lm_loss(blocks), after_mixture.lm_loss(blocks)
        change = (after - before) / before
        report["existing"][domain] = {
            "before": before,
            "after": after,
            "relative_change": change,
            "ok": change <= tolerance,
        }
    accepted = report["new"]["ok"] and all(r["ok"] for r in report["existing"].values())
    report["accepted"] = accepted
    return accepted, report
