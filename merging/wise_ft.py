"""WiSE-FT: interpolate in weight-delta space between the previous version and the merged one.

For LoRA, ``delta_W(alpha) = (1 - alpha) * delta_W_prev + alpha * delta_W_merged`` is represented
exactly as a stacked-rank adapter (see :func:`merging.lora_algebra.stack_adapters`); ``prev`` None
is the base (zero delta). At alpha exactly 0 the previous adapter and config are returned
unchanged, at alpha exactly 1 the merged ones, so both ends are bit for bit.

alpha is chosen on held-out data (:func:`select_alpha`): the largest domain gain, i.e. the lowest
domain held-out loss, among the alphas whose general (replay) loss stays within the regression
budget: ``general_loss <= base_general_loss * (1 + regression_budget)``. alpha 0 (the previous
version) is always feasible. Ties go to the smaller alpha.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from infra.atomic import atomic_write_bytes
from merging.lora_algebra import Adapter, stack_adapters


@dataclass(frozen=True)
class AlphaPoint:
    alpha: float
    domain_loss: float
    general_loss: float


class LossFn(Protocol):
    """What the alpha search needs from an evaluator: a mean held-out loss for an adapter."""

    def loss(self, adapter: Adapter | None, adapter_config: dict | None = None) -> Any: ...


def interpolate(
    prev: Adapter | None,
    prev_config: dict | None,
    merged: Adapter,
    merged_config: dict,
    alpha: float,
) -> tuple[Adapter | None, dict | None]:
    """The adapter (and its config) whose effective delta is (1-alpha) prev + alpha merged.

    Returns (None, None) for alpha 0 with no previous version: the base itself.
    """
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        if prev is None:
            return None, None
        return {k: v.clone() for k, v in prev.items()}, dict(prev_config or {})
    if alpha == 1.0:
        return {k: v.clone() for k, v in merged.items()}, dict(merged_config)
    return stack_adapters(prev, prev_config, merged, merged_config, 1.0 - alpha, alpha)


def select_alpha(
    curve: list[AlphaPoint], base_general_loss: float, regression_budget: float
) -> float:
    """The feasible alpha with the lowest domain loss (ties: the smaller alpha); 0 as fallback.

    Feasible: finite losses and ``general_loss <= base_general_loss * (1 + regression_budget)``;
    alpha 0 is feasible whatever its general loss (it is the version already accepted).
    """
    if regression_budget < 0 or not math.isfinite(regression_budget):
        raise ValueError(f"regression_budget must be a finite number >= 0, got {regression_budget}")
    if not math.isfinite(base_general_loss):
        raise ValueError(f"base_general_loss must be finite, got {base_general_loss}")
    limit = base_general_loss * (1.0 + regression_budget)
    best_alpha, best_loss = 0.0, math.inf
    for point in sorted(curve, key=lambda p: p.alpha):
        if not 0.0 <= point.alpha <= 1.0:
            raise ValueError(f"curve: alpha must be in [0, 1], got {point.alpha}")
        if not math.isfinite(point.domain_loss):
            continue
        feasible = point.alpha == 0.0 or (
            math.isfinite(point.general_loss) and point.general_loss <= limit
        )
        if feasible and point.domain_loss < best_loss:
            best_alpha, best_loss = point.alpha, point.domain_loss
    return best_alpha


@dataclass
class AlphaSearch:
    curve: list[AlphaPoint]
    chosen: float
    base_general_loss: float
    adapter: Adapter | None
    adapter_config: dict | None

    def to_json(self) -> dict:
        return {
            "curve": [asdict(p) for p in self.curve],
            "chosen_alpha": self.chosen,
            "base_general_loss": self.base_general_loss,
        }


def alpha_search(
    prev: Adapter | None,
    prev_config: dict | None,
    merged: Adapter,
    merged_config: dict,
    alphas: list[float],
    domain: LossFn,
    general: LossFn,
    regression_budget: float,
) -> AlphaSearch:
    """Evaluates every alpha on domain and general held-out data, then applies select_alpha.

    The budget is relative to the base model's general loss (``general.loss(None)``).
    """
    if not alphas:
        raise ValueError("alphas: give at least one alpha in [0, 1], e.g. [0, 0.25, 0.5, 1]")
    base_general = float(general.loss(None).mean)
    curve = []
    for alpha in sorted(set(float(a) for a in alphas) | {0.0}):
        adapter, config = interpolate(prev, prev_config, merged, merged_config, alpha)
        curve.append(
            AlphaPoint(
                alpha=alpha,
                domain_loss=float(domain.loss(adapter, config).mean),
                general_loss=float(general.loss(adapter, config).mean),
            )
        )
    chosen = select_alpha(curve, base_general, regression_budget)
    adapter, config = interpolate(prev, prev_config, merged, merged_config, chosen)
    return AlphaSearch(curve, chosen, base_general, adapter, config)


def alpha_curve_plot(
    curve: list[AlphaPoint],
    chosen: float,
    path: Path,
    base_general_loss: float | None = None,
    regression_budget: float | None = None,
) -> Path:
    """Writes a PNG of domain and general loss against alpha, marking the chosen alpha."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    points = sorted(curve, key=lambda p: p.alpha)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p.alpha for p in points]
    ax.plot(xs, [p.domain_loss for p in points], "o-", label="domain held-out loss")
    ax.plot(xs, [p.general_loss for p in points], "s-", label="general held-out loss")
    if base_general_loss is not None and regression_budget is not None:
        limit = base_general_loss * (1 + regression_budget)
        ax.axhline(limit, color="grey", linestyle=":", label="general loss budget")
    ax.axvline(chosen, color="red", linestyle="--", label=f"chosen alpha {chosen:g}")
    ax.set_xlabel("alpha (0 = previous version, 1 = merged)")
    ax.set_ylabel("mean token cross-entropy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
