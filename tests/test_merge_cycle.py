"""One cycle end to end on the tiny base: honest work earns, noise and copies earn nothing.

The honest candidates are LoRA adapters really trained a few steps with plain torch on the
held-out distribution (same generator, other samples); the noise candidate is random LoRA
weights; the copies reuse an honest adapter under another contributor's name.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from evaluation.gate import GateContext, Reason
from evaluation.proof_of_loss import PolEvaluator
from factory.base_model import load_base
from factory.candidate import CandidateManifest, write_candidate
from factory.expert import lora_config_dict
from factory.hashing import tensors_sha256
from factory.ledger import Ledger
from factory.signing import generate_key, public_key_b64
from merging.cycle_merge import MergeConfig, merge_cycle, to_json
from merging.lora_algebra import adapter_rank, lora_shapes
from merging.wise_ft import interpolate
from tasks.scoring import alpha_search_task, merge_cycle_task
from tests.test_proof_of_loss import SEQ_LEN, domain_text, save_blocks

CONFIG = lora_config_dict(4, 8.0)
GOLDEN = json.loads((Path(__file__).parent / "assets" / "scoring_golden.json").read_text())
DEADLINE = datetime(2030, 1, 1, tzinfo=UTC)
PEOPLE = ("alice", "bob", "carol", "dave", "erin")


def train_lora(base_path, tokenizer, seed: int, steps: int = 25) -> dict[str, torch.Tensor]:
    """A few AdamW steps of a LoRA on fresh domain text (plain torch, no trainer)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model, _ = load_base(base_path)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig.from_peft_type(**CONFIG))
    ids = tokenizer(domain_text(100 + seed, 200))["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def cycle(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("cycle")
    model, tokenizer = load_base(tiny_base.path)
    heldout = save_blocks(tokenizer, domain_text(1, 120), root / "heldout")
    general = " ".join(m.__doc__ for m in (json, os, torch.nn.functional) if m.__doc__)
    general_path = save_blocks(tokenizer, general * 3, root / "general")
    honest = train_lora(tiny_base.path, tokenizer, seed=1)
    honest2 = train_lora(tiny_base.path, tokenizer, seed=2)
    gen = torch.Generator().manual_seed(3)
    noise = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in honest.items()}
    near = {k: v + 1e-4 * torch.randn(v.shape, generator=gen) for k, v in honest.items()}
    ledger = Ledger(f"sqlite:///{root / 'ledger.db'}")
    keys = {p: generate_key() for p in PEOPLE}
    for person, key in keys.items():
        ledger.register_contributor(person, public_key_b64(key))

    def submit(name, person, tensors):
        manifest = CandidateManifest(
            candidate_id=name,
            expert_id="pumps",
            cycle=1,
            contributor_id=person,
            base_model_sha256=tiny_base.sha256,
            parent_adapter_sha256=None,
            adapter_sha256=tensors_sha256(tensors),
            data_shard=name,
            seed=0,
            steps=25,
            tokens_seen=25 * 8 * SEQ_LEN,
            created_at="2029-06-01T00:00:00+00:00",
        )
        files = write_candidate(root / "inbox" / name, tensors, CONFIG, manifest, keys[person])
        os.utime(files.manifest, (DEADLINE.timestamp() - 60,) * 2)
        return files

    cfg = model.config
    ctx = GateContext(
        expert_id="pumps",
        cycle=1,
        base_model_sha256=tiny_base.sha256,
        current_adapter_sha256=None,
        deadline=DEADLINE,
        keys=ledger,
        reference_shapes=lora_shapes(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            4,
            CONFIG["target_modules"],
        ),
        adapter_config=CONFIG,
    )
    candidates = [
        submit("honest", "alice", honest),
        submit("noise", "bob", noise),
        submit("copy", "carol", honest),
        submit("near-copy", "dave", near),
        submit("honest-2", "erin", honest2),
    ]
    return {
        "tiny_base": tiny_base,
        "heldout": heldout,
        "general": general_path,
        "ctx": ctx,
        "candidates": candidates,
        "ledger": ledger,
        "honest": honest,
        "honest2": honest2,
        "noise": noise,
    }


def _evaluator(c):
    return PolEvaluator(c["tiny_base"].path, c["heldout"], 4, 4, seed=0, adapter_config=CONFIG)


