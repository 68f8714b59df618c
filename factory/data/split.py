"""Held-out split by row hash, and the weighted mixture of sources for training.

A row is held out when ``int(sha256(f"{seed}\\n" + normalize(text))[:8 bytes]) % 10_000 <
round(fraction * 10_000)``, where ``normalize`` collapses whitespace runs to one space. The
decision depends only on the row itself, so appending rows never moves an existing row across the
split, and identical (or whitespace-equivalent) rows always land on the same side.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

BUCKETS = 10_000


def normalize(text: str) -> str:
    return " ".join(text.split())


def heldout_bucket(text: str, seed: int) -> int:
    """The row's bucket in [0, 10_000): sha256(seed || normalized text) mod 10_000."""
    digest = hashlib.sha256(f"{seed}\n{normalize(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def is_heldout(text: str, seed: int, fraction: float) -> bool:
    return heldout_bucket(text, seed) < round(fraction * BUCKETS)


def split_rows(
    rows: Sequence[tuple[int, str]], seed: int, fraction: float
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(train, heldout) from deduplicated (source_index, text) rows, order preserved."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout.fraction: {fraction} must lie strictly between 0 and 1")
    train, heldout = [], []
    for row in rows:
        (heldout if is_heldout(row[1], seed, fraction) else train).append(row)
    return train, heldout


def mix_by_weight(
    rows: Sequence[tuple[int, str]], weights: Sequence[float], seed: int
) -> list[str]:
    """Training texts drawn so source i supplies about weights[i] of the rows, shuffled
    (:func:`mix_order` over the rows of each source)."""
    by_source: list[list[str]] = [[] for _ in weights]
    for source_index, text in rows:
        by_source[source_index].append(text)
    order = mix_order([len(texts) for texts in by_source], weights, seed)
    return [by_source[source][index] for source, index in order]


def mix_order(counts: Sequence[int], weights: Sequence[float], seed: int) -> list[tuple[int, int]]:
    """(source, row within the source) pairs of the weighted mixture, shuffled.

    The total stays the number of input rows (``sum(counts)``); source i gets
    ``round(w_i * total)`` rows: all of its rows repeated ``target // n_i`` times plus a seeded
    sample of the remainder (so a small source is repeated and a large one subsampled). A source
    without rows contributes nothing. Only positions are drawn, so the rows themselves can stay
    on disk.
    """
    total = sum(counts)
    rng = random.Random(seed)
    order: list[tuple[int, int]] = []
    for source, (count, weight) in enumerate(zip(counts, weights, strict=True)):
        if not count:
            continue
        target = round(weight * total)
        repeats, remainder = divmod(target, count)
        order.extend((source, i) for _ in range(repeats) for i in range(count))
        order.extend((source, i) for i in rng.sample(range(count), remainder))
    rng.shuffle(order)
    return order
