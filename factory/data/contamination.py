"""Benchmark contamination: training rows that overlap benchmark items are found and removed.

A row is contaminated by an item when their normalized texts (lowercased, whitespace collapsed)
are equal, or when they share an n-gram of :data:`NGRAM` (13) consecutive whitespace tokens
(lowercased). Items shorter than 13 tokens can only match exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NGRAM = 13
MAX_EXAMPLES = 5


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass(frozen=True)
class ContaminationReport:
    """Which rows overlap which items: ``flagged`` row indices and a JSON-ready summary."""

    flagged: frozenset[int]
    items: int
    items_hit: int
    exact: int
    ngram: int
    examples: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {
            "ngram": NGRAM,
            "items": self.items,
            "items_hit": self.items_hit,
            "rows_removed": len(self.flagged),
            "exact_matches": self.exact,
            "ngram_matches": self.ngram,
            "examples": list(self.examples),
        }


def find_contamination(
    rows: Sequence[str], items: Sequence[str], n: int = NGRAM
) -> ContaminationReport:
    """Flags every row that equals an item or shares an n-gram with one."""
    exact_items: dict[str, int] = {}
    gram_items: dict[tuple[str, ...], int] = {}
    for item_index, item in enumerate(items):
        tokens = _tokens(item)
        if not tokens:
            continue
        exact_items.setdefault(" ".join(tokens), item_index)
        for gram in ngrams(tokens, n):
            gram_items.setdefault(gram, item_index)
    flagged: set[int] = set()
    hit: set[int] = set()
    exact = by_gram = 0
    examples: list[dict] = []
    for row_index, row in enumerate(rows):
        tokens = _tokens(row)
        match: tuple[str, int, str] | None = None
        key = " ".join(tokens)
        if key in exact_items:
            match = ("exact", exact_items[key], key)
        else:
            for gram in ngrams(tokens, n):
                if gram in gram_items:
                    match = ("ngram", gram_items[gram], " ".join(gram))
                    break
        if match is None:
            continue
        kind, item_index, evidence = match
        flagged.add(row_index)
        hit.add(item_index)
        exact += kind == "exact"
        by_gram += kind == "ngram"
        if len(examples) < MAX_EXAMPLES:
            examples.append(
                {"row": row[:80], "item_index": item_index, "kind": kind, "match": evidence[:80]}
            )
    return ContaminationReport(
        flagged=frozenset(flagged),
        items=len(items),
        items_hit=len(hit),
        exact=exact,
        ngram=by_gram,
        examples=tuple(examples),
    )
