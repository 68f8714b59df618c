"""rescale_to_config keeps the effective LoRA delta when only the scaling changes."""

import pytest
import torch

from merging.lora_algebra import effective_deltas, rescale_to_config

KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_{}.weight"


def test_rescale_keeps_the_effective_delta_exactly():
    generator = torch.Generator().manual_seed(0)
    adapter = {
        KEY.format("A"): torch.randn(2, 3, generator=generator, dtype=torch.float64),
        KEY.format("B"): torch.randn(4, 2, generator=generator, dtype=torch.float64),
    }
    source = {"r": 2, "lora_alpha": 3.0, "target_modules": ["up_proj"]}
    target = {"r": 2, "lora_alpha": 8.0, "target_modules": ["up_proj"]}
    out = rescale_to_config(adapter, source, target)
    before = effective_deltas(adapter, source)
    after = effective_deltas(out, target)
    for prefix, delta in before.items():
        torch.testing.assert_close(after[prefix], delta, rtol=0, atol=1e-12)
    # golden: B is scaled by (3/2) / (8/2) = 0.375, A is untouched
    torch.testing.assert_close(out[KEY.format("B")], adapter[KEY.format("B")] * 0.375)
    assert torch.equal(out[KEY.format("A")], adapter[KEY.format("A")])


def test_rescale_refuses_a_rank_change():
    adapter = {KEY.format("A"): torch.zeros(2, 3), KEY.format("B"): torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="ranks differ"):
        rescale_to_config(adapter, {"r": 2, "lora_alpha": 1.0}, {"r": 4, "lora_alpha": 1.0})
