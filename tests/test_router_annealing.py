"""Router annealing: the temperature schedule, determinism, routing of two domains, acceptance,
the heatmap, library match and the composition task."""

from __future__ import annotations

import math

import pytest
import torch
from test_mixture_experts import domain_blocks, experts_for

from factory.base_model import load_base
from factory.mixture import LayerRouting, MixtureModel
from merging.router_annealing import (
    AnnealConfig,
    accept_addition,
    anneal_router,
    route_loss,
    routing_heatmap,
    routing_stats,
    temperature_at,
)

CFG = AnnealConfig(steps=30, lr=0.05, seed=0, route_supervision=3.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exponential"])
def test_temperature_schedule_is_monotone_from_start_to_end(schedule):
    cfg = AnnealConfig(
        steps=50, lr=0.1, seed=0, temperature_start=3.0, temperature_end=0.25, schedule=schedule
    )
    values = [temperature_at(s, cfg) for s in range(cfg.steps)]
    assert values[0] == pytest.approx(3.0, abs=1e-12)
    assert values[-1] == pytest.approx(0.25, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[25] < 3.0 and values[25] > 0.25


def test_config_rejects_sharp_to_soft_and_unknown_keys():
    with pytest.raises(ValueError, match="temperature_end"):
        AnnealConfig(steps=5, lr=0.1, seed=0, temperature_start=0.5, temperature_end=2.0)
    with pytest.raises(ValueError, match="extra"):
        AnnealConfig(steps=5, lr=0.1, seed=0, warmup=3)


@pytest.fixture(scope="module")
def annealed(tiny_base):
    digits, licence = experts_for(tiny_base)
    blocks = domain_blocks(str(tiny_base.path))
    base, _ = load_base(tiny_base.path)
    empty = MixtureModel(base)
    first = anneal_router(
        empty, digits, blocks["digits"][0], {"general": blocks["general"][0]}, CFG
    )
    replay = {"general": blocks["general"][0], "digits-expert": blocks["digits"][0]}
    second = anneal_router(first.mixture, licence, blocks["licence"][0], replay, CFG)
    return {"empty": empty, "first": first, "second": second, "blocks": blocks}


def test_annealing_is_deterministic_and_trains_only_the_router(annealed, tiny_base):
    digits, _ = experts_for(tiny_base)
    blocks = annealed["blocks"]
    again = anneal_router(
        annealed["empty"], digits, blocks["digits"][0], {"general": blocks["general"][0]}, CFG
    )
    first = annealed["first"]
    assert torch.equal(again.router_rows, first.router_rows)
    assert torch.equal(again.null_route["null_rows"], first.null_route["null_rows"])
    assert again.loss_curve == first.loss_curve
    assert torch.equal(again.mixture.router_center, first.mixture.router_center)
    # The center was set once: the mean of the digits and general per-set means.
    means = [
        torch.stack([x.mean(0) for x in annealed["empty"].mlp_inputs(blocks[d][0])])
        for d in ("digits", "general")
    ]
    center = (means[0] + means[1]) / 2
    torch.testing.assert_close(first.mixture.router_center, center, atol=1e-5, rtol=0)
    # The second addition keeps it: the digits row is relative to it.
    assert torch.equal(annealed["second"].mixture.router_center, first.mixture.router_center)
    # The rows moved away from their start (the centered centroid) and the loss went down.
    assert (first.router_rows - (means[0] - center)).abs().max() > 0.1
    assert sum(first.loss_curve[-5:]) / 5 < sum(first.loss_curve[:5]) / 5
    # The input mixture is untouched: still no experts, null route and center still zero.
    assert annealed["empty"].expert_ids == []
    assert annealed["empty"].null_rows.abs().sum() == 0
    assert annealed["empty"].router_center.abs().sum() == 0


def test_each_domain_routes_mostly_to_its_own_expert(annealed):
    blocks = annealed["blocks"]
    mixture = annealed["second"].mixture
    stats = routing_stats(mixture, {d: blocks[d][1] for d in ("digits", "licence", "general")})
    for shares in stats.values():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    # Held-out tokens (majority top-1 over layers); measured 0.908, 0.631 and 0.760.
    assert stats["digits"]["digits-expert"] > 0.5
    assert stats["licence"]["licence-expert"] > 0.5
    assert stats["general"]["base"] > 0.5


def test_route_loss_is_the_cross_entropy_toward_each_block_label():
    # Layer 0: uniform over 3 routes -> log 3 per token. Layer 1: the label's logit is 2, the
    # others 0 -> log(e^2 + 2) - 2. Block 1 carries no label (-100) and does not count.
    uniform = torch.zeros(2, 4, 3, requires_grad=True)
    peaked = torch.zeros(2, 4, 3)
    peaked[0, :, 1] = 2.0
    peaked[1, :, 0] = 9.0
    trace = [LayerRouting(0, None, None, None, uniform), LayerRouting(1, None, None, None, peaked)]
    loss = route_loss(trace, torch.tensor([1, -100]))
    expected = (math.log(3) + math.log(math.exp(2) + 2) - 2) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert uniform.grad[0].abs().sum() > 0 and uniform.grad[1].abs().sum() == 0


def test_acceptance_gates_the_addition_and_keeps_the_previous_mixture(annealed, tiny_base):
    _, licence = experts_for(tiny_base)
    blocks = annealed["blocks"]
    before, after = annealed["first"].mixture, annealed["second"].mixture
    heldout = {
        "licence-expert": blocks["licence"][1],
        "digits-expert": blocks["digits"][1],
        "general": blocks["general"][1],
    }
    with after.forced_route("licence-expert"):
        alone = after.lm_loss(heldout["licence-expert"])
    rows_before = before.router_rows.detach().clone()
    accepted, report = accept_addition(before, after, licence, heldout, alone, tolerance=0.5)
    assert accepted and report["accepted"]
    assert set(report["existing"]) == {"digits-expert", "general"}
    refused, report = accept_addition(before, after, licence, heldout, alone * 0.5, tolerance=0.01)
    assert not refused and not report["new"]["ok"]
    # A refused addition leaves the previous mixture as it was.
    assert before.expert_ids == ["digits-expert"]
    assert torch.equal(before.router_rows.detach(), rows_before)
    with pytest.raises(ValueError, match="tolerance"):
        accept_addition(before, after, licence, heldout, alone, tolerance=-1.0)


def test_routing_heatmap_writes_a_png(tmp_path):
    stats = {"digits": {"a": 0.75, "base": 0.25}, "licence": {"a": 0.1, "base": 0.9}}
    path = routing_heatmap(stats, tmp_path / "heatmap.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_match_ranks_the_domain_expert_first(annealed, tiny_base):
    from evaluation.library_match import library_match

    digits, licence = experts_for(tiny_base)
    base, _ = load_base(tiny_base.path)
    blocks = annealed["blocks"]
    match = library_match(base, [licence, digits], annealed["second"].mixture, blocks["digits"][1])
    assert [e for e, _ in match.ranking] == ["digits-expert", "licence-expert"]
    assert match.ranking[0][1] < match.base_loss - 0.3
    match = library_match(base, [digits, licence], annealed["second"].mixture, blocks["licence"][1])
    assert match.ranking[0][0] == "licence-expert"
