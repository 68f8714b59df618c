"""Held-out split, weighted mixture, quality checks and contamination as pure functions."""

from __future__ import annotations

import random
from collections import Counter

from factory.data.contamination import find_contamination
from factory.data.quality import QualityReport, clean_rows
from factory.data.split import heldout_bucket, is_heldout, mix_by_weight, split_rows


def _rows(n: int, start: int = 0) -> list[tuple[int, str]]:
    return [(0, f"row number {i} about contracts and courts") for i in range(start, start + n)]


def test_split_is_stable_under_appended_rows():
    first = _rows(2000)
    train_a, held_a = split_rows(first, seed=7, fraction=0.1)
    train_b, held_b = split_rows(first + _rows(1000, start=2000), seed=7, fraction=0.1)
    assert set(held_a) <= set(held_b) and set(train_a) <= set(train_b)
    assert set(held_b) - set(held_a) == {r for r in held_b if int(r[1].split()[2]) >= 2000}
    # The fraction is met within binomial noise: 2000 rows, p=0.1, sd about 13.4 rows.
    assert 150 <= len(held_a) <= 250


def test_split_depends_on_seed_and_normalized_text():
    assert heldout_bucket("a  b\n c", 0) == heldout_bucket("a b c", 0)
    assert heldout_bucket("a b c", 0) != heldout_bucket("a b c", 1)
    # Golden value: sha256("0\nhello world") -> first 8 bytes big-endian mod 10_000.
    assert heldout_bucket("hello world", 0) == 6375
    assert is_heldout("hello world", 0, 0.64) is True
    assert is_heldout("hello world", 0, 0.63) is False


def test_mixture_follows_weights():
    rows = [(0, f"big {i}") for i in range(900)] + [(1, f"small {i}") for i in range(100)]
    mixed = mix_by_weight(rows, [0.5, 0.5], seed=3)
    counts = Counter(text.split()[0] for text in mixed)
    assert counts == {"big": 500, "small": 500}
    assert Counter(mixed)["small 0"] == 5
    assert mix_by_weight(rows, [0.5, 0.5], seed=3) == mixed
    assert sorted(mix_by_weight(rows, [0.9, 0.1], seed=3)) == sorted(t for _, t in rows)


def test_quality_checks_count_and_drop():
    long = "x" * 70
    rows = [(0, "  "), (0, "short"), (0, long + " a"), (0, long + " a"), (0, long + " b"), (1, "")]
    report = QualityReport()
    kept = clean_rows(iter(rows), min_chars=20, report=report)
    assert kept == [(0, long + " a"), (0, long + " b")]
    assert report.counts == {
        "non_utf8": 0, "empty": 2, "too_short": 1, "duplicate": 1, "duplicate_prefix": 1
    }  # fmt: skip
    assert report.examples["too_short"] == ["short"]
    assert report.to_dict()["rows_dropped"] == 4 and report.rows_in == 6


def test_contamination_exact_and_13_gram():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    item = " ".join(rng.choice(words) for _ in range(30))
    item_tokens = item.split()
    rows = [
        " ".join(rng.choice(words) for _ in range(40)),  # clean
        "Prefix " + " ".join(item_tokens[5:18]) + " suffix",  # shares exactly 13 tokens
        "Prefix " + " ".join(item_tokens[5:17]) + " suffix",  # only 12: clean
        item.upper(),  # exact after normalization
        "What is two plus two?",
    ]
    report = find_contamination(rows, [item, "what is  two plus two?"])
    assert report.flagged == frozenset({1, 3, 4})
    assert (report.exact, report.ngram, report.items_hit) == (2, 1, 2)
    summary = report.to_dict()
    assert summary["rows_removed"] == 3 and summary["examples"][0]["kind"] == "ngram"
    assert find_contamination(rows, []).flagged == frozenset()
