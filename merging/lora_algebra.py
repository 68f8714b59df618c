"""LoRA delta algebra: effective deltas, exact rank stacking and SVD re-compression.

A PEFT LoRA module holds ``lora_A`` of shape [r, in] and ``lora_B`` of shape [out, r]; its
effective weight delta is ``delta_W = s * B @ A`` with scaling ``s = lora_alpha / r``
(``lora_alpha / sqrt(r)`` when ``use_rslora`` is set; :func:`factory.lora.lora_scaling`, per
module under ``rank_pattern`` / ``alpha_pattern``). Because ``s`` depends on ``r``, any
operation that changes the rank rescales ``B`` so that ``delta_W`` is preserved and returns the
adapter_config for the new rank. :func:`effective_deltas` and :func:`rescale_to_config` honour
the patterns; the rank-changing operations (stacking, recompression) write one rank for every
module, so they refuse a config with patterns rather than silently drop them.

- :func:`stack_adapters` represents ``c0 * delta_W0 + c1 * delta_W1`` EXACTLY as one adapter of
  rank ``r0 + r1``: ``B = [c0 (s0/s) B0 | c1 (s1/s) B1]``, ``A = [A0 ; A1]``.
- :func:`stack_terms` does the same for N terms: ``sum_k c_k delta_W_k`` as one adapter of rank
  ``sum_k r_k`` with ``B = [c_1 (s_1/s) B_1 | ... | c_N (s_N/s) B_N]``, ``A = [A_1 ; ... ; A_N]``.
- :func:`recompress` truncates each module's ``delta_W`` to rank r by SVD and reports the relative
  Frobenius error ``||delta_W - delta_W_r||_F / ||delta_W||_F`` per module and overall
  (``sqrt(sum of dropped squared singular values / sum of all squared singular values)`` over all
  modules together). A module whose delta is zero has error 0.

Pure tensor code: no prefect, mlflow or boto3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from factory.expert import parse_adapter_key
from factory.lora import has_patterns, lora_scaling, module_rank

Adapter = dict[str, torch.Tensor]


def config_for_rank(config: dict[str, Any], rank: int, scaling: float | None = None) -> dict:
    """A copy of ``config`` at ``rank``; with ``scaling``, lora_alpha is set so s equals it."""
    if has_patterns(config):
        raise ValueError(
            "adapter_config: rank_pattern/alpha_pattern are not supported when the rank changes "
            "(stacking, recompression); remove them"
        )
    out = dict(config)
    out["r"] = int(rank)
    if scaling is not None:
        out["lora_alpha"] = scaling * (math.sqrt(rank) if config.get("use_rslora") else rank)
    return out


def rescale_to_config(adapter: Adapter, config: dict[str, Any], target: dict[str, Any]) -> Adapter:
    """The same effective delta under ``target``'s scaling (same ranks): each module's B is
    multiplied by s(config, module) / s(target, module), so s_target B' A == s_config B A."""
    if int(config["r"]) != int(target["r"]):
        raise ValueError(f"rescale_to_config: ranks differ ({config['r']} vs {target['r']})")
    out = {}
    for key, tensor in adapter.items():
        if ".lora_B." not in key:
            out[key] = tensor.clone()
            continue
        if module_rank(config, key) != module_rank(target, key):
            raise ValueError(f"rescale_to_config: ranks differ for {key} (rank_pattern)")
        out[key] = tensor * (lora_scaling(config, module=key) / lora_scaling(target, module=key))
    return out


