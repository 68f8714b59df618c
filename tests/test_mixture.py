"""The routed mixture: routing properties, exactness against the base and peft, add/remove,
loading from folders, generation with routes and the ``taas generate`` command."""

from __future__ import annotations

import torch
from test_mixture_experts import domain_blocks, experts_for

from factory.base_model import load_base
from factory.expert import save_expert
from factory.mixture import (
    MixtureModel,
    generate_batch_with_routes,
    generate_with_routes,
    load_mixture,
    majority_route,
    stream_routes,
)


def _random_rows(expert, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(expert.router.shape, generator=generator)


def _mixture(tiny_base, top_k: int = 2):
    digits, licence = experts_for(tiny_base)
    base, tokenizer = load_base(tiny_base.path)
    mixture = MixtureModel(base, top_k=top_k)
    mixture.add_expert(digits, _random_rows(digits, 1))
    mixture.add_expert(licence, _random_rows(licence, 2))
    return mixture, tokenizer


def _blocks(tiny_base):
    blocks = domain_blocks(str(tiny_base.path))
    return torch.cat([blocks["digits"][1][:4], blocks["licence"][1][:4]])


def test_routing_probabilities_sum_to_one_for_every_token(tiny_base):
    mixture, _ = _mixture(tiny_base)
    with torch.no_grad():
        _, trace = mixture(_blocks(tiny_base), return_routing=True)
    assert len(trace) == mixture.num_layers
    for routing in trace:
        assert routing.probs_BTR.shape == (8, 32, 3)
        assert routing.route_ids_BTK.shape == routing.weights_BTK.shape == (8, 32, 2)
        torch.testing.assert_close(routing.probs_BTR.sum(-1), torch.ones(8, 32))
        torch.testing.assert_close(routing.weights_BTK.sum(-1), torch.ones(8, 32))
        assert ((routing.route_ids_BTK >= -1) & (routing.route_ids_BTK < 2)).all()
    # Random rows route different tokens to different places: the routing is really per token.
    assert len(torch.unique(trace[0].route_ids_BTK[..., 0])) >= 2


def test_null_route_and_empty_mixture_reproduce_the_base_exactly(tiny_base):
    mixture, _ = _mixture(tiny_base)
    blocks = _blocks(tiny_base)
    base, _ = load_base(tiny_base.path)
    with torch.no_grad():
        expected = base(input_ids=blocks).logits
        with mixture.forced_route("base"):
            forced = mixture(blocks).logits
        empty = MixtureModel(base)(blocks).logits
        # Learned routing where the null route always wins (huge null bias, top-1).
        mixture.top_k = 1
        mixture.null_bias.fill_(1e4)
        null_wins = mixture(blocks).logits
        routed = MixtureModel.from_experts(base, list(mixture.experts))(blocks).logits
    assert torch.equal(forced, expected)
    assert torch.equal(empty, expected)
    assert torch.equal(null_wins, expected)
    assert (routed - expected).abs().max() > 1e-3  # the experts do change the output


def test_forced_single_expert_matches_peft(tiny_base, tmp_path):
    from peft import PeftModel

    digits, _ = experts_for(tiny_base)
    folder = save_expert(tmp_path / "digits", digits)
    base, _ = load_base(tiny_base.path)
    mixture = MixtureModel.from_experts(base, [digits])
    blocks = _blocks(tiny_base)
    with torch.no_grad(), mixture.forced_route("digits-expert"):
        ours = mixture(blocks).logits
    peft_model = PeftModel.from_pretrained(load_base(tiny_base.path)[0], str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=blocks).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (theirs - base(input_ids=blocks).logits).abs().max() > 1e-2


def test_add_remove_round_trip_and_loading_from_folders(tiny_base, tmp_path):
    mixture, _ = _mixture(tiny_base)
    blocks = _blocks(tiny_base)
    with torch.no_grad():
        before = mixture(blocks).logits
        digits = mixture.remove_expert("digits-expert")
        assert mixture.expert_ids == ["licence-expert"]
        assert mixture.router_rows.shape == (2, 1, 32)
        assert not torch.equal(mixture(blocks).logits, before)
        mixture.add_expert(digits, _random_rows(digits, 1))
        assert mixture.expert_ids == ["licence-expert", "digits-expert"]
        # Order of experts does not matter to the math (ties aside): same logits.
        torch.testing.assert_close(mixture(blocks).logits, before, atol=1e-6, rtol=0)
    try:
        mixture.add_expert(digits)
    except ValueError as exc:
        assert "already in the mixture" in str(exc)
    else:
        raise AssertionError("a duplicate expert must be refused")

    # Experts saved with their rows and reloaded from folders reproduce the mixture exactly.
    folders = []
    for index, expert in enumerate(mixture.experts):
        expert.router = mixture.router_rows[:, index].detach().clone()
        folders.append(save_expert(tmp_path / expert.manifest.expert_id, expert))
    base, _ = load_base(tiny_base.path)
    reloaded = load_mixture(base, folders)
    with torch.no_grad():
        assert torch.equal(reloaded(blocks).logits, mixture(blocks).logits)


def test_generate_reports_a_route_per_token(tiny_base):
    mixture, tokenizer = _mixture(tiny_base)
    text, routed = generate_with_routes(mixture, tokenizer, "12 + 30 = 42 ;", 6, greedy=True)
    assert 1 <= len(routed) <= 6
    assert "".join(token for token, _ in routed) == text
    assert {route for _, route in routed} <= {"base", "digits-expert", "licence-expert"}
    again, _ = generate_with_routes(mixture, tokenizer, "12 + 30 = 42 ;", 6, greedy=True)
    assert again == text


def _mixed_mixture(tiny_base):
    """The two experts with random rows plus a null route that wins some tokens: the routes
    of a generation then change from token to token."""
    mixture, tokenizer = _mixture(tiny_base)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        mixture.router_rows.mul_(3.0)
        mixture.null_rows.copy_(torch.randn(2, 32, generator=generator) * 3.0)
    return mixture, tokenizer


def _steps(mixture, tokenizer, prompts, num_steps, use_cache=True):
    """[(tokens [B], routes [B], logits [B, V])] of greedy decoding of left-padded prompts."""
    token_lists = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in token_lists)
    ids = torch.tensor([[0] * (width - len(t)) + t for t in token_lists])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in token_lists])
    steps = stream_routes(mixture, ids, mask, num_steps, use_cache=use_cache)
    return [tuple(step) for step in steps]


