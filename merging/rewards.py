"""Reward shares: each contributor's exact decimal share of one cycle's reward pool.

share_c = w_c / sum_d w_d, rounded to a quantum of 1e-12 by the largest-remainder method: every
share is first floored to the quantum, then the quanta still missing to reach exactly 1 go one
each to the contributors with the largest remainders (ties: contributor id, ascending). The
shares are ``Decimal`` values that sum to exactly ``Decimal(1)``; a contributor with weight 0 gets
exactly 0. When no weight is positive, nothing was merged and every share is 0.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal, localcontext

QUANTUM = Decimal("1e-12")


def reward_shares(weights: dict[str, float]) -> dict[str, Decimal]:
    for contributor, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{contributor!r}] must be finite and >= 0, got {w}")
    positive = {c: w for c, w in weights.items() if w > 0}
    shares = {c: Decimal(0) for c in weights}
    if not positive:
        return shares
    with localcontext() as ctx:
        ctx.prec = 60
        total = sum((Decimal(w) for w in positive.values()), Decimal(0))
        exact = {c: Decimal(w) / total for c, w in positive.items()}
        floored = {c: v.quantize(QUANTUM, rounding=ROUND_FLOOR) for c, v in exact.items()}
        missing = int((Decimal(1) - sum(floored.values(), Decimal(0))) / QUANTUM)
        order = sorted(positive, key=lambda c: (-(exact[c] - floored[c]), c))
        for c in order[:missing]:
            floored[c] += QUANTUM
    shares.update(floored)
    assert sum(shares.values(), Decimal(0)) == Decimal(1), "shares must sum to exactly 1"
    return shares
