"""Local service start-up: an ``mlflow server`` subprocess on a loopback port.

Used by the tests and by a team's first setup::

    handle = start_mlflow_server("sqlite:///mlflow.db", "s3://taas-artifacts/mlflow", 5000,
                                 env={"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000"})
    ...  # TAAS_MLFLOW_TRACKING_URI=handle.url
    handle.stop()

The server proxies artifacts (``--artifacts-destination``), so its clients need no S3 settings;
only the server's environment carries the endpoint and credentials. It runs in its own process
group so that stopping it also stops its gunicorn/uvicorn workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServiceHandle:
    """A started service: its URL, its process and its log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        """Terminates the whole process group; kills it when it does not exit in time."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            # Already gone between poll() and killpg(): nothing left to stop.
            pass


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow_server(
    backend_uri: str,
    artifacts_destination: str,
    port: int,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    wait_s: float = 180.0,
) -> ServiceHandle:
    """Starts ``mlflow server``; returns once ``/health`` answers (about 8 s on an idle small
    CPU; ``wait_s`` leaves room for a busy one)."""
    if port <= 0 or port > 65535:
        raise ValueError(f"port: {port} is not a TCP port; pick one in 1..65535")
    url = f"http://{host}:{port}"
    if _answers(url):
        raise ValueError(f"port: {port} already serves something; pick a free port")
    log_path = Path(log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"mlflow-{port}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # The factory uses no MLflow server-side jobs; without them the server starts no job workers.
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    child_env = {**os.environ, **quiet, **(env or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    handle = ServiceHandle(url=url, process=process, log_path=log_path)
    deadline = time.monotonic() + wait_s
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            handle.stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server on port {port} did not start:\n{tail}")
        time.sleep(0.2)
    return handle
