"""Prefect tasks for the expert library: register a result, promote it through the gate.

Thin wrappers over :class:`factory.library.ExpertLibrary`. Both talk to the registry (a server
and an object store in a team setup), so they retry; a retry is safe because registration is
exactly-once on (commission id, adapter sha256) and promotion re-applies the same alias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from evaluation.benchmark import BenchmarkResult
from factory.library import ExpertLibrary, GateInputs, LibraryVersion, PromotionDecision
from infra.settings import Settings


def _io_failure(task, task_run, state) -> bool:
    """Retry registry and network failures; never bad input (ValueError) or a full queue wait."""
    try:
        state.result()
    except (ValueError, TimeoutError):
        return False
    except Exception:  # noqa: BLE001 - any other failure is the registry's I/O: worth a retry
        return True
    return False


_RETRY = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": _io_failure}


@task(name="register-expert", **_RETRY)
def register_task(
    settings: Settings,
    expert_folder: Path,
    provenance: dict[str, Any],
    benchmark: BenchmarkResult | dict | None = None,
    plots: list[Path] | None = None,
    run_id: str | None = None,
) -> LibraryVersion:
    """Registers one accepted result (alias ``challenger``); idempotent across retries."""
    return ExpertLibrary(settings).register(expert_folder, provenance, benchmark, plots, run_id)


@task(name="promote-expert", **_RETRY)
def promote_task(
    settings: Settings, name: str, version: str, gate_inputs: GateInputs
) -> PromotionDecision:
    """Makes the version ``champion`` iff the promotion gate accepts it."""
    return ExpertLibrary(settings).promote(name, version, gate_inputs)
