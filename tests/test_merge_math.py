"""The outer steps (factor and delta space) and merge weights: golden values, exactness,
idempotence, single-candidate identity, strict config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from factory.expert import adapter_key
from factory.hashing import tensors_sha256
from merging.aggregate import delta_outer_step, merge_weights, outer_step
from merging.lora_algebra import adapter_rank, effective_deltas

GOLDEN = json.loads((Path(__file__).parent / "assets" / "scoring_golden.json").read_text())
TOL = GOLDEN["tolerance"]
KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"


def _num(x):
    return float(x) if isinstance(x, str) else x


@pytest.mark.parametrize("case", GOLDEN["merge_weights"])
def test_merge_weights_golden(case):
    weights = merge_weights([_num(s) for s in case["scores"]], case["top_k"])
    assert weights == pytest.approx(case["expected"], abs=TOL)


def _t(values):
    return {KEY: torch.tensor(values, dtype=torch.float64)}


def test_outer_step_golden_plain_and_nesterov():
    g = GOLDEN["outer_step"]
    cands = [_t(c) for c in g["candidates"]]
    new, momentum = outer_step(_t(g["current"]), cands, g["weights"], g["plain"]["lr"])
    assert momentum is None
    assert new[KEY].tolist() == pytest.approx(g["plain"]["expected"], abs=TOL)
    n = g["nesterov"]
    new, momentum = outer_step(
        _t(g["current"]), cands, g["weights"], n["lr"], _t(n["momentum"]), n["mu"]
    )
    assert new[KEY].tolist() == pytest.approx(n["expected"], abs=TOL)
    assert momentum[KEY].tolist() == pytest.approx(n["expected_momentum"], abs=TOL)


def _random_adapter(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": torch.randn(
            4, 8, generator=gen
        ),
        "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": torch.randn(
            16, 4, generator=gen
        ),
    }


def test_single_candidate_with_lr_one_is_that_candidate_exactly():
    cand = _random_adapter(1)
    cand[next(iter(cand))][0, 0] = -0.0  # a negative zero must survive too
    new, _ = outer_step(_random_adapter(0), [cand], [0.7], lr=1.0)
    assert tensors_sha256(new) == tensors_sha256(cand)
    new, _ = outer_step(None, [cand, _random_adapter(2)], [1.0, 0.0], lr=1.0)
    assert tensors_sha256(new) == tensors_sha256(cand)


def test_merging_the_same_inputs_twice_gives_the_same_sha256():
    current, cands = _random_adapter(0), [_random_adapter(s) for s in (1, 2, 3)]
    runs = [
        outer_step(current, cands, [0.2, 0.3, 0.5], 0.7, _random_adapter(9), 0.4) for _ in range(2)
    ]
    assert tensors_sha256(runs[0][0]) == tensors_sha256(runs[1][0])
    assert tensors_sha256(runs[0][1]) == tensors_sha256(runs[1][1])
    # and it really moved: the merge is neither the current nor any candidate
    assert tensors_sha256(runs[0][0]) not in {tensors_sha256(a) for a in [current, *cands]}


def test_weights_are_normalized():
    current, cands = _random_adapter(0), [_random_adapter(1), _random_adapter(2)]
    a, _ = outer_step(current, cands, [1.0, 3.0], 0.5)
    b, _ = outer_step(current, cands, [0.25, 0.75], 0.5)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weights": [0.0, 0.0]}, "weights"),
        ({"weights": [1.0, -1.0]}, "weights"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"nesterov_momentum": 1.0}, "nesterov_momentum"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"weights": [1.0, 1.0], "lr": 1.0, "nesterov_momentum": 0.0} | kwargs
    with pytest.raises(ValueError, match=field):
        outer_step(_random_adapter(0), [_random_adapter(1), _random_adapter(2)], **args)


def test_merge_config_is_strict():
    from pydantic import ValidationError

    from merging.cycle_merge import MergeConfig

    MergeConfig(space="factors", outer_lr=0.7, top_k=None, power=2.0, nesterov_momentum=0.9)
    MergeConfig(space="delta", outer_lr=0.7, top_k=None, power=2.0, nesterov_momentum=0.0)
    with pytest.raises(ValidationError, match="top_k"):
        MergeConfig(space="factors", outer_lr=0.7, power=2.0, nesterov_momentum=0.9)
    with pytest.raises(ValidationError, match="space"):
        MergeConfig(outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=0.0)  # no default
    with pytest.raises(ValidationError, match="space"):
        MergeConfig(space="weights", outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=0.0)
    with pytest.raises(ValidationError, match="extra"):
        MergeConfig(space="factors", outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=0.9, lr=1)
    with pytest.raises(ValidationError, match="nesterov_momentum"):
        MergeConfig(space="factors", outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=1.0)


def test_nesterov_momentum_is_refused_in_delta_space():
    from merging.cycle_merge import MergeConfig

    with pytest.raises(ValueError, match=r"merge\.nesterov_momentum .*merge\.space"):
        MergeConfig(space="delta", outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=0.5)


def test_commissions_merge_in_delta_space_unless_told_otherwise():
    from pydantic import ValidationError

    from factory.commission import MergeSection

    assert MergeSection().space == "delta"
    assert MergeSection(space="factors").space == "factors"
    with pytest.raises(ValidationError, match="space"):
        MergeSection(space="weights")


# --- delta space -------------------------------------------------------------------------------

MODULES = {"gate_proj": (8, 12), "down_proj": (12, 8)}


def _lora(seed: int, rank: int) -> dict[str, torch.Tensor]:
    """A two-layer float64 LoRA with random A and B (B nonzero, so every delta is nonzero)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(2):
        for proj, (fan_in, fan_out) in MODULES.items():
            out[adapter_key(layer, proj, "A")] = torch.randn(rank, fan_in, generator=gen).double()
            out[adapter_key(layer, proj, "B")] = torch.randn(fan_out, rank, generator=gen).double()
    return out


