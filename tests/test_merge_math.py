"""The outer step and merge weights: golden values, idempotence, single-candidate identity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from factory.hashing import tensors_sha256
from merging.aggregate import merge_weights, outer_step

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

    MergeConfig(outer_lr=0.7, top_k=None, power=2.0, nesterov_momentum=0.9)
    with pytest.raises(ValidationError, match="top_k"):
        MergeConfig(outer_lr=0.7, power=2.0, nesterov_momentum=0.9)  # required, no default
    with pytest.raises(ValidationError, match="extra"):
        MergeConfig(outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=0.9, lr=1.0)
    with pytest.raises(ValidationError, match="nesterov_momentum"):
        MergeConfig(outer_lr=0.7, top_k=2, power=2.0, nesterov_momentum=1.0)
