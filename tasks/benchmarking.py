"""Prefect task for the commission's lm-eval benchmark, over :mod:`evaluation.benchmark`.

:func:`benchmark` evaluates the base, the composed expert, the mixture the buyer gets (the
library's experts plus this one, loaded as every consumer loads it) and the current champion
when there is one, in one lm-eval run, on the commission's held-out perplexity, its own tasks
and the general tasks. Its commit point is ``bench/results.json`` (a
:class:`evaluation.benchmark.BenchmarkResult`); a rerun reads it back instead of evaluating again.

No retries: evaluation runs locally on staged folders and local task files, so a failure is a real
error (an "adapter not applied" result must stop the flow, not be retried).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from evaluation.benchmark import BenchmarkResult
from factory.commission import CommissionSpec
from infra.settings import Settings
from tasks.compose import ComposeResult, LibrarySnapshot
from tasks.job import Job


@task(name="benchmark", retries=0, cache_policy=NO_CACHE)
def benchmark(
    job: Job,
    spec: CommissionSpec,
    composed: ComposeResult,
    library: LibrarySnapshot,
    settings: Settings,
) -> BenchmarkResult:
    """lm-eval on the commission's held-out perplexity, its own tasks and the general tasks:
    base, expert and mixture (and the current champion, when there is one) in one run."""
    from evaluation.benchmark import (
        GENERAL_TASKS,
        make_perplexity_task,
        prepare_tasks,
        run_benchmarks,
    )
    from factory.base_model import load_base
    from factory.mixture import load_mixture

    results_path = job.root / "bench" / "results.json"
    if results_path.exists():
        return BenchmarkResult.load(results_path)
    general_dir = prepare_tasks(settings.home / "cache")
    task_name = "heldout_" + job.expert_id.replace("-", "_")
    own = make_perplexity_task(
        job.data_dir / "heldout.jsonl", task_name, job.root / "bench" / "tasks"
    )
    base, _ = load_base(job.base_model_path)
    mixture = load_mixture(base, [*library.experts, composed.expert_dir], top_k=spec.router.top_k)
    models = {"base": None, "expert": str(composed.expert_dir), "mixture": mixture}
    if library.champion is not None:
        models["champion"] = str(library.champion)
    tasks = [task_name, *GENERAL_TASKS, *spec.benchmarks.tasks]
    result = run_benchmarks(job.base_model_path, models, tasks, [general_dir, own.parent],
                            limit=spec.benchmarks.limit)  # fmt: skip
    result.save(results_path)
    return result
