"""One mixture from expert folders: the flow's load_mixture, `taas generate` and the marketplace
demo build the same mixture (null route and router center included) and route alike."""

from __future__ import annotations

import pytest
import torch

from cli.generate import load_generate_mixture
from factory.base_model import load_base
from factory.expert import (
    LORA_TARGETS,
    NULL_ROUTE_FILE,
    Expert,
    ExpertManifest,
    adapter_key,
    load_expert,
    lora_config_dict,
    save_expert,
)
from factory.hashing import tensors_sha256
from factory.mixture import MixtureModel, generate_with_routes, load_mixture
from marketplace.demo import ExpertHandle, RoutedGenerator

PROMPT = "The licensee shall pay 17 + 25 = 42 ; and 3 * 9 = 27 ;"


def _expert(tiny_base, base, expert_id: str, seed: int, null_route=None) -> Expert:
    """A small random LoRA expert (rank 2) on every MLP projection, with random router rows."""
    generator = torch.Generator().manual_seed(seed)
    config = base.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    shapes = {
        "gate_proj": (config.intermediate_size, hidden),
        "up_proj": (config.intermediate_size, hidden),
        "down_proj": (hidden, config.intermediate_size),
    }
    adapter = {}
    for layer in range(layers):
        for projection in LORA_TARGETS:
            out_dim, in_dim = shapes[projection]
            a = torch.randn(2, in_dim, generator=generator) * 0.3
            b = torch.randn(out_dim, 2, generator=generator) * 0.3
            adapter[adapter_key(layer, projection, "A")] = a
            adapter[adapter_key(layer, projection, "B")] = b
    manifest = ExpertManifest(
        expert_id=expert_id,
        domain=expert_id,
        version=1,
        base_model=tiny_base.name,
        base_model_sha256=tiny_base.sha256,
        adapter_sha256=tensors_sha256(adapter),
        rank=2,
        lora_alpha=4.0,
        target_modules=sorted(LORA_TARGETS),
        num_layers=layers,
    )
    router = torch.randn(layers, hidden, generator=generator)
    return Expert(manifest, adapter, lora_config_dict(2, 4.0), router, null_route=null_route)


@pytest.fixture(scope="module")
def expert_folders(tiny_base, tmp_path_factory):
    """Two experts; the second (the later composition) carries a trained-looking null route."""
    base, _ = load_base(tiny_base.path)
    layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    null_route = {
        "null_rows": torch.randn(layers, hidden, generator=generator),
        "null_bias": torch.full((layers,), 1.5),
        "router_center": torch.randn(layers, hidden, generator=generator),
    }
    root = tmp_path_factory.mktemp("mixture-load")
    first = _expert(tiny_base, base, "alpha-expert", 1)
    second = _expert(tiny_base, base, "beta-expert", 2, null_route)
    return [save_expert(root / e.manifest.expert_id, e) for e in (first, second)]


def _run(mixture: MixtureModel, ids: torch.Tensor):
    with torch.no_grad():
        output, trace = mixture(ids, return_routing=True)
    return output.logits, trace


def test_flow_generate_and_marketplace_build_the_same_mixture(tiny_base, expert_folders):
    base, tokenizer = load_base(tiny_base.path)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    flow = load_mixture(base.eval(), expert_folders, top_k=2)
    generate, _ = load_generate_mixture(expert_folders, tiny_base.path, top_k=2)
    demo = RoutedGenerator(tiny_base.path, max_prompt_tokens=64, max_new_tokens=4, top_k=2)
    handles = [ExpertHandle(f.name, "1", f) for f in expert_folders]
    market, _ = demo._mixture(handles)

    reference_logits, reference_trace = _run(flow, ids)
    for other in (generate, market):
        assert other.expert_ids == ["alpha-expert", "beta-expert"]
        logits, trace = _run(other, ids)
        assert torch.equal(logits, reference_logits)
        for got, want in zip(trace, reference_trace, strict=True):
            assert torch.equal(got.route_ids_BTK, want.route_ids_BTK)
            assert torch.equal(got.probs_BTR, want.probs_BTR)

    # The saved null route and router center are in effect: without them (the experts alone)
    # the routes and logits differ, and with them some tokens take the base route.
    saved = load_file_state(expert_folders[1])
    assert torch.equal(flow.router_center, saved["router_center"])
    assert torch.equal(flow.null_bias, saved["null_bias"])
    bare = MixtureModel.from_experts(base, [load_expert(f) for f in expert_folders], top_k=2)
    bare_logits, bare_trace = _run(bare, ids)
    assert not torch.equal(bare_logits, reference_logits)
    assert any((r.route_ids_BTK == -1).any() for r in reference_trace)
    assert any(
        not torch.equal(a.route_ids_BTK, b.route_ids_BTK)
        for a, b in zip(bare_trace, reference_trace, strict=True)
    )

    # Streamed tokens from the marketplace match the flow mixture's greedy tokens and routes.
    streamed = list(demo.stream(handles, PROMPT, 3))
    text, routed = generate_with_routes(flow, tokenizer, PROMPT, 3)
    assert "".join(t.text for t in streamed) == text
    # Handles are named by their folders, which are named by expert id.
    assert [t.expert for t in streamed] == [route for _, route in routed]


def load_file_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / NULL_ROUTE_FILE))


def test_null_route_of_the_last_folder_that_carries_one(tiny_base, expert_folders):
    base, _ = load_base(tiny_base.path)
    reversed_order = load_mixture(base, list(reversed(expert_folders)))
    saved = load_file_state(expert_folders[1])
    # The folder with the null route is first now, yet the only one that carries it.
    assert reversed_order.expert_ids == ["beta-expert", "alpha-expert"]
    assert torch.equal(reversed_order.null_rows, saved["null_rows"])
    alone = load_mixture(base, expert_folders[:1])
    assert alone.null_bias.abs().sum() == 0 and alone.router_center.abs().sum() == 0


def test_a_malformed_null_route_is_refused_with_the_file_named(tiny_base, expert_folders, tmp_path):
    from safetensors.torch import save_file

    expert = load_expert(expert_folders[1])
    expert.null_route = None
    folder = tmp_path / "torn"
    bad = {"null_rows": torch.zeros(1, 3), "null_bias": torch.zeros(1)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    save_expert(
        folder, expert, extra_files={NULL_ROUTE_FILE: (tmp_path / "bad.safetensors").read_bytes()}
    )
    with pytest.raises(ValueError, match=r"null_route\.safetensors: tensor 'null_rows' has shape"):
        load_expert(folder)