CFG = MergeConfig(space="delta", outer_lr=1.0, top_k=None, power=1.0, nesterov_momentum=0.0)
FACTORS = CFG.model_copy(update={"space": "factors"})


def test_cycle_rewards_honest_work_only(cycle):
    outcome = merge_cycle(
        None,
        CONFIG,
        cycle["candidates"],
        cycle["ctx"],
        _evaluator(cycle),
        CFG,
        ledger=cycle["ledger"],
        cycle_key="cycle-1",
    )
    reasons = [d.reason for d in outcome.decisions]
    assert reasons == [None, None, Reason.DUPLICATE, Reason.DUPLICATE, None]
    honest, noise, _, _, honest2 = outcome.reports
    base = outcome.current_loss.mean  # cycle 1: L(current) is the base's loss
    assert honest.mean < base - 0.05 and honest2.mean < base - 0.05
    assert noise.mean > base  # loss-increasing: score 0, never merged
    assert outcome.scores[1] == 0.0 and outcome.weights[1] == 0.0
    assert outcome.scores[0] == pytest.approx(base - honest.mean, abs=1e-12)
    assert outcome.weights[0] + outcome.weights[4] == pytest.approx(1.0, abs=1e-12)
    assert outcome.weights[0] == pytest.approx(
        outcome.scores[0] / (outcome.scores[0] + outcome.scores[4]), abs=1e-12
    )
    shares = outcome.shares
    assert sum(shares.values()) == Decimal(1)
    assert shares["bob"] == shares["carol"] == shares["dave"] == Decimal(0)
    assert shares["alice"] > 0 and shares["erin"] > 0
    assert float(shares["alice"]) == pytest.approx(outcome.weights[0], abs=1e-12)
    assert outcome.improved and outcome.new_loss.mean < base
    assert outcome.adapter_config["r"] == 8  # delta space: honest + honest-2 stacked
    rows = {r.contributor_id: r for r in cycle["ledger"].shares_for("pumps")}
    assert {c: Decimal(r.share) for c, r in rows.items()} == shares
    assert rows["alice"].expert_version == outcome.adapter_sha256
    summary = json.loads(json.dumps(to_json(outcome)))
    assert summary["candidates"][2]["reason"] == "duplicate"
    assert len(summary["current_loss"]["per_batch"]) == 4

    # the same inputs, a fresh evaluator: the same scores and the same merged sha256
    again = merge_cycle_task.fn(
        None, CONFIG, cycle["candidates"], cycle["ctx"], _evaluator(cycle), CFG
    )
    assert again.scores == outcome.scores
    assert again.adapter_sha256 == outcome.adapter_sha256


def test_no_positive_candidate_keeps_the_current_version(cycle):
    only_noise = [cycle["candidates"][1]]
    outcome = merge_cycle(None, CONFIG, only_noise, cycle["ctx"], _evaluator(cycle), CFG)
    assert not outcome.improved and "no improvement" in outcome.note
    assert outcome.adapter is None and outcome.weights == [0.0]
    assert outcome.adapter_config == CONFIG
    assert outcome.shares == {"bob": Decimal(0)}
    assert outcome.new_loss == outcome.current_loss


def test_single_honest_candidate_with_lr_one_is_that_candidate(cycle):
    outcome = merge_cycle(
        None, CONFIG, cycle["candidates"][:2], cycle["ctx"], _evaluator(cycle), CFG
    )
    assert outcome.adapter_sha256 == tensors_sha256(cycle["honest"])
    assert outcome.new_loss.per_batch == outcome.reports[0].per_batch


def test_wise_ft_alpha_search_on_real_losses(cycle, tmp_path):
    domain = _evaluator(cycle)
    general = PolEvaluator(cycle["tiny_base"].path, cycle["general"], 4, 2, 0, CONFIG)
    prev, merged = cycle["honest2"], cycle["honest"]
    search = alpha_search_task.fn(prev, CONFIG, merged, CONFIG, [0.5, 1.0], domain, general, 10.0)
    alphas = [p.alpha for p in search.curve]
    assert alphas == [0.0, 0.5, 1.0]
    assert search.curve[0].domain_loss == domain.loss(prev).mean
    assert search.curve[2].domain_loss == domain.loss(merged).mean
    best = min(search.curve, key=lambda p: (p.domain_loss, p.alpha))
    assert search.chosen == best.alpha  # the budget is loose: the best domain loss wins
    adapter, config = interpolate(prev, CONFIG, merged, CONFIG, search.chosen)
    assert tensors_sha256(search.adapter) == tensors_sha256(adapter)
    assert search.adapter_config == config
    # a zero budget relative to the base's general loss only admits alphas that do not regress
    strict = alpha_search_task.fn(prev, CONFIG, merged, CONFIG, [0.5, 1.0], domain, general, 0.0)
    for point in strict.curve:
        if point.alpha == strict.chosen and point.alpha > 0:
            assert point.general_loss <= strict.base_general_loss
    assert json.dumps(strict.to_json())


