"""Routed LoRA on many experts at once: each expert's factors touch only the tokens routed to it.

Shape suffixes as in :mod:`factory.mixture`; P token-route pairs (N * K, less the null route's).

A mixture layer applies, per token n and chosen expert e with routing weight w,
``out[n] = W x[n] + sum_e w * B_e A_e x[n]``. Gathering every token's K chosen factors
(``A[ids]``: [N, K, R, D] copies per projection) is memory-bound and ran at a twelfth of the
base's speed; here instead, per layer (:func:`route_plan`, shared by gate, up and down):

- dense, while E * R is small: ``x @ A_all^T`` for every expert in one matmul, each token's
  weight on every expert (0 where not chosen), then ``@ B_all`` in one matmul
  (:meth:`factory.mixture.MixtureModel._dense_mlp`);
- gathered, otherwise for a few tokens (a decoding step): each token-route pair's factors are
  gathered (``A[ids]``: P copies, the null route's pairs at weight 0) and applied as one
  batched matmul of 1-row products, so a step costs the same few ops however many experts;
- grouped, otherwise: the token-route pairs are sorted by expert and each expert multiplies
  only its own segment; the results are added back per token. Where the experts' segments are
  about even (the padded rows below at most :data:`PADDED_MAX_WASTE` times the pairs), each
  segment is padded to the longest one and every expert's product is one batched matmul
  (``torch.bmm`` over [E, C, D]: the pad slots carry weight 0 and add exactly 0 to token 0);
  where a few experts take most tokens, ``torch.nn.functional.grouped_mm`` where the device
  and dtype run it, a loop over the non-empty segments elsewhere.

All give the gather's numbers (within float rounding; tests/test_mixture_fast_path.py keeps the
gather as the reference). Nothing here moves tensors between devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# At or below this many stacked rank rows (E * R), every expert's factors run on every token as
# a few dense matmuls and nothing is sorted: few ops, and the extra FLOPs and factor reads stay
# small; above it, the token-route pairs are sorted by expert and each expert multiplies only
# its own segment. Set from bench.mixture_throughput on CPU (rank 8: dense up to E = 8). Even a
# decoding step (one token) reads every expert's factors on the dense path, which at E = 64 on
# the demo base cost more than the grouped path's extra ops.
DENSE_MAX_STACKED_RANK = 64


# At or below this many token-route pairs (N * K: a decoding step of up to 8 rows at top-2),
# the chosen experts' factors are gathered per pair: nothing is sorted and no host sync is
# needed, and the copies stay small. Through the grouped path instead, generation at E = 64 on
# the demo base ran at 0.61x the base's generate (2 threads); gathered, at 0.71x.
GATHER_MAX_PAIRS = 16

# The padded layout's rows (E * the longest segment) at most this many times the pairs routed
# to experts. On CPU one bmm over 64 even segments ran 3x faster than grouped_mm and 5x faster
# than the segment loop (fp32, 2 threads, [2048, 576] pairs times [576, 16] factors), and a
# layer's five products with their index ops 1.4-2.3x faster than the loop; when routing is
# skewed the padding would multiply the work instead, and the segment forms serve.
PADDED_MAX_WASTE = 2.0


@dataclass
class RoutePlan:
    """How one layer's tokens reach their experts, shared by the layer's three projections.

    Exactly one form is set: ``expert`` (a forced route: every token, weight 1); ``weights_NE``
    (dense: each token's weight on every expert, 0 where not chosen); the gathered form, every
    token-route pair in token order: ``token_P``, ``weight_P1`` (0 on the null route) and
    ``expert_P`` (the pair's expert; 0 for the null route); or the grouped form, the
    token-route pairs of real experts (null pairs dropped) sorted by expert: ``token_P`` (the
    token of each pair), ``weight_P1`` (its routing weight), ``offsets_E`` (cumulative pair
    counts per expert, int32, as grouped_mm takes them) and ``counts`` (the same, per expert).
    In the padded grouped form (``capacity`` set) P is E * capacity slots, expert e's pairs in
    slots [e * capacity, e * capacity + counts[e]), and each free slot has token 0, weight 0."""

    expert: int | None = None
    weights_NE: torch.Tensor | None = None
    token_P: torch.Tensor | None = None
    weight_P1: torch.Tensor | None = None
    offsets_E: torch.Tensor | None = None
    counts: list[int] | None = None
    capacity: int | None = None
    expert_P: torch.Tensor | None = None


def route_plan(
    keys_NK: torch.Tensor, weights_NK: torch.Tensor, num_experts: int, rank: int
) -> RoutePlan:
    """The plan for routes ``keys_NK`` (stack slots; E = the null route) with ``weights_NK`` over
    ``num_experts`` experts stacked at ``rank``; the weights keep their autograd graph."""
    if num_experts * rank <= DENSE_MAX_STACKED_RANK:
        full = weights_NK.new_zeros(keys_NK.shape[0], num_experts + 1)
        return RoutePlan(weights_NE=full.scatter(1, keys_NK, weights_NK)[:, :num_experts])
    keys_P = keys_NK.reshape(-1)
    if keys_P.numel() <= GATHER_MAX_PAIRS:
        null_P = keys_P == num_experts
        tokens = torch.arange(keys_NK.shape[0], device=keys_P.device)
        return RoutePlan(
            token_P=tokens.repeat_interleave(keys_NK.shape[1]),
            weight_P1=weights_NK.reshape(-1, 1).masked_fill(null_P[:, None], 0.0),
            expert_P=keys_P.masked_fill(null_P, 0),
        )
    counts_R = torch.bincount(keys_P, minlength=num_experts + 1)
    order_P = keys_P.argsort(stable=True)
    # One host sync per layer: how many pairs are routed to experts (the null pairs sort last).
    counts = counts_R[:num_experts].tolist()
    pairs = sum(counts)
    order_P = order_P[:pairs]
    token_P = order_P // keys_NK.shape[1]
    weight_P1 = weights_NK.reshape(-1)[order_P].unsqueeze(-1)
    ends_E = counts_R[:num_experts].cumsum(0)
    capacity = max(counts, default=0)
    if pairs and num_experts * capacity <= PADDED_MAX_WASTE * pairs:
        expert_P = keys_P[order_P]
        starts_P = (ends_E - counts_R[:num_experts])[expert_P]
        slot_P = expert_P * capacity + torch.arange(pairs, device=keys_P.device) - starts_P
        slots = num_experts * capacity
        return RoutePlan(
            token_P=token_P.new_zeros(slots).index_copy(0, slot_P, token_P),
            weight_P1=weight_P1.new_zeros(slots, 1).index_copy(0, slot_P, weight_P1),
            counts=counts,
            capacity=capacity,
        )
    return RoutePlan(
        token_P=token_P, weight_P1=weight_P1, offsets_E=ends_E.to(torch.int32), counts=counts
    )


# (device type, dtype, weight shape, weight strides) -> whether grouped_mm runs it (forward and
# the input-gradient backward); where it does not, the segment loop below does the same math.
_GROUPED_MM_WORKS: dict[tuple, bool] = {}


def _grouped_mm_works(x_PD: torch.Tensor, w_EDO: torch.Tensor) -> bool:
    inference = w_EDO.is_inference()  # inference tensors never enter a backward pass
    key = (x_PD.device.type, x_PD.dtype, tuple(w_EDO.shape), w_EDO.stride(), inference)
    if key not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[key] = _probe_grouped_mm(x_PD, w_EDO, backward=not inference)
    return _GROUPED_MM_WORKS[key]


def _probe_grouped_mm(x_PD: torch.Tensor, w_EDO: torch.Tensor, backward: bool) -> bool:
    grouped_mm = getattr(nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        return False
    split = 2 if len(w_EDO) > 1 else 4  # rows 0-1 to expert 0, rows 2-3 to expert 1
    offsets = torch.full((len(w_EDO),), 4, dtype=torch.int32, device=x_PD.device)
    offsets[0] = split
    try:
        with torch.inference_mode(False), torch.enable_grad():
            probe = torch.ones(4, w_EDO.shape[1], dtype=x_PD.dtype, device=x_PD.device)
            probe.requires_grad_(backward)
            out = grouped_mm(probe, w_EDO, offs=offsets)
            if backward:
                out.sum().backward()
            expected = torch.cat(
                [probe[:split] @ w_EDO[0], probe[split:] @ w_EDO[min(1, len(w_EDO) - 1)]]
            )
            return bool(torch.allclose(out, expected, rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError):
        return False  # not on this device, dtype or layout: the segment loop serves


def segment_matmul(x_PD: torch.Tensor, w_EDO: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """[P, O]: each expert's segment of the sorted pairs times that expert's matrix (in the
    gathered form, each pair times its own expert's matrix)."""
    if plan.expert_P is not None:
        return torch.bmm(x_PD.unsqueeze(1), w_EDO.index_select(0, plan.expert_P)).squeeze(1)
    if plan.capacity is not None:
        experts, capacity = w_EDO.shape[0], plan.capacity
        return torch.bmm(x_PD.view(experts, capacity, -1), w_EDO).view(experts * capacity, -1)
    if _grouped_mm_works(x_PD, w_EDO):
        return nn.functional.grouped_mm(x_PD, w_EDO, offs=plan.offsets_E)
    pieces, start = [], 0
    for expert, count in enumerate(plan.counts):
        if count:
            pieces.append(x_PD[start : start + count] @ w_EDO[expert])
        start += count
    return torch.cat(pieces) if pieces else x_PD.new_zeros(0, w_EDO.shape[-1])


def weighted_lora_a(x_ND: torch.Tensor, at_EDR: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """[P, R]: weight * A_e x for every sorted pair (grouped path); ``at_EDR`` holds A^T."""
    return segment_matmul(x_ND.index_select(0, plan.token_P), at_EDR, plan) * plan.weight_P1


def routed_projection(
    linear: nn.Module,
    x_ND: torch.Tensor,
    a_ERD: torch.Tensor,
    b_ERO: torch.Tensor,
    plan: RoutePlan,
    h_PR: torch.Tensor | None = None,
) -> torch.Tensor:
    """W x + sum over the token's chosen experts of weight * B_e A_e x (scaling is in B), for a
    forced or a grouped plan (the dense plan runs as :meth:`MixtureModel._dense_mlp`).

    ``h_PR``: the grouped path's weight * A x per pair (:func:`weighted_lora_a`), which the
    caller computes because gate and up share it."""
    out_NO = linear(x_ND)
    if plan.expert is not None:
        return out_NO + (x_ND @ a_ERD[plan.expert].mT) @ b_ERO[plan.expert]
    assert h_PR is not None, "the grouped path takes weight * A x per pair from the caller"
    # In place: the base projection's backward does not need its output.
    return out_NO.index_add_(0, plan.token_P, segment_matmul(h_PR, b_ERO, plan))
