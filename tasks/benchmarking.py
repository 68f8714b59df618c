"""Prefect task for lm-eval benchmarks: a thin wrapper over :mod:`evaluation.benchmark`.

No retries: evaluation runs locally on staged folders and local task files, so a failure is a real
error (an "adapter not applied" result must stop the flow, not be retried). The results JSON is
written atomically next to the flow's other outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from evaluation.benchmark import BenchmarkResult, run_benchmarks


@task(name="benchmark-models", retries=0)
def benchmark_task(
    base_model_path: Path,
    models: dict[str, Any],
    tasks: list[str],
    include_path: Path | list[Path],
    results_path: Path,
    limit: int | None = None,
    batch_size: int = 8,
) -> BenchmarkResult:
    """Runs :func:`evaluation.benchmark.run_benchmarks` and saves the results JSON."""
    result = run_benchmarks(
        base_model_path, models, tasks, include_path, limit=limit, batch_size=batch_size
    )
    result.save(Path(results_path))
    return result