PROMPTS = ["12 + 30 = 42 ; 7 * 6 =", "Permission", "THE SOFTWARE IS PROVIDED AS IS"]


def test_kv_cache_generation_gives_the_tokens_and_routes_of_the_full_rerun(tiny_base):
    mixture, tokenizer = _mixed_mixture(tiny_base)
    routes_seen = set()
    for prompt in PROMPTS:
        cached = _steps(mixture, tokenizer, [prompt], 16, use_cache=True)
        rerun = _steps(mixture, tokenizer, [prompt], 16, use_cache=False)
        assert len(cached) == len(rerun) == 16
        for (tokens, routes, logits), reference in zip(cached, rerun, strict=True):
            assert torch.equal(tokens, reference[0]) and torch.equal(routes, reference[1])
            torch.testing.assert_close(logits, reference[2], atol=1e-5, rtol=0)
            routes_seen.add(int(routes[0]))
        assert generate_with_routes(mixture, tokenizer, prompt, 16) == generate_with_routes(
            mixture, tokenizer, prompt, 16, use_cache=False
        )
        # Sampling draws the same tokens too: the logits match, the generator is seeded.
        sampled = [
            generate_with_routes(mixture, tokenizer, prompt, 8, greedy=False, seed=3, use_cache=c)
            for c in (True, False)
        ]
        assert sampled[0] == sampled[1]
    assert len(routes_seen) >= 2  # the comparison covers route changes, not one fixed route