def module_pairs(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """Maps each LoRA module prefix to its (lora_A key, lora_B key); ValueError if unpaired."""
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter:
        _, _, part = parse_adapter_key(key)
        prefix = key.rsplit(".lora_", 1)[0]
        pairs.setdefault(prefix, {})[part] = key
    out = {}
    for prefix in sorted(pairs):
        if set(pairs[prefix]) != {"A", "B"}:
            raise ValueError(f"adapter: module {prefix} lacks lora_A or lora_B")
        out[prefix] = (pairs[prefix]["A"], pairs[prefix]["B"])
    return out


def adapter_rank(adapter: Adapter) -> int:
    ranks = {adapter[a].shape[0] for a, _ in module_pairs(adapter).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter: modules have different ranks {sorted(ranks)}")
    return ranks.pop()


def effective_deltas(adapter: Adapter, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """delta_W = s * B @ A per module prefix, in float64 (s at the module's rank and alpha)."""
    if not has_patterns(config):
        adapter_rank(adapter)  # without patterns every module must have the config's one rank
    return {
        prefix: lora_scaling(config, adapter[a].shape[0], module=prefix)
        * (adapter[b].double() @ adapter[a].double())
        for prefix, (a, b) in module_pairs(adapter).items()
    }


def lora_shapes(
    num_layers: int, hidden_size: int, intermediate_size: int, rank: int, targets: list[str]
) -> dict[str, tuple[int, ...]]:
    """The PEFT key -> shape map of a LoRA on the MLP projections of a Llama-style model."""
    from factory.expert import adapter_key

    io = {
        "gate_proj": (hidden_size, intermediate_size),
        "up_proj": (hidden_size, intermediate_size),
        "down_proj": (intermediate_size, hidden_size),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        for proj in targets:
            fan_in, fan_out = io[proj]
            shapes[adapter_key(layer, proj, "A")] = (rank, fan_in)
            shapes[adapter_key(layer, proj, "B")] = (fan_out, rank)
    return shapes


def stack_adapters(
    first: Adapter | None,
    first_config: dict[str, Any] | None,
    second: Adapter,
    second_config: dict[str, Any],
    c_first: float,
    c_second: float,
) -> tuple[Adapter, dict]:
    """c_first * delta(first) + c_second * delta(second) as one stacked-rank adapter, exactly.

    ``first`` None is the zero delta (the base): the result is ``c_second * B``, ``A`` at the
    second's rank. The returned config keeps the second's scaling s, so its B block is only
    multiplied by ``c_second``.
    """
    r1 = adapter_rank(second)
    s1 = lora_scaling(second_config, r1)
    if first is None:
        out = {}
        for a, b in module_pairs(second).values():
            out[a] = second[a].clone()
            out[b] = (c_second * second[b].double()).to(second[b].dtype)
        return out, config_for_rank(second_config, r1)
    if first_config is None:
        raise ValueError("stack_adapters: first_config is required when first is given")
    pairs0, pairs1 = module_pairs(first), module_pairs(second)
    if set(pairs0) != set(pairs1):
        raise ValueError("stack_adapters: the two adapters cover different modules")
    r0 = adapter_rank(first)
    s0 = lora_scaling(first_config, r0)
    rank = r0 + r1
    config = config_for_rank(second_config, rank, scaling=s1)
    s = lora_scaling(config, rank)
    out = {}
    for prefix, (a, b) in pairs1.items():
        a0, b0 = pairs0[prefix]
        dtype = second[b].dtype
        block0 = (c_first * s0 / s) * first[b0].double()
        block1 = (c_second * s1 / s) * second[b].double()
        out[b] = torch.cat([block0, block1], dim=1).to(dtype)
        out[a] = torch.cat([first[a0].to(dtype), second[a]], dim=0)
    return out, config


def stack_terms(
    terms: list[tuple[Adapter, dict[str, Any], float]], reference_config: dict[str, Any]
) -> tuple[Adapter, dict]:
    """``sum_k c_k * delta(adapter_k)`` over ``terms = [(adapter_k, config_k, c_k), ...]``, exactly.

    One adapter of rank ``sum_k r_k`` (the ranks may differ). Its config is ``reference_config``
    at the stacked rank with ``lora_alpha`` KEPT (so s = lora_alpha / rank), which makes a later
    :func:`recompress` back to the reference rank return the reference config itself. The B
    blocks are scaled in float64 and cast back to the first term's dtype; keys follow the first
    term. A single term with c 1 at the reference scaling comes back bit for bit.
    """
    if not terms:
        raise ValueError("stack_terms: terms must hold at least one (adapter, config, c) term")
    pairs = [module_pairs(adapter) for adapter, _, _ in terms]
    for other in pairs[1:]:
        if set(other) != set(pairs[0]):
            raise ValueError("stack_terms: the adapters cover different modules")
    ranks = [adapter_rank(adapter) for adapter, _, _ in terms]
    scalings = [lora_scaling(config, r) for (_, config, _), r in zip(terms, ranks, strict=True)]
    rank = sum(ranks)
    config = config_for_rank(reference_config, rank)
    s = lora_scaling(config, rank)
    first = terms[0][0]
    out: Adapter = {}
    for prefix, (a_key, b_key) in pairs[0].items():
        dtype = first[b_key].dtype
        a_blocks, b_blocks = [], []
        for (adapter, _, c), module, s_k in zip(terms, pairs, scalings, strict=True):
            a_k, b_k = module[prefix]
            a_blocks.append(adapter[a_k].to(dtype))
            b_blocks.append(((c * s_k / s) * adapter[b_k].double()).to(dtype))
        out[a_key] = torch.cat(a_blocks, dim=0).contiguous()
        out[b_key] = torch.cat(b_blocks, dim=1).contiguous()
    return out, config


@dataclass(frozen=True)
class Recompressed:
    adapter: Adapter
    adapter_config: dict
    errors: dict[str, float]  # module prefix -> relative Frobenius error
    overall_error: float


def recompress(adapter: Adapter, config: dict[str, Any], rank: int) -> Recompressed:
    """Rank-``rank`` adapter closest (Frobenius, per module) to each module's effective delta.

    delta_W = U S V^T; keeps the top ``rank`` singular triplets and splits sqrt(S) between the
    factors: ``A = sqrt(S_r) V_r^T``, ``B = U_r sqrt(S_r) / s_new`` with ``s_new`` the scaling at
    the new rank (lora_alpha kept). Modules of smaller true rank are padded with zero rows/columns
    so every module has exactly ``rank``.
    """
    if rank < 1:
        raise ValueError(f"recompress: rank must be >= 1, got {rank}")
    new_config = config_for_rank(config, rank)
    s_new = lora_scaling(new_config, rank)
    out: Adapter = {}
    errors: dict[str, float] = {}
    dropped_total = kept_total = 0.0
    pairs = module_pairs(adapter)
    for prefix, delta in effective_deltas(adapter, config).items():
        a_key, b_key = pairs[prefix]
        dtype = adapter[a_key].dtype
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, sv.numel())
        root = sv[:k].sqrt()
        a_new = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b_new = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a_new[:k] = root[:, None] * vh[:k]
        b_new[:, :k] = u[:, :k] * root[None, :] / s_new
        out[a_key], out[b_key] = a_new.to(dtype), b_new.to(dtype)
        total = float((sv**2).sum())
        dropped = float((sv[k:] ** 2).sum())
        errors[prefix] = math.sqrt(dropped / total) if total > 0 else 0.0
        dropped_total += dropped
        kept_total += total
    overall = math.sqrt(dropped_total / kept_total) if kept_total > 0 else 0.0
    return Recompressed(out, new_config, errors, overall)
