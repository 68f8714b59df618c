"""Whether the library is ready for the marketplace to open, and which domains fall short.

A domain is ready when it has at least one expert that passed Proof-of-Loss validation with at
least ``min_cycles`` training cycles. The marketplace opens when at least ``min_domains`` domains
are ready; until then it runs in preview mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Readiness:
    open: bool
    ready_domains: list[str]
    short: dict[str, str]  # domain -> why it is not ready
    min_domains: int
    min_cycles: int

    @property
    def summary(self) -> str:
        state = "open" if self.open else "preview"
        return (
            f"{state}: {len(self.ready_domains)} of {self.min_domains} required domains ready "
            f"(validated, >= {self.min_cycles} cycles)"
        )


def readiness(
    experts: Iterable[tuple[str, bool, int]], min_domains: int, min_cycles: int
) -> Readiness:
    """``experts`` yields (domain, pol_validated, cycles) for each public expert."""
    best: dict[str, tuple[bool, int]] = {}
    for domain, validated, cycles in experts:
        seen_validated, seen_cycles = best.get(domain, (False, 0))
        if validated:
            best[domain] = (True, max(seen_cycles if seen_validated else 0, cycles))
        elif not seen_validated:
            best[domain] = (False, max(seen_cycles, cycles))
    ready, short = [], {}
    for domain, (validated, cycles) in sorted(best.items()):
        if not validated:
            short[domain] = "no expert passed Proof-of-Loss validation"
        elif cycles < min_cycles:
            short[domain] = f"{cycles} of {min_cycles} training cycles"
        else:
            ready.append(domain)
    return Readiness(
        open=len(ready) >= min_domains,
        ready_domains=ready,
        short=short,
        min_domains=min_domains,
        min_cycles=min_cycles,
    )
