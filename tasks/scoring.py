"""Prefect tasks for a cycle's scoring and merging and for the WiSE-FT alpha search.

Thin wrappers: the work is in :mod:`merging.cycle_merge` and :mod:`merging.wise_ft`. No retries:
both run locally on files already staged, so a failure is a real error, not a flaky network. No
input caching either: the inputs are a loaded model and tensors, and a cached cycle outcome
would skip the ledger write; results are not persisted (they hold tensors, the flow saves the
adapter itself).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from merging.cycle_merge import CycleOutcome, merge_cycle
from merging.wise_ft import AlphaSearch, alpha_search


@task(name="score-and-merge-cycle", retries=0, cache_policy=NO_CACHE, persist_result=False)
def merge_cycle_task(*args, **kwargs) -> CycleOutcome:
    """Runs :func:`merging.cycle_merge.merge_cycle` (same arguments)."""
    return merge_cycle(*args, **kwargs)


@task(name="wise-ft-alpha-search", retries=0, cache_policy=NO_CACHE, persist_result=False)
def alpha_search_task(*args, **kwargs) -> AlphaSearch:
    """Runs :func:`merging.wise_ft.alpha_search` (same arguments)."""
    return alpha_search(*args, **kwargs)