@pytest.mark.slow  # starts Prefect's ephemeral API (15-20 s idle, minutes on a loaded machine)
def test_scoring_task_runs_inside_a_prefect_flow(cycle):
    from prefect import flow

    assert merge_cycle_task.retries == 0 and alpha_search_task.retries == 0

    @flow(name="score-cycle-check")
    def score_cycle():
        return merge_cycle_task(
            None, CONFIG, cycle["candidates"][:2], cycle["ctx"], _evaluator(cycle), CFG
        )

    outcome = score_cycle()
    assert outcome.adapter_sha256 == tensors_sha256(cycle["honest"])
    assert [d.reason for d in outcome.decisions] == [None, None]


def test_delta_space_merge_of_honest_candidates_beats_factor_space(cycle):
    """Averaging A and B separately adds cross terms B_i A_j; merging the deltas does not."""
    honest_pair = [cycle["candidates"][0], cycle["candidates"][4]]
    evaluator = _evaluator(cycle)
    delta = merge_cycle(None, CONFIG, honest_pair, cycle["ctx"], evaluator, CFG)
    factors = merge_cycle(None, CONFIG, honest_pair, cycle["ctx"], evaluator, FACTORS)
    g = GOLDEN["tiny_base_honest_merge"]
    singles = [r.mean for r in delta.reports]
    assert delta.improved and factors.improved
    # delta space: one stacked adapter of rank 4 + 4 at the candidates' lora_alpha
    assert delta.adapter_config == {**CONFIG, "r": 8}
    assert factors.adapter_config == CONFIG and adapter_rank(factors.adapter) == 4
    assert delta.weights == factors.weights and delta.scores == factors.scores
    # about as good as the better candidate alone (measured: +0.0073), clearly better than
    # averaging the factors (measured: 0.088 lower)
    assert delta.new_loss.mean <= min(singles) + g["delta_over_best_single_max"]
    assert delta.new_loss.mean < factors.new_loss.mean - 0.05
    assert factors.new_loss.mean > max(singles)  # the cross terms hurt: worse than either
    measured = [delta.current_loss.mean, *singles, delta.new_loss.mean, factors.new_loss.mean]
    expected = [g["base"], g["honest"], g["honest_2"], g["delta_space"], g["factor_space"]]
    assert measured == pytest.approx(expected, abs=g["tolerance"])
    # the merged adapter is evaluated under its own config: the same loss from a fresh evaluator
    again = _evaluator(cycle).loss(delta.adapter, delta.adapter_config)
    assert again.per_batch == delta.new_loss.per_batch


def test_a_merge_gaining_less_than_min_gain_keeps_the_current_version(cycle):
    pair = cycle["candidates"][:2]  # honest + noise: the honest one alone is merged
    plain = merge_cycle(None, CONFIG, pair, cycle["ctx"], _evaluator(cycle), CFG)
    gain = plain.current_loss.mean - plain.new_loss.mean
    assert plain.improved and gain > 0.05
    above = CFG.model_copy(update={"min_gain": gain + 1e-6})
    held = merge_cycle(None, CONFIG, pair, cycle["ctx"], _evaluator(cycle), above)
    assert not held.improved and held.adapter is None and held.new_loss == held.current_loss
    assert "merge.min_gain" in held.note
    assert held.scores == plain.scores  # the candidates' work is scored the same either way
    below = CFG.model_copy(update={"min_gain": gain - 1e-6})
    merged = merge_cycle(None, CONFIG, pair, cycle["ctx"], _evaluator(cycle), below)
    assert merged.improved and merged.adapter_sha256 == plain.adapter_sha256
