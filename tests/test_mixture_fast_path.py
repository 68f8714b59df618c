"""The mixture's fast paths (factory.routed_lora: dense, gathered, padded bmm, grouped_mm,
segment loop) against the per-token gather they replaced, kept here as the reference: same
routes, outputs within 1e-5 in fp32, same router gradients (router annealing trains through the
mixture), forced routes; the same code in bf16 and, where there is one, on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_mixture_experts import domain_blocks, experts_for

import factory.routed_lora as routed_lora
from factory.base_model import load_base
from factory.expert import LORA_TARGETS, Expert, ExpertManifest, adapter_key, lora_config_dict
from factory.hashing import tensors_sha256
from factory.mixture import LayerRouting, MixtureModel
from factory.routed_lora import RoutePlan, route_plan, segment_matmul
from merging.router_annealing import route_loss


def reference_lora_delta(x_ND, route_ids_NK, weights_NK, a_ERD, b_EOR) -> torch.Tensor:
    """The gather the fast paths replaced: sum_k w[n,k] B[ids[n,k]] A[ids[n,k]] x[n], copying
    every token's chosen factors out ([N, K, R, D])."""
    h_NKR = torch.einsum("nkrd,nd->nkr", a_ERD[route_ids_NK], x_ND) * weights_NK.unsqueeze(-1)
    return torch.einsum("nkor,nkr->no", b_EOR[route_ids_NK], h_NKR)


class GatherMixture(MixtureModel):
    """The mixture's MLP as it was computed before the fast paths (same routing code)."""

    def _mlp_forward(self, layer, mlp, x_BTH):
        lead = x_BTH.shape[:-1]
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        ids_NK, weights_NK, probs, logits = self.route(layer, x_NH)
        if self._trace is not None:
            self._trace.append(
                LayerRouting(
                    layer,
                    ids_NK.view(*lead, -1),
                    weights_NK.detach().view(*lead, -1),
                    probs.detach().view(*lead, -1),
                    None if logits is None else logits.view(*lead, -1),
                )
            )
        if not self.experts or self._forced == -1:
            return mlp(x_BTH)
        is_null = ids_NK < 0
        ids_NK, weights_NK = ids_NK.clamp(min=0), weights_NK.masked_fill(is_null, 0.0)
        slots = self.slot_of_route[: len(self.experts)]  # the stacks are in slot order

        def project(name, inputs):
            a_ERD = getattr(self, f"lora_A_{name}")[layer][slots]
            b_EOR = getattr(self, f"lora_B_{name}")[layer][slots].transpose(-2, -1)
            delta = reference_lora_delta(inputs, ids_NK, weights_NK, a_ERD, b_EOR)
            return getattr(mlp, name)(inputs) + delta

        hidden = mlp.act_fn(project("gate_proj", x_NH)) * project("up_proj", x_NH)
        return project("down_proj", hidden).view(*lead, -1)


