"""Prefect task: train one production line as a DeepSpeed job and report its candidate.

Thin by design: validate the config, write it beside the checkpoints, call
:func:`infra.launcher.launch` (which kills the whole job on timeout or cancellation), stream the
step metrics into MLflow when a run is given. Only the ``retryable`` outcome (lost worker,
signal, timeout) is retried; ``final`` outcomes (bad config, non-finite loss) are returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import task

from factory.train import TrainConfig
from infra.atomic import atomic_write_json
from infra.launcher import launch


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


def run_training(
    config: TrainConfig | dict,
    nprocs: int,
    launcher: Literal["torchrun", "deepspeed"] = "torchrun",
    timeout_s: float = 3600.0,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    hostfile: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Runs the line once; raises RetryableTrainingFailure for the retryable outcome."""
    config = TrainConfig.model_validate(config)
    config_path = Path(config.checkpoint_dir) / "train_config.json"
    atomic_write_json(config_path, config.model_dump(mode="json"))
    sink = None
    if tracking_uri and run_id:
        from infra.metrics import MlflowMetricSink

        sink = MlflowMetricSink(tracking_uri, run_id)
    try:
        result = launch(
            ["--config", str(config_path)],
            nprocs,
            launcher=launcher,
            hostfile=hostfile,
            env=env,
            timeout_s=timeout_s,
            on_metric=sink,
            log_path=Path(config.checkpoint_dir) / "train.log",
        )
    finally:
        if sink is not None:
            sink.close()
    if result.outcome == "retryable":
        raise RetryableTrainingFailure(f"training line failed: {result.reason}")
    last = result.metrics[-1] if result.metrics else {}
    return {
        "candidate_path": result.report.get("candidate_path") if result.outcome == "ok" else None,
        "outcome": result.outcome,
        "reason": result.reason,
        "final_loss": result.report.get("final_loss", last.get("loss")),
        "tokens_seen": result.report.get("tokens_seen", last.get("tokens_seen", 0)),
        "config_sha256": config.sha256(),
        "events": json.loads(json.dumps(result.events)),
    }


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_only_retryable)
def train_line(
    config: dict,
    nprocs: int,
    launcher: Literal["torchrun", "deepspeed"] = "torchrun",
    timeout_s: float = 3600.0,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> dict:
    """dict(candidate_path, outcome, reason, final_loss, tokens_seen); resumes on retry from
    the line's newest valid checkpoint."""
    return run_training(config, nprocs, launcher, timeout_s, tracking_uri, run_id)
