"""A metric sink that batches per-step training metrics into an MLflow run.

:class:`MlflowMetricSink` takes the worker's ``TAAS_METRIC`` dicts (``step`` plus numeric values)
and sends them with ``MlflowClient.log_batch`` every ``batch_size`` metrics and on ``close``, so a
line logging every step costs one request per batch, not one per value.
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
