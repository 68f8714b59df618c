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
    check = ContaminationCheck(items, n)
    for row_index, row in enumerate(rows):
        check.flags(row_index, row)
    return check.report()


class ContaminationCheck:
    """:func:`find_contamination` one row at a time (the rows need not sit in memory): the
    items' n-grams are indexed once, each row is checked as it comes."""

    def __init__(self, items: Sequence[str], n: int = NGRAM) -> None:
        self.n, self.items = n, len(items)
        self.exact_items: dict[str, int] = {}
        self.gram_items: dict[tuple[str, ...], int] = {}
        for item_index, item in enumerate(items):
            tokens = _tokens(item)
            if not tokens:
                continue
            self.exact_items.setdefault(" ".join(tokens), item_index)
            for gram in ngrams(tokens, n):
                self.gram_items.setdefault(gram, item_index)
        self.flagged: set[int] = set()
        self.hit: set[int] = set()
        self.exact = self.by_gram = 0
        self.examples: list[dict] = []

    def flags(self, row_index: int, row: str) -> bool:
        """True (and recorded) when the row overlaps an item."""
        tokens = _tokens(row)
        match: tuple[str, int, str] | None = None
        key = " ".join(tokens)
        if key in self.exact_items:
            match = ("exact", self.exact_items[key], key)
        elif self.gram_items:
            for gram in ngrams(tokens, self.n):
                if gram in self.gram_items:
                    match = ("ngram", self.gram_items[gram], " ".join(gram))
                    break
        if match is None:
            return False
        kind, item_index, evidence = match
        self.flagged.add(row_index)
        self.hit.add(item_index)
        self.exact += kind == "exact"
        self.by_gram += kind == "ngram"
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(
                {"row": row[:80], "item_index": item_index, "kind": kind, "match": evidence[:80]}
            )
        return True

    def report(self) -> ContaminationReport:
        return ContaminationReport(
            flagged=frozenset(self.flagged),
            items=self.items,
            items_hit=len(self.hit),
            exact=self.exact,
            ngram=self.by_gram,
            examples=tuple(self.examples),
        )
