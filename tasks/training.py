"""Prefect task: train one production line as a DeepSpeed job and report its candidate.

Thin by design: validate the config, write it beside the checkpoints, call
:func:`infra.launcher.launch` (which kills the whole job on timeout or cancellation), stream the
step metrics into MLflow when a run is given. Only the ``retryable`` outcome (lost worker,
signal, timeout) is retried; ``final`` outcomes (bad config, non-finite loss) are returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from factory.train_config import TrainConfig
from infra.atomic import atomic_write_json
from infra.launcher import Rendezvous, launch


class RetryableTrainingFailure(RuntimeError):
    """The factory's infrastructure failed (not the contributor's input); worth a retry."""


def _retry_only_retryable(task, task_run, state) -> bool:
    try:
        state.result()
    except RetryableTrainingFailure:
        return True
    except Exception:
        return False
    return False


class LineResult(BaseModel):
    """What one production line produced: its outcome and, when ``ok``, its candidate folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contributor_id: str
    candidate_path: Path | None
    outcome: Literal["ok", "final", "retryable"]
    reason: str  # "" when ok
    final_loss: float | None
    tokens_seen: int
    config_sha256: str
    events: list[dict[str, Any]] = Field(default_factory=list, repr=False)  # launcher's log lines
    # On a work pool (flows.line_dispatch): the worker that trained it and the step its run
    # resumed from when another worker's checkpoint was fetched from the object store.
    worker: str | None = None
    resumed_from_step: int | None = None


def run_training(
    config: TrainConfig,
    nprocs: int,
    launcher: Literal["torchrun", "deepspeed"] = "torchrun",
    timeout_s: float = 3600.0,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    hostfile: Path | None = None,
    env: dict[str, str] | None = None,
    rendezvous: Rendezvous | None = None,
) -> LineResult:
    """Runs the line once; raises RetryableTrainingFailure for the retryable outcome. With a
    ``rendezvous`` this is this node's launcher group of a line across nodes."""
    config_path = Path(config.checkpoint_dir) / "train_config.json"
    atomic_write_json(config_path, config.model_dump(mode="json"))
    sink = line_run = None
    if tracking_uri and run_id:
        from infra.metrics import MlflowMetricSink, nested_run

        # A run per line under the commission run, so the lines' curves do not overwrite.
        line_run = nested_run(tracking_uri, run_id, f"cycle-{config.cycle}/{config.contributor_id}")
        sink = MlflowMetricSink(tracking_uri, line_run)
    status = "FAILED"
    try:
        result = launch(
            ["--config", str(config_path)],
            nprocs,
            launcher=launcher,
            hostfile=hostfile,
            env=env,
            rendezvous=rendezvous,
            timeout_s=timeout_s,
            on_metric=sink,
            log_path=Path(config.checkpoint_dir) / "train.log",
        )
        status = "FINISHED" if result.outcome == "ok" else "FAILED"
    finally:
        if sink is not None:
            from infra.metrics import end_nested_run

            sink.close()
            end_nested_run(tracking_uri, line_run, status)
    if result.outcome == "retryable":
        raise RetryableTrainingFailure(f"training line failed: {result.reason}")
    last = result.metrics[-1] if result.metrics else {}
    candidate = result.report.get("candidate_path") if result.outcome == "ok" else None
    return LineResult(
        contributor_id=config.contributor_id,
        candidate_path=Path(candidate) if candidate else None,
        outcome=result.outcome,
        reason=result.reason,
        final_loss=result.report.get("final_loss", last.get("loss")),
        tokens_seen=int(result.report.get("tokens_seen", last.get("tokens_seen", 0)) or 0),
        config_sha256=config.sha256(),
        events=json.loads(json.dumps(result.events)),
    )


@task(
    name="train-line",
    task_run_name="train-line {config.expert_id} cycle {config.cycle} {config.contributor_id}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_only_retryable,
    cache_policy=NO_CACHE,
)
def train_line(
    config: TrainConfig,
    nprocs: int,
    launcher: Literal["torchrun", "deepspeed"] = "torchrun",
    hostfile: Path | None = None,
    timeout_s: float = 3600.0,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    slots: int | None = None,
    rendezvous: Rendezvous | None = None,
) -> LineResult:
    """Trains one line (``nprocs`` ranks; across nodes with a DeepSpeed ``hostfile``); resumes
    on retry from the line's newest valid checkpoint.

    ``slots``: the line holds that many slots of the Prefect global concurrency limit
    :data:`tasks.slots.TRAIN_SLOTS` while it trains (its processes; None: no limit).
    """
    args = (config, nprocs, launcher, timeout_s, tracking_uri, run_id, hostfile)
    if slots is None:
        return run_training(*args, rendezvous=rendezvous)
    from tasks.slots import TRAIN_SLOTS, held_slots

    get_run_logger().info("line %s waits for %d training slot(s)", config.contributor_id, slots)
    with held_slots(TRAIN_SLOTS, slots):
        return run_training(*args, rendezvous=rendezvous)