def test_batched_prompts_generate_what_each_prompt_generates_alone(tiny_base):
    mixture, tokenizer = _mixed_mixture(tiny_base)
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == 3  # left padding is really exercised
    batched = _steps(mixture, tokenizer, PROMPTS, 10)
    for row, prompt in enumerate(PROMPTS):
        for (tokens, routes, logits), (tokens_1, routes_1, logits_1) in zip(
            batched, _steps(mixture, tokenizer, [prompt], 10), strict=True
        ):
            assert tokens[row] == tokens_1[0] and routes[row] == routes_1[0]
            torch.testing.assert_close(logits[row], logits_1[0], atol=1e-5, rtol=0)
    alone = [generate_with_routes(mixture, tokenizer, p, 12) for p in PROMPTS]
    assert generate_batch_with_routes(mixture, tokenizer, PROMPTS, 12) == alone
    assert generate_batch_with_routes(mixture, tokenizer, PROMPTS, 12, use_cache=False) == alone
    try:
        generate_batch_with_routes(mixture, tokenizer, [], 4)
    except ValueError as exc:
        assert "prompts" in str(exc)
    else:
        raise AssertionError("an empty batch must be refused")


def test_majority_route_breaks_ties_by_probability():
    from factory.mixture import LayerRouting

    probs = [torch.tensor([[[0.6, 0.3, 0.1]]]), torch.tensor([[[0.2, 0.7, 0.1]]])]
    trace = [
        LayerRouting(0, torch.tensor([[[0]]]), torch.ones(1, 1, 1), probs[0]),
        LayerRouting(1, torch.tensor([[[1]]]), torch.ones(1, 1, 1), probs[1]),
    ]
    assert majority_route(trace).tolist() == [[1]]  # one vote each; mean prob 0.5 > 0.4
    trace[1] = LayerRouting(1, torch.tensor([[[-1]]]), torch.ones(1, 1, 1), probs[1])
    trace.append(LayerRouting(2, torch.tensor([[[-1]]]), torch.ones(1, 1, 1), probs[1]))
    assert majority_route(trace).tolist() == [[-1]]  # two of three layers chose the base


def test_cli_generate_prints_tokens_with_experts(tiny_base, tmp_path, capsys):
    from cli.main import main

    digits, licence = experts_for(tiny_base)
    folders = [save_expert(tmp_path / e.manifest.expert_id, e) for e in (digits, licence)]
    code = main(
        [
            "generate",
            "--experts",
            ",".join(str(f) for f in folders),
            "--base",
            str(tiny_base.path),
            "--prompt",
            "7 * 6 =",
            "--max-new-tokens",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) >= 2
    assert any("digits-expert" in line or "base" in line or "licence" in line for line in lines)
    assert main(["generate", "--experts", str(tmp_path / "nope"), "--prompt", "x"]) == 2


def test_router_state_round_trips_through_safetensors(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    mixture, _ = _mixture(tiny_base)
    blocks = _blocks(tiny_base)
    generator = torch.Generator().manual_seed(3)
    mixture.set_router_center(torch.randn(2, 32, generator=generator))
    with torch.no_grad():
        mixture.null_rows.copy_(torch.randn(2, 32, generator=generator))
        mixture.null_bias.fill_(0.5)
        before, trace = mixture(blocks, return_routing=True)
    # The center changes routing: the same rows with no center route differently.
    twin = mixture.copy()
    twin.set_router_center(torch.zeros(2, 32))
    with torch.no_grad():
        _, uncentered = twin(blocks, return_routing=True)
    assert not torch.equal(uncentered[0].probs_BTR, trace[0].probs_BTR)
    # null_route() carries the center (flows save it as null_route.safetensors)...
    save_file(mixture.null_route(), str(tmp_path / "null_route.safetensors"))
    save_file(mixture.router_state(), str(tmp_path / "router_state.safetensors"))
    base, _ = load_base(tiny_base.path)
    reloaded = MixtureModel.from_experts(base, list(mixture.experts))
    reloaded.load_router_state(load_file(str(tmp_path / "router_state.safetensors")))
    with torch.no_grad():
        assert torch.equal(reloaded(blocks).logits, before.logits)
    again = mixture.copy()
    again.load_null_route(load_file(str(tmp_path / "null_route.safetensors")))
    with torch.no_grad():
        assert torch.equal(again(blocks).logits, before.logits)
    # ...and a null route saved before centering existed loads as "no center".
    again.load_null_route({"null_rows": mixture.null_rows, "null_bias": mixture.null_bias})
    assert again.router_center.abs().sum() == 0
    try:
        mixture.set_router_center(torch.zeros(3, 32))
    except ValueError as exc:
        assert "num_layers" in str(exc)
    else:
        raise AssertionError("a center of the wrong shape must be refused")
