"""WiSE-FT and LoRA delta algebra: golden stacking and SVD, alpha 0/1 ends, alpha selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from factory.expert import adapter_key, lora_config_dict
from factory.hashing import tensors_sha256
from merging.lora_algebra import effective_deltas, lora_scaling, recompress, stack_adapters
from merging.wise_ft import AlphaPoint, alpha_curve_plot, interpolate, select_alpha

GOLDEN = json.loads((Path(__file__).parent / "assets" / "scoring_golden.json").read_text())
TOL = GOLDEN["tolerance"]
A, B = adapter_key(0, "gate_proj", "A"), adapter_key(0, "gate_proj", "B")
PREFIX = A.rsplit(".lora_", 1)[0]


def _pair(a, b):
    return {A: torch.tensor(a, dtype=torch.float64), B: torch.tensor(b, dtype=torch.float64)}


def test_stacked_lora_golden():
    g = GOLDEN["stacked_lora"]
    prev, merged = _pair(g["A0"], g["B0"]), _pair(g["A1"], g["B1"])
    out, config = interpolate(prev, g["config0"], merged, g["config1"], g["alpha"])
    assert config["r"] == g["expected_r"]
    assert config["lora_alpha"] == pytest.approx(g["expected_lora_alpha"], abs=TOL)
    assert out[A].tolist() == g["expected_A"]
    assert torch.allclose(out[B], torch.tensor(g["expected_B"], dtype=torch.float64), atol=TOL)
    delta = effective_deltas(out, config)[PREFIX]
    assert torch.allclose(delta, torch.tensor(g["expected_delta"], dtype=torch.float64), atol=TOL)


def test_recompressed_lora_golden():
    g = GOLDEN["recompressed_lora"]
    result = recompress(_pair(g["A"], g["B"]), g["config"], g["rank"])
    assert result.adapter_config["r"] == g["rank"]
    assert result.adapter_config["lora_alpha"] == g["expected_lora_alpha"]
    assert result.adapter[A].shape == (1, 2) and result.adapter[B].shape == (2, 1)
    product = result.adapter[B] @ result.adapter[A]
    assert torch.allclose(product, torch.tensor(g["expected_BA"], dtype=torch.float64), atol=TOL)
    delta = effective_deltas(result.adapter, result.adapter_config)[PREFIX]
    assert torch.allclose(delta, torch.tensor(g["expected_delta"], dtype=torch.float64), atol=TOL)
    assert result.errors[PREFIX] == pytest.approx(g["expected_error"], abs=TOL)
    assert result.overall_error == pytest.approx(g["expected_error"], abs=TOL)


def _adapter(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(2):
        for proj, (fan_in, fan_out) in {"gate_proj": (8, 12), "down_proj": (12, 8)}.items():
            out[adapter_key(layer, proj, "A")] = torch.randn(rank, fan_in, generator=gen)
            out[adapter_key(layer, proj, "B")] = torch.randn(fan_out, rank, generator=gen)
    return out


CFG4 = lora_config_dict(4, 8.0, ("gate_proj", "down_proj"))


def test_alpha_zero_is_prev_bit_for_bit_and_alpha_one_is_merged():
    prev, merged = _adapter(0), _adapter(1)
    out, config = interpolate(prev, CFG4, merged, CFG4, 0.0)
    assert tensors_sha256(out) == tensors_sha256(prev) and config == CFG4
    out, config = interpolate(prev, CFG4, merged, CFG4, 1.0)
    assert tensors_sha256(out) == tensors_sha256(merged) and config == CFG4
    # from the base: alpha 0 is the base itself, alpha 1 the merged adapter
    assert interpolate(None, None, merged, CFG4, 0.0) == (None, None)
    out, _ = interpolate(None, None, merged, CFG4, 1.0)
    assert tensors_sha256(out) == tensors_sha256(merged)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_stacked_form_is_exact_in_effective_delta(alpha):
    prev, merged = _adapter(0), _adapter(1)
    cfg_prev = lora_config_dict(4, 4.0, ("gate_proj", "down_proj"))  # another scaling
    out, config = stack_adapters(prev, cfg_prev, merged, CFG4, 1 - alpha, alpha)
    assert config["r"] == 8
    assert lora_scaling(config) == pytest.approx(lora_scaling(CFG4), rel=1e-15)
    d_prev, d_merged = effective_deltas(prev, cfg_prev), effective_deltas(merged, CFG4)
    for prefix, delta in effective_deltas(out, config).items():
        expected = (1 - alpha) * d_prev[prefix] + alpha * d_merged[prefix]
        assert torch.allclose(delta, expected, atol=1e-5)
    out0, _ = stack_adapters(None, None, merged, CFG4, 0.0, alpha)
    for prefix, delta in effective_deltas(out0, CFG4).items():
        assert torch.allclose(delta, alpha * d_merged[prefix], atol=1e-5)


def test_recompress_to_full_rank_is_lossless_and_to_lower_rank_is_optimal():
    stacked, config = stack_adapters(_adapter(0), CFG4, _adapter(1), CFG4, 0.5, 0.5)
    full = recompress(stacked, config, 8)
    assert full.overall_error < 1e-6
    for prefix, delta in effective_deltas(stacked, config).items():
        assert torch.allclose(
            effective_deltas(full.adapter, full.adapter_config)[prefix], delta, atol=1e-4
        )
    low = recompress(stacked, config, 2)
    assert low.adapter_config["r"] == 2 and low.adapter_config["lora_alpha"] == config["lora_alpha"]
    for prefix, delta in effective_deltas(stacked, config).items():
        sv = torch.linalg.svdvals(delta)
        best = math.sqrt(float((sv[2:] ** 2).sum() / (sv**2).sum()))
        approx = effective_deltas(low.adapter, low.adapter_config)[prefix]
        measured = float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))
        assert low.errors[prefix] == pytest.approx(best, rel=1e-6)
        assert measured == pytest.approx(best, rel=1e-4)
    assert 0 < low.overall_error < 1


def _curve():
    return [
        AlphaPoint(0.0, domain_loss=3.0, general_loss=2.05),
        AlphaPoint(0.25, domain_loss=2.6, general_loss=2.08),
        AlphaPoint(0.5, domain_loss=2.4, general_loss=2.12),
        AlphaPoint(1.0, domain_loss=2.2, general_loss=2.5),
    ]


def test_select_alpha_respects_the_regression_budget():
    assert select_alpha(_curve(), base_general_loss=2.0, regression_budget=0.05) == 0.25
    assert select_alpha(_curve(), base_general_loss=2.0, regression_budget=0.06) == 0.5
    assert select_alpha(_curve(), base_general_loss=2.0, regression_budget=0.5) == 1.0
    # nothing but alpha 0 is feasible (even though alpha 0 itself is above budget)
    assert select_alpha(_curve(), base_general_loss=1.0, regression_budget=0.0) == 0.0
    # a non-finite point is never chosen
    curve = _curve() + [AlphaPoint(0.75, float("nan"), 2.0)]
    assert select_alpha(curve, 2.0, 0.06) == 0.5
    with pytest.raises(ValueError, match="regression_budget"):
        select_alpha(_curve(), 2.0, -0.1)


def test_alpha_curve_plot_writes_a_png(tmp_path):
    path = alpha_curve_plot(_curve(), 0.25, tmp_path / "alpha.png", 2.0, 0.05)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_alpha_search_evaluates_only_what_the_merge_has_not(tiny_base, tmp_path):
    """After scoring (base and merged losses known), a 0/0.5/1 search runs one new domain
    evaluation (alpha 0.5) and three general ones (base, 0.5, 1); the curve's ends are the
    known losses exactly."""
    from evaluation.proof_of_loss import PolEvaluator
    from factory.base_model import load_base
    from merging.wise_ft import alpha_search
    from tests.test_proof_of_loss import domain_text, save_blocks

    _, tokenizer = load_base(tiny_base.path)
    config = lora_config_dict(4, 8.0)
    domain_blocks = save_blocks(tokenizer, domain_text(1, 60), tmp_path / "domain")
    general_blocks = save_blocks(tokenizer, domain_text(2, 60), tmp_path / "general")
    domain = PolEvaluator(tiny_base.path, domain_blocks, 4, 2, 0, config)
    general = PolEvaluator(tiny_base.path, general_blocks, 4, 2, 0, config)
    gen = torch.Generator().manual_seed(3)
    slot = domain._default
    merged = {
        name.replace(f".{slot}.", "."): torch.randn(p.shape, generator=gen) * 0.3
        for name, p in domain.model.named_parameters()
        if "lora_" in name
    }
    current, merged_loss = domain.loss(None), domain.loss(merged, config)  # what scoring did
    assert domain.forward_passes == 2
    search = alpha_search(None, None, merged, config, [0, 0.5, 1], domain, general, 1.0)
    assert domain.forward_passes == 3 and general.forward_passes == 3
    ends = {p.alpha: p for p in search.curve}
    assert ends[0.0].domain_loss == current.mean and ends[1.0].domain_loss == merged_loss.mean
    assert ends[0.0].general_loss == search.base_general_loss
    assert ends[0.5].domain_loss != current.mean