def random_expert(name: str, config, rank: int, seed: int) -> Expert:
    """An expert with random factors of ``rank`` (speed and equivalence do not need training)."""
    generator = torch.Generator().manual_seed(seed)
    dims = {
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    adapter = {}
    for layer in range(config.num_hidden_layers):
        for projection, (d_in, d_out) in dims.items():
            a = torch.randn(rank, d_in, generator=generator) * 0.2
            adapter[adapter_key(layer, projection, "A")] = a
            b = torch.randn(d_out, rank, generator=generator) * 0.2
            adapter[adapter_key(layer, projection, "B")] = b
    manifest = ExpertManifest(
        expert_id=name,
        domain=name,
        version=1,
        base_model="taas-embedded-tiny",
        base_model_sha256="0" * 64,
        adapter_sha256=tensors_sha256(adapter),
        rank=rank,
        lora_alpha=8.0,
        target_modules=sorted(LORA_TARGETS),
        num_layers=config.num_hidden_layers,
    )
    rows = torch.zeros(config.num_hidden_layers, config.hidden_size)
    return Expert(manifest, adapter, lora_config_dict(rank, 8.0), rows)


def _mixtures(tiny_base, top_k: int = 2, dtype=torch.float32):
    """(fast mixture, gather mixture) over one base: 2 trained + 3 random experts with mixed
    ranks (zero-padded stacks), random rows, a centered router and a trained-looking null."""
    base, _ = load_base(tiny_base.path, dtype=dtype)
    trained = experts_for(tiny_base)
    extra = [random_expert(f"random-{i}", base.config, rank, i) for i, rank in enumerate((2, 4, 2))]
    generator = torch.Generator().manual_seed(7)
    rows = torch.randn(len(trained) + len(extra), 2, 32, generator=generator) * 3
    built = []
    for cls in (MixtureModel, GatherMixture):
        mixture = cls(base, top_k=top_k, temperature=1.5)
        for expert, expert_rows in zip([*trained, *extra], rows, strict=True):
            mixture.add_expert(expert, expert_rows)
        mixture.set_router_center(torch.randn(2, 32, generator=torch.Generator().manual_seed(8)))
        with torch.no_grad():
            mixture.null_rows.copy_(torch.randn(2, 32, generator=torch.Generator().manual_seed(9)))
            mixture.null_bias.fill_(1.0)
        built.append(mixture)
    return built


def _blocks(tiny_base):
    blocks = domain_blocks(str(tiny_base.path))
    return torch.cat([blocks["digits"][1][:3], blocks["licence"][1][:3]])


PATHS = ("dense", "gathered", "padded", "grouped_mm", "segment_loop")


def _use_path(monkeypatch, path: str) -> None:
    monkeypatch.setattr(routed_lora, "GATHER_MAX_PAIRS", 10**6 if path == "gathered" else 0)
    monkeypatch.setattr(routed_lora, "DENSE_MAX_STACKED_RANK", 10**6 if path == "dense" else 0)
    monkeypatch.setattr(routed_lora, "PADDED_MAX_WASTE", 10**6 if path == "padded" else 0)
    if path == "segment_loop":
        monkeypatch.setattr(routed_lora, "_grouped_mm_works", lambda x, w: False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fast_paths_match_the_gather(tiny_base, monkeypatch, path, top_k):
    _use_path(monkeypatch, path)
    fast, gather = _mixtures(tiny_base, top_k)
    blocks = _blocks(tiny_base)
    with torch.no_grad():
        ours, our_trace = fast(blocks, return_routing=True)
        theirs, their_trace = gather(blocks, return_routing=True)
    # Layer 0 sees the same input, so its routing is identical; later layers see inputs that
    # differ by float rounding: the same routes, weights and probabilities within 1e-5.
    assert torch.equal(our_trace[0].probs_BTR, their_trace[0].probs_BTR)
    for mine, ref in zip(our_trace, their_trace, strict=True):
        assert torch.equal(mine.route_ids_BTK, ref.route_ids_BTK)
        torch.testing.assert_close(mine.weights_BTK, ref.weights_BTK, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.probs_BTR, ref.probs_BTR, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    # The routing is really mixed: the null route and at least four experts are chosen.
    chosen = torch.unique(torch.cat([r.route_ids_BTK.flatten() for r in our_trace])).tolist()
    assert -1 in chosen and len(chosen) >= 5
    base, _ = load_base(tiny_base.path)
    with torch.no_grad():
        assert (ours.logits - base(input_ids=blocks).logits).abs().max() > 1e-2


@pytest.mark.parametrize("path", PATHS)
def test_router_gradients_match_the_gather(tiny_base, monkeypatch, path):
    """Router annealing's loss (LM + ROUTE) through both mixtures: same router gradients."""
    _use_path(monkeypatch, path)
    blocks = _blocks(tiny_base)
    labels = torch.tensor([0, 0, 5, 1, 1, 5])  # digits, licence, the null route (column E)
    grads = []
    for mixture in _mixtures(tiny_base):
        output, trace = mixture(blocks, labels=blocks, return_routing=True)
        (output.loss + route_loss(trace, labels)).backward()
        grads.append([p.grad for p in (mixture.router_rows, mixture.null_rows, mixture.null_bias)])
    for mine, ref in zip(*grads, strict=True):
        assert ref.abs().max() > 1e-3  # the gradient is not trivially zero
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_forced_routes_match_the_gather(tiny_base, monkeypatch, path):
    _use_path(monkeypatch, path)
    fast, gather = _mixtures(tiny_base)
    blocks = _blocks(tiny_base)
    for route in ["base", *fast.expert_ids]:
        with torch.no_grad(), fast.forced_route(route), gather.forced_route(route):
            ours, theirs = fast(blocks).logits, gather(blocks).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_route_plan_sorts_pairs_by_expert_and_drops_the_null_route(monkeypatch):
    keys_NK = torch.tensor([[2, 0], [3, 1], [0, 2], [1, 3]])  # 3 experts; 3 = the null route
    weights_NK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    monkeypatch.setattr(routed_lora, "DENSE_MAX_STACKED_RANK", 0)
    monkeypatch.setattr(routed_lora, "GATHER_MAX_PAIRS", 0)
    monkeypatch.setattr(routed_lora, "PADDED_MAX_WASTE", 0)
    plan = route_plan(keys_NK, weights_NK, num_experts=3, rank=4)
    assert plan.token_P.tolist() == [0, 2, 1, 3, 0, 2]  # expert 0: tokens 0, 2; 1: 1, 3; 2: 0, 2
    assert plan.weight_P1[:, 0].tolist() == pytest.approx([0.4, 0.9, 0.3, 0.8, 0.6, 0.1])
    assert plan.counts == [2, 2, 2] and plan.offsets_E.tolist() == [2, 4, 6]
    monkeypatch.setattr(routed_lora, "DENSE_MAX_STACKED_RANK", 3 * 4)  # E * R
    dense = route_plan(keys_NK, weights_NK, num_experts=3, rank=4)
    expected = [[0.4, 0.0, 0.6], [0.0, 0.3, 0.0], [0.9, 0.0, 0.1], [0.0, 0.8, 0.0]]
    torch.testing.assert_close(dense.weights_NE, torch.tensor(expected))


def test_gathered_plan_keeps_token_order_and_zeroes_the_null_route():
    keys_NK = torch.tensor([[2, 0], [3, 1]])  # 3 experts; 3 = the null route
    weights_NK = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    plan = route_plan(keys_NK, weights_NK, num_experts=3, rank=64)  # E * R over the dense limit
    assert plan.token_P.tolist() == [0, 0, 1, 1] and plan.expert_P.tolist() == [2, 0, 0, 1]
    assert plan.weight_P1[:, 0].tolist() == pytest.approx([0.6, 0.4, 0.0, 0.3])
    x_PD = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    w_EDO = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([x_PD[i] @ w_EDO[e] for i, e in enumerate([2, 0, 0, 1])])
    torch.testing.assert_close(segment_matmul(x_PD, w_EDO, plan), expected, atol=1e-6, rtol=0)


def test_padded_plan_puts_each_experts_pairs_in_its_own_slots_and_pads_with_zero_weight(
    monkeypatch,
):
    keys_NK = torch.tensor([[0, 1], [0, 3], [2, 0]])  # 3 experts; 3 = the null route
    weights_NK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    monkeypatch.setattr(routed_lora, "DENSE_MAX_STACKED_RANK", 0)
    monkeypatch.setattr(routed_lora, "GATHER_MAX_PAIRS", 0)
    plan = route_plan(keys_NK, weights_NK, num_experts=3, rank=4)
    # 5 pairs to experts; the longest segment (expert 0: tokens 0, 1, 2) sets capacity 3, and
    # 3 * 3 = 9 slots are within PADDED_MAX_WASTE (2) x 5 pairs
    assert plan.capacity == 3 and plan.counts == [3, 1, 1] and plan.offsets_E is None
    assert plan.token_P.tolist() == [0, 1, 2, 0, 0, 0, 2, 0, 0]
    expected = [0.6, 0.7, 0.1, 0.4, 0.0, 0.0, 0.9, 0.0, 0.0]
    assert plan.weight_P1[:, 0].tolist() == pytest.approx(expected)
    x_PD = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    w_EDO = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    out = segment_matmul(x_PD, w_EDO, plan)
    torch.testing.assert_close(out[3:6], x_PD[3:6] @ w_EDO[1], atol=1e-6, rtol=0)
    # skewed routing (every token to expert 0) would pad 3 slots per pair: the segment form
    skewed = route_plan(torch.tensor([[0, 3], [0, 3], [0, 3]]), weights_NK, 3, 4)
    assert skewed.capacity is None and skewed.offsets_E.tolist() == [3, 3, 3]


def test_segment_matmul_grouped_mm_and_loop_agree_with_empty_segments(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x_PD = torch.randn(7, 6, generator=generator, requires_grad=True)
    w_EDO = torch.randn(4, 6, 5, generator=generator)
    plan = RoutePlan(offsets_E=torch.tensor([3, 3, 7, 7], dtype=torch.int32), counts=[3, 0, 4, 0])
    expected = torch.cat([x_PD[:3] @ w_EDO[0], x_PD[3:] @ w_EDO[2]])
    grad_out = torch.randn(7, 5, generator=generator)
    (expected_grad,) = torch.autograd.grad(expected, x_PD, grad_out)
    for works in (True, False):
        if not works:
            monkeypatch.setattr(routed_lora, "_grouped_mm_works", lambda x, w: False)
        out = segment_matmul(x_PD, w_EDO, plan)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        (grad,) = torch.autograd.grad(out, x_PD, grad_out)
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_base_gives_a_bf16_mixture_close_to_fp32(tiny_base, monkeypatch, path):
    _use_path(monkeypatch, path)
    fast32, _ = _mixtures(tiny_base)
    fast16, gather16 = _mixtures(tiny_base, dtype=torch.bfloat16)
    assert fast16.lora_At_gate_up.dtype == fast16.lora_B_down_proj.dtype == torch.bfloat16
    blocks = _blocks(tiny_base)
    with torch.no_grad():
        logits32 = fast32(blocks).logits
        logits16, gather_logits16 = fast16(blocks).logits, gather16(blocks).logits
    assert logits16.dtype == torch.bfloat16
    # bf16 rounding (8 bits of mantissa) through two layers; the routes may flip on near ties.
    assert (logits16.float() - logits32).abs().mean() < 0.05
    assert (logits16.float() - gather_logits16.float()).abs().mean() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_code_runs_on_a_gpu(tiny_base, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, _ = _mixtures(tiny_base)
    fast, gather = (m.to("cuda", dtype) for m in _mixtures(tiny_base, dtype=dtype))
    blocks = _blocks(tiny_base)
    with torch.no_grad():
        expected = cpu(blocks).logits
        ours, trace = fast(blocks.cuda(), return_routing=True)
        theirs = gather(blocks.cuda()).logits
    assert ours.logits.device.type == "cuda" and ours.logits.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    assert (ours.logits.float() - theirs.float()).abs().mean() < tolerance
    assert (ours.logits.float().cpu() - expected).abs().mean() < tolerance
    assert trace[0].route_ids_BTK.device.type == "cuda"
