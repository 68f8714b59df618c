"""Row quality checks and their report: what was dropped, what was only flagged, and examples.

Checks, in order, on each row's text with surrounding whitespace stripped:

- ``non_utf8``: a line of a line-based file that is not UTF-8 (noted while reading; dropped);
- ``empty``: nothing left after stripping (dropped);
- ``too_short``: fewer than ``min_chars`` characters (dropped);
- ``duplicate``: the exact text of an earlier kept row (dropped; the first occurrence stays);
- ``duplicate_prefix``: the first 64 characters equal those of an earlier kept row (reported only,
  since shared boilerplate openings are common in legitimate data).

Each finding keeps up to :data:`MAX_EXAMPLES` examples twice: the text (``examples``, kept in
the factory's own data.json) and where it was (``locations``: ``data.<i> row <n>``, counted per
source). Reports shown to people (``taas commission validate``) print locations only: a report
never echoes the content of a row it refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

CHECKS = ("non_utf8", "empty", "too_short", "duplicate", "duplicate_prefix")
DROPPING = ("non_utf8", "empty", "too_short", "duplicate")
PREFIX_CHARS = 64
MAX_EXAMPLES = 3
EXAMPLE_CHARS = 80


@dataclass
class QualityReport:
    """Counts per check, up to :data:`MAX_EXAMPLES` short examples each, rows in and kept."""

    rows_in: int = 0
    rows_kept: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CHECKS})
    locations: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CHECKS})

    def note(self, check: str, example: str, location: str | None = None) -> None:
        assert check in CHECKS, check
        self.counts[check] += 1
        if len(self.examples[check]) < MAX_EXAMPLES:
            self.examples[check].append(example[:EXAMPLE_CHARS])
            self.locations[check].append(location or example[:EXAMPLE_CHARS])

    @property
    def rows_dropped(self) -> int:
        return sum(self.counts[c] for c in DROPPING)

    def to_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "checks": {
                c: {
                    "count": self.counts[c],
                    "examples": self.examples[c],
                    "locations": self.locations[c],
                }
                for c in CHECKS
            },
        }

    def summary(self) -> str:
        """One line, e.g. ``empty: 2, too_short: 1, duplicate: 3`` (checks with hits only)."""
        hits = [f"{c}: {self.counts[c]}" for c in CHECKS if self.counts[c]]
        return ", ".join(hits) or "no findings"


def clean_rows(
    rows: Iterable[tuple[int, str]], min_chars: int, report: QualityReport
) -> list[tuple[int, str]]:
    """Applies the checks to (source_index, text) rows; returns the kept rows, stripped."""
    return list(iter_clean_rows(rows, min_chars, report))


def iter_clean_rows(
    rows: Iterable[tuple[int, str]], min_chars: int, report: QualityReport
) -> Iterator[tuple[int, str]]:
    """:func:`clean_rows` one row at a time: what it keeps of the rows is two digests per kept
    row (the row's and its prefix's), never their text; ``report`` counts as it goes."""
    seen_rows: set[bytes] = set()
    seen_prefixes: set[bytes] = set()
    per_source: dict[int, int] = {}
    for source_index, raw in rows:
        report.rows_in += 1
        per_source[source_index] = per_source.get(source_index, 0) + 1
        where = f"data.{source_index} row {per_source[source_index]}"
        text = raw.strip()
        if not text:
            report.note("empty", repr(raw), where)
            continue
        if len(text) < min_chars:
            report.note("too_short", text, f"{where} ({len(text)} chars)")
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen_rows:
            report.note("duplicate", text, where)
            continue
        seen_rows.add(digest)
        prefix = hashlib.sha256(text[:PREFIX_CHARS].encode("utf-8")).digest()[:16]
        if len(text) >= PREFIX_CHARS and prefix in seen_prefixes:
            report.note("duplicate_prefix", text, where)
        seen_prefixes.add(prefix)
        report.rows_kept += 1
        yield source_index, text
