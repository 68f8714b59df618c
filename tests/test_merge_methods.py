"""Contract test for every registered merge method: a new one in merging/methods is enrolled
automatically. The spec's ``merge.space`` choices are exactly the table's names."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from factory.commission import MergeSection
from merging.cycle_merge import MergeConfig
from merging.methods import METHODS, MethodName, get_method

KEYS = (
    "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
    "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight",
)
CONFIG = {"r": 2, "lora_alpha": 4.0, "target_modules": ["gate_proj"]}


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {KEYS[0]: torch.randn(2, 6, generator=g, dtype=torch.float64),
            KEYS[1]: torch.randn(5, 2, generator=g, dtype=torch.float64)}  # fmt: skip


def _cfg(space: str) -> MergeConfig:
    return MergeConfig(space=space, outer_lr=1.0, top_k=None, power=1.0, nesterov_momentum=0.0)


def test_spec_choices_are_the_table():
    assert get_args(MethodName) == tuple(METHODS)
    assert set(MergeSection.model_fields) == set(MergeConfig.model_fields)
    for name in METHODS:
        assert MergeSection(space=name).space == name
    with pytest.raises(ValidationError, match="space"):
        MergeSection(space="not-a-method")
    with pytest.raises(ValueError, match="merge.space"):
        get_method("not-a-method")


@pytest.mark.parametrize("name", list(METHODS))
def test_one_candidate_at_lr_one_is_that_candidate(name):
    candidate = _adapter(1)
    step = get_method(name).merge(None, CONFIG, [candidate], [1.0], _cfg(name), None)
    assert step.adapter.keys() == candidate.keys()
    for key in candidate:
        torch.testing.assert_close(step.adapter[key], candidate[key], rtol=0, atol=1e-12)
    assert (step.momentum_state is not None) == (
        METHODS[name].momentum and _cfg(name).nesterov_momentum > 0
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_merging_is_deterministic_and_weights_matter(name):
    a, b = _adapter(1), _adapter(2)
    method = get_method(name)
    first = method.merge(None, CONFIG, [a, b], [0.5, 0.5], _cfg(name), None)
    again = method.merge(None, CONFIG, [a, b], [0.5, 0.5], _cfg(name), None)
    skewed = method.merge(None, CONFIG, [a, b], [0.9, 0.1], _cfg(name), None)
    assert all(torch.equal(first.adapter[k], again.adapter[k]) for k in first.adapter)
    assert any(
        first.adapter[k].shape != skewed.adapter[k].shape
        or not torch.allclose(first.adapter[k], skewed.adapter[k])
        for k in first.adapter
    )
