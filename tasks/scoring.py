"""Prefect tasks for a cycle's scoring and merging and for the WiSE-FT alpha search.

Thin wrappers: the work is in :mod:`merging.cycle_merge` and :mod:`merging.wise_ft`. No retries:
both run locally on files already staged, so a failure is a real error, not a flaky network.
"""

from __future__ import annotations

from prefect import task

from merging.cycle_merge import CycleOutcome, merge_cycle
from merging.wise_ft import AlphaSearch, alpha_search


@task(name="score-and-merge-cycle", retries=0)
def merge_cycle_task(*args, **kwargs) -> CycleOutcome:
    """Runs :func:`merging.cycle_merge.merge_cycle` (same arguments)."""
    return merge_cycle(*args, **kwargs)


@task(name="wise-ft-alpha-search", retries=0)
def alpha_search_task(*args, **kwargs) -> AlphaSearch:
    """Runs :func:`merging.wise_ft.alpha_search` (same arguments)."""
    return alpha_search(*args, **kwargs)
