"""Shared fixtures: offline environment, a per-session Prefect home, the tiny base model.

The tiny base model (hidden 32, 2 layers, BPE vocab 512) is built once and cached as a committed
folder under ``.cache/test`` (content-addressed by its preset), so later sessions reuse it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TAAS_TEST_CACHE", REPO / ".cache" / "test"))

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="taas-test-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SESSION_HOME / "prefect" / "results"),
        "TORCH_EXTENSIONS_DIR": str(CACHE.parent / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.pop("PREFECT_API_URL", None)
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny embedded base model: BaseModelRef(name, path, sha256)."""
    from factory.base_model import ensure_base_model

    return ensure_base_model(CACHE, "tiny", log=lambda *_: None)


@pytest.fixture
def taas_home(tmp_path, monkeypatch):
    """A fresh TAAS_HOME for one test (SQLite MLflow, local objects, SQLite ledger)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TAAS_HOME", str(home))
    return home


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server as a subprocess on a loopback port; yields its URL.

    AWS test credentials are set in the environment; clients reach it over HTTP with boto3.
    """
    import subprocess
    import time
    import urllib.request

    port = free_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)
