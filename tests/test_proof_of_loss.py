"""Proof-of-Loss: golden scores, seeded batches, and the evaluator's exact, repeatable losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evaluation.proof_of_loss import (
    PolEvaluator,
    block_loss_sum,
    heldout_batch_indices,
    mean_finite_loss,
    pol_score,
)
from factory.base_model import load_base
from factory.expert import lora_config_dict
from merging.lora_algebra import effective_deltas, stack_adapters

GOLDEN = json.loads((Path(__file__).parent / "assets" / "scoring_golden.json").read_text())
CONFIG = lora_config_dict(4, 8.0)
SEQ_LEN = 32


@pytest.mark.parametrize("case", GOLDEN["pol_score"])
def test_pol_score_golden(case):
    score = pol_score(case["current"], float(case["candidate"]), case["p"])
    assert score == pytest.approx(case["expected"], abs=GOLDEN["tolerance"])


def test_pol_score_refuses_a_non_finite_current_loss():
    with pytest.raises(ValueError, match="current_loss"):
        pol_score(math.inf, 1.0, 1.0)


def test_mean_finite_loss_drops_non_finite_batches():
    assert mean_finite_loss([2.0, math.nan, 4.0, math.inf]) == 3.0
    assert mean_finite_loss([math.nan, math.inf]) == math.inf


def test_heldout_batches_are_seeded_and_do_not_repeat_within_a_pass():
    batches = heldout_batch_indices(10, 3, 3, seed=4)
    assert batches == heldout_batch_indices(10, 3, 3, seed=4)
    assert batches != heldout_batch_indices(10, 3, 3, seed=5)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)
    long = heldout_batch_indices(4, 3, 2, seed=0)  # 6 indices from 4 blocks: a second pass
    assert sorted(sum(long, [])[:4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="batch_size"):
        heldout_batch_indices(4, 1, 0, seed=0)


def domain_text(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    parts = []
    for _ in range(n):
        pump, bar, valve = rng.randint(1, 9), rng.randint(2, 8), rng.choice("ABCD")
        parts.append(f"Pump {pump} holds {bar} bar while valve {valve} stays open.")
    return " ".join(parts)


def save_blocks(tokenizer, text: str, path: Path) -> Path:
    from datasets import Dataset

    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(len(ids) // SEQ_LEN)]
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def heldout(tiny_base, tmp_path_factory):
    _, tokenizer = load_base(tiny_base.path)
    return save_blocks(tokenizer, domain_text(1, 120), tmp_path_factory.mktemp("pol") / "heldout")


def _random_adapter(evaluator: PolEvaluator, seed: int, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    slot = evaluator._default
    return {
        name.replace(f".{slot}.", "."): torch.randn(p.shape, generator=gen) * scale
        for name, p in evaluator.model.named_parameters()
        if "lora_" in name
    }


def test_evaluator_matches_the_definition_and_repeats_exactly(tiny_base, heldout):
    evaluator = PolEvaluator(
        tiny_base.path, heldout, batch_size=4, num_batches=3, seed=0, adapter_config=CONFIG
    )
    base = evaluator.loss(None)
    assert len(base.per_batch) == 3 and base.batch_indices == evaluator.batch_indices
    # the definition: Hugging Face's own shifted-label loss of the plain base model, per batch
    model, _ = load_base(tiny_base.path)
    with torch.no_grad():
        for indices, value in zip(base.batch_indices, base.per_batch, strict=True):
            batch = evaluator.blocks[indices]
            assert value == pytest.approx(
                float(model(input_ids=batch, labels=batch).loss), abs=1e-5
            )
    assert 3.0 < base.mean < 7.0
    # a zero-delta adapter (B = 0) is exactly the base
    zero = {k: (v * 0 if "lora_B" in k else v) for k, v in _random_adapter(evaluator, 1).items()}
    assert evaluator.loss(zero).per_batch == base.per_batch
    noisy = _random_adapter(evaluator, 2, scale=0.5)
    changed = evaluator.loss(noisy)
    assert abs(changed.mean - base.mean) > 1e-3
    # in-place swaps leave nothing behind; a fresh evaluator gives the very same numbers
    again = PolEvaluator(tiny_base.path, heldout, 4, 3, 0, CONFIG)
    assert again.loss(noisy).per_batch == changed.per_batch
    assert evaluator.loss(None).per_batch == base.per_batch
    assert again.loss(None).per_batch == base.per_batch

    # a stacked-rank adapter under its own config equals the base with its deltas merged in
    stacked, cfg8 = stack_adapters(zero, CONFIG, noisy, CONFIG, 0.6, 0.4)
    assert cfg8["r"] == 8
    stacked_loss = evaluator.loss(stacked, cfg8)
    with torch.no_grad():
        for prefix, delta in effective_deltas(noisy, CONFIG).items():
            module = model.get_submodule(prefix.removeprefix("base_model.model."))
            module.weight += (0.4 * delta).float()
        for indices, value in zip(stacked_loss.batch_indices, stacked_loss.per_batch, strict=True):
            batch = evaluator.blocks[indices]
            manual = float(block_loss_sum(model(input_ids=batch).logits, batch))
            assert value == pytest.approx(manual / (batch.shape[0] * (SEQ_LEN - 1)), abs=1e-4)
    # and switching back to the default config still gives the earlier numbers exactly
    assert evaluator.loss(noisy).per_batch == changed.per_batch


def test_losses_are_computed_once_per_plan_and_adapter_and_shared_through_the_cache(
    tiny_base, heldout, tmp_path
):
    cache = tmp_path / "pol_cache"
    first = PolEvaluator(tiny_base.path, heldout, 4, 3, 0, CONFIG, "a" * 64, cache)
    noisy = _random_adapter(first, 2, scale=0.5)
    base, changed = first.loss(None), first.loss(noisy)
    assert first.forward_passes == 2
    # the same requests again (the base for every candidate, alpha 0 and 1): no forward pass
    assert first.loss(None).per_batch == base.per_batch
    assert first.loss({k: v.clone() for k, v in noisy.items()}).per_batch == changed.per_batch
    assert first.forward_passes == 2
    # a second evaluator on the same base and batch plan reads the numbers from disk
    second = PolEvaluator(tiny_base.path, heldout, 4, 3, 0, CONFIG, "a" * 64, cache)
    assert second.plan_key == first.plan_key
    assert second.loss(noisy).per_batch == changed.per_batch
    assert second.loss(None).per_batch == base.per_batch
    assert second.forward_passes == 0
    # another batch seed, or another base hash, is another plan: computed, not reused
    other_seed = PolEvaluator(tiny_base.path, heldout, 4, 3, 1, CONFIG, "a" * 64, cache)
    other_base = PolEvaluator(tiny_base.path, heldout, 4, 3, 0, CONFIG, "b" * 64, cache)
    assert len({first.plan_key, other_seed.plan_key, other_base.plan_key}) == 3
    assert other_seed.loss(None).per_batch != base.per_batch
    assert other_base.loss(None).per_batch == base.per_batch
    assert other_seed.forward_passes == 1 and other_base.forward_passes == 1
    # a corrupt entry is recomputed and rewritten, never trusted
    entry = cache / first.plan_key[:24] / "base.json"
    entry.write_text("{not json")
    third = PolEvaluator(tiny_base.path, heldout, 4, 3, 0, CONFIG, "a" * 64, cache)
    assert third.loss(None).per_batch == base.per_batch and third.forward_passes == 1
    assert json.loads(entry.read_text())["plan_key"] == first.plan_key
    with pytest.raises(ValueError, match="base_model_sha256"):
        PolEvaluator(tiny_base.path, heldout, 4, 3, 0, CONFIG, None, cache)