def _config(rank: int, alpha: float, rslora: bool = False) -> dict:
    return {"r": rank, "lora_alpha": alpha, "use_rslora": rslora}


def test_delta_outer_step_golden():
    g = GOLDEN["delta_outer_step"]
    key_a, key_b = adapter_key(0, "gate_proj", "A"), adapter_key(0, "gate_proj", "B")
    prefix = key_a.rsplit(".lora_", 1)[0]

    def pair(a, b):
        return {key_a: torch.tensor(a).double(), key_b: torch.tensor(b).double()}

    cands = [pair(a, b) for a, b in zip(g["candidates_A"], g["candidates_B"], strict=True)]
    merged, config = delta_outer_step(
        pair(g["current_A"], g["current_B"]),
        g["current_config"],
        cands,
        g["candidate_config"],
        g["weights"],
        g["lr"],
    )
    assert config["r"] == g["expected_r"]
    assert config["lora_alpha"] == pytest.approx(g["expected_lora_alpha"], abs=TOL)
    assert merged[key_a].tolist() == g["expected_A"]
    assert torch.allclose(merged[key_b], torch.tensor(g["expected_B"]).double(), atol=TOL)
    delta = effective_deltas(merged, config)[prefix]
    assert torch.allclose(delta, torch.tensor(g["expected_delta"]).double(), rtol=0, atol=TOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_outer_step_is_the_weighted_sum_of_deltas_exactly(rslora):
    current, current_config = _lora(0, 3), _config(3, 6.0, rslora)
    cands, cand_config = [_lora(s, 2) for s in (1, 2, 3)], _config(2, 8.0, rslora)
    weights, lr = [1.0, 2.0, 5.0], 0.7
    merged, config = delta_outer_step(current, current_config, cands, cand_config, weights, lr)
    assert adapter_rank(merged) == config["r"] == 3 + 3 * 2
    assert config["lora_alpha"] == 8.0  # the candidates' alpha, kept
    assert merged[next(iter(merged))].dtype == torch.float64
    got = effective_deltas(merged, config)
    cur = effective_deltas(current, current_config)
    parts = [effective_deltas(c, cand_config) for c in cands]
    assert set(got) == set(cur) and len(got) == 4
    for prefix, delta in got.items():
        expected = (1 - lr) * cur[prefix] + lr * sum(
            (w / 8.0) * p[prefix] for w, p in zip(weights, parts, strict=True)
        )
        assert torch.allclose(delta, expected, rtol=0, atol=1e-12)
        assert float(delta.abs().max()) > 1.0  # a real delta, not zeros matching zeros


def test_delta_space_is_not_factor_averaging():
    """mean(B) @ mean(A) != mean(B @ A): factor averaging misses the weighted delta."""
    cands, config = [_lora(1, 2), _lora(2, 2)], _config(2, 4.0)
    factors, _ = outer_step(None, cands, [1.0, 1.0], 1.0)
    merged, merged_config = delta_outer_step(None, None, cands, config, [1.0, 1.0], 1.0)
    parts = [effective_deltas(c, config) for c in cands]
    by_factors = effective_deltas(factors, config)
    by_deltas = effective_deltas(merged, merged_config)
    for prefix in by_deltas:
        target = 0.5 * parts[0][prefix] + 0.5 * parts[1][prefix]
        assert torch.allclose(by_deltas[prefix], target, rtol=0, atol=1e-12)
        # the cross terms B_1 A_2 + B_2 A_1 make the factor average miss by O(1)
        assert float((by_factors[prefix] - target).abs().max()) > 0.5


def test_delta_outer_step_twice_gives_the_same_sha256():
    current, cands = _lora(0, 4), [_lora(s, 4) for s in (1, 2, 3)]
    runs = [
        delta_outer_step(current, _config(4, 8.0), cands, _config(4, 8.0), [0.2, 0.3, 0.5], 0.7)
        for _ in range(2)
    ]
    assert tensors_sha256(runs[0][0]) == tensors_sha256(runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert tensors_sha256(runs[0][0]) not in {tensors_sha256(a) for a in [current, *cands]}


def test_delta_single_candidate_with_lr_one_is_that_candidate_exactly():
    cand, config = _lora(1, 4), _config(4, 8.0)
    cand[adapter_key(0, "gate_proj", "B")][0, 0] = -0.0  # a negative zero must survive too
    for current in (None, _lora(0, 4)):
        merged, merged_config = delta_outer_step(current, config, [cand], config, [0.7], 1.0)
        assert tensors_sha256(merged) == tensors_sha256(cand)
        assert merged_config == config
    # a weight-0 candidate is left out of the stack, not stacked as zeros
    merged, merged_config = delta_outer_step(None, None, [cand, _lora(2, 4)], config, [1, 0], 1.0)
    assert tensors_sha256(merged) == tensors_sha256(cand) and merged_config["r"] == 4


def test_delta_outer_step_from_the_base_scales_the_candidates():
    cands, config = [_lora(1, 2), _lora(2, 2)], _config(2, 4.0)
    merged, merged_config = delta_outer_step(None, None, cands, config, [3.0, 1.0], 0.5)
    assert merged_config["r"] == 4  # no current term: the base is the zero delta
    parts = [effective_deltas(c, config) for c in cands]
    for prefix, delta in effective_deltas(merged, merged_config).items():
        expected = 0.5 * (0.75 * parts[0][prefix] + 0.25 * parts[1][prefix])
        assert torch.allclose(delta, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weights": [0.0, 0.0]}, "weights"),
        ({"weights": [1.0]}, "weights"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"current_config": None}, "current_config"),
        ({"candidates": []}, "candidates"),
        ({"current": {"x.lora_A.weight": torch.zeros(1, 1)}}, "current"),
    ],
)
def test_delta_outer_step_bad_arguments_name_the_field(kwargs, field):
    args = {
        "current": _lora(0, 2),
        "current_config": _config(2, 4.0),
        "candidates": [_lora(1, 2), _lora(2, 2)],
        "candidate_config": _config(2, 4.0),
        "weights": [1.0, 1.0],
        "lr": 0.5,
    } | kwargs
    with pytest.raises(ValueError, match=field):
        delta_outer_step(**args)
