"""A metric sink that batches per-step training metrics into an MLflow run.

:class:`MlflowMetricSink` takes the worker's ``TAAS_METRIC`` dicts (``step`` plus numeric values)
and sends them with ``MlflowClient.log_batch`` every ``batch_size`` metrics and on ``close``, so a
line logging every step costs one request per batch, not one per value.

Each production line logs into a run of its own, nested under the commission run and named by
cycle and line (``cycle-2/line-1``, :func:`nested_run`), so the lines' ``loss`` curves stay
apart; a retried line finds its run again by that name and continues it.
"""

from __future__ import annotations

import threading
import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


class MlflowMetricSink:
    def __init__(self, tracking_uri: str, run_id: str, batch_size: int = 50, prefix: str = ""):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.batch_size = batch_size
        self.prefix = prefix
        self._pending: list[Metric] = []
        self._lock = threading.Lock()  # metrics arrive from the launcher's reader thread

    def __call__(self, metric: dict) -> None:
        step = int(metric.get("step", 0))
        timestamp = int(time.time() * 1000)
        values = [
            Metric(f"{self.prefix}{key}", float(value), timestamp, step)
            for key, value in sorted(metric.items())
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        ]
        with self._lock:
            self._pending.extend(values)
            if len(self._pending) >= self.batch_size:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        # log_batch accepts at most 1000 metrics per call.
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def close(self) -> None:
        self.flush()


def nested_run(tracking_uri: str, parent_run_id: str, name: str) -> str:
    """The id of the child run ``name`` under ``parent_run_id``: found when a retry made it
    before, else created (tag ``mlflow.parentRunId``, which the MLflow UI nests by)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    quoted = name.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`mlflow.runName` = '{quoted}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {"mlflow.parentRunId": parent_run_id}
    tags.update({k: v for k, v in parent.data.tags.items() if k in ("commission_id", "domain")})
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def end_nested_run(tracking_uri: str, run_id: str, status: str) -> None:
    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)
