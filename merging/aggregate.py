"""The score-weighted outer step that merges accepted candidates into the next version.

Two spaces to merge LoRA adapters in:

- delta space (:func:`delta_outer_step`, the default): on the effective weight deltas
  ``delta_W = s * B @ A``. The merged delta is
  ``(1 - lr) * delta_W_current + lr * sum_i w_i delta_W_i`` (weights normalized), stored exactly as
  one stacked-rank LoRA (rank ``r_current + sum_i r_i``, terms with coefficient 0 left out), so
  nothing is lost. Averaging the factors instead is not averaging the deltas:
  ``mean(B) @ mean(A) != mean(B @ A)`` (the cross terms ``B_i A_j`` are noise), which is why a
  factor-space merge of two good candidates can be worse than either.
- factor space (:func:`outer_step`): on the raw tensors (A and B averaged separately); the only
  space with Nesterov momentum. Described below.

Given the current adapter theta (None: the base, i.e. every parameter zero) and candidates
theta_i with weights w_i (normalized to sum 1), the pseudo-gradient is
``g = sum_i w_i (theta_i - theta) = (sum_i w_i theta_i) - theta`` and

- without momentum: ``theta' = (1 - lr) * theta + lr * sum_i w_i theta_i`` (the same update,
  written so that lr 1 with one candidate returns that candidate exactly);
- with Nesterov momentum mu > 0: ``m' = mu * m + g``, ``theta' = theta + lr * (g + mu * m')``;
  ``m'`` is returned for the caller to persist and pass back next cycle.

Arithmetic is done in float64 over keys in sorted order and cast back to the parameters' dtype,
so the same inputs always give the same bytes (and the same sha256).
"""

from __future__ import annotations

import math

import torch

from merging.lora_algebra import stack_terms

Adapter = dict[str, torch.Tensor]


def merge_weights(scores: list[float], top_k: int | None = None) -> list[float]:
    """w_i = s_i / sum_j s_j over the positive finite scores (the top_k largest when given).

    Other entries get 0; ties for the last top_k place go to the earlier candidate. All zeros
    when no score is positive (nothing to merge).
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    positive = [i for i, s in enumerate(scores) if math.isfinite(s) and s > 0]
    positive.sort(key=lambda i: (-scores[i], i))
    if top_k is not None:
        positive = positive[:top_k]
    total = math.fsum(scores[i] for i in positive)
    weights = [0.0] * len(scores)
    for i in positive:
        weights[i] = scores[i] / total
    return weights


def _normalized(weights: list[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ValueError(
            f"weights: expected {count} values (one per candidate), got {len(weights)}"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("weights must have a positive sum; drop the candidates with weight 0")
    return [w / total for w in weights]


def outer_step(
    current: Adapter | None,
    candidates: list[Adapter],
    weights: list[float],
    lr: float,
    momentum_state: Adapter | None = None,
    nesterov_momentum: float = 0.0,
) -> tuple[Adapter, Adapter | None]:
    """One outer step; returns (new adapter, new momentum state or None without momentum)."""
    if not candidates:
        raise ValueError("candidates: at least one candidate is needed for an outer step")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if not 0.0 <= nesterov_momentum < 1.0:
        raise ValueError(f"nesterov_momentum must be in [0, 1), got {nesterov_momentum}")
    w = _normalized(weights, len(candidates))
    keys = sorted(candidates[0])
    for cand in candidates[1:]:
        if sorted(cand) != keys:
            raise ValueError("candidates: all candidates must have the same keys")
    if current is not None and sorted(current) != keys:
        raise ValueError("current: keys differ from the candidates' keys")
    new: Adapter = {}
    new_momentum: Adapter = {}
    for key in keys:
        dtype = candidates[0][key].dtype
        theta = (
            torch.zeros_like(candidates[0][key], dtype=torch.float64)
            if current is None
            else current[key].double()
        )
        average = torch.zeros_like(theta)
        for wi, cand in zip(w, candidates, strict=True):
            if wi > 0:
                average += wi * cand[key].double()
        if 1.0 in w:
            # One candidate carries all the weight: take it as-is (0.0 + x would turn -0.0 into
            # 0.0 and change the bytes).
            average = candidates[w.index(1.0)][key].double()
        if nesterov_momentum == 0.0:
            updated = average if lr == 1.0 else (1.0 - lr) * theta + lr * average
        else:
            grad = average - theta
            previous = (
                torch.zeros_like(grad) if momentum_state is None else momentum_state[key].double()
            )
            velocity = nesterov_momentum * previous + grad
            updated = theta + lr * (grad + nesterov_momentum * velocity)
            new_momentum[key] = velocity.to(dtype)
        new[key] = updated.to(dtype).contiguous()
    return new, (new_momentum if nesterov_momentum > 0 else None)


def delta_outer_step(
    current: Adapter | None,
    current_config: dict | None,
    candidates: list[Adapter],
    candidate_config: dict,
    weights: list[float],
    lr: float,
) -> tuple[Adapter, dict]:
    """The outer step on effective deltas; returns (stacked adapter, its adapter_config).

    ``delta_W' = (1 - lr) * delta_W_current + lr * sum_i w_i delta_W_i`` with ``w`` normalized to
    sum 1; ``current`` None is the zero delta (the base). Terms with coefficient 0 (lr 1 for the
    current term, weight 0 for a candidate) are left out of the stack. The config is
    ``candidate_config`` at the stacked rank with its lora_alpha kept (see
    :func:`merging.lora_algebra.stack_terms`); a single candidate at lr 1 returns that candidate
    and its config bit for bit.
    """
    if not candidates:
        raise ValueError("candidates: at least one candidate is needed for an outer step")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    w = _normalized(weights, len(candidates))
    terms: list[tuple[Adapter, dict, float]] = []
    if current is not None and lr != 1.0:
        if current_config is None:
            raise ValueError("current_config: required when a current adapter is given")
        terms.append((current, current_config, 1.0 - lr))
    terms.extend(
        (cand, candidate_config, lr * wi) for cand, wi in zip(candidates, w, strict=True) if wi > 0
    )
    keys = sorted(candidates[0])
    if any(sorted(cand) != keys for cand in candidates[1:]):
        raise ValueError("candidates: all candidates must have the same keys")
    if current is not None and sorted(current) != keys:
        raise ValueError("current: keys differ from the candidates' keys")
    return stack_terms(terms, candidate_config)
