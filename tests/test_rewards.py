"""Reward shares: exact decimals summing to exactly 1, zero weight earns exactly 0."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from merging.rewards import QUANTUM, reward_shares


def test_thirds_round_by_largest_remainder():
    shares = reward_shares({"b": 1.0, "a": 1.0, "c": 1.0, "idle": 0.0})
    # 1/3 floors to 0.333333333333; the one missing quantum goes to the smallest id on a tie.
    assert shares == {
        "a": Decimal("0.333333333334"),
        "b": Decimal("0.333333333333"),
        "c": Decimal("0.333333333333"),
        "idle": Decimal(0),
    }
    assert sum(shares.values()) == Decimal(1)


def test_random_weights_sum_exactly_to_one():
    rng = random.Random(7)
    for _ in range(200):
        weights = {f"c{i}": rng.choice([0.0, rng.random(), rng.random() * 1e-9]) for i in range(9)}
        weights["c0"] = 0.5
        shares = reward_shares(weights)
        assert sum(shares.values()) == Decimal(1)
        for cid, w in weights.items():
            assert (shares[cid] == 0) == (w == 0)
            assert shares[cid] % QUANTUM == 0
            assert abs(float(shares[cid]) - w / sum(weights.values())) <= 1e-12


def test_no_positive_weight_pays_nobody():
    assert reward_shares({"a": 0.0, "b": 0.0}) == {"a": Decimal(0), "b": Decimal(0)}


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_weight_is_refused_with_its_name(bad):
    with pytest.raises(ValueError, match=r"weights\['x'\]"):
        reward_shares({"x": bad, "y": 1.0})
