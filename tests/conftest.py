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

# pytest imports this file as ``conftest``; test modules that import ``tests.conftest`` run it a
# second time under that name. Both must share one session home: a second one would move
# PREFECT_HOME away from the temporary API already serving the session.
_TWIN = sys.modules.get("tests.conftest" if __name__ == "conftest" else "conftest")
_SESSION_HOME = getattr(_TWIN, "_SESSION_HOME", None) or Path(tempfile.mkdtemp(prefix="taas-test-"))
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
        # A loaded 2-core machine can take longer than the default 20 s to start the local API.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
)
os.environ.pop("PREFECT_API_URL", None)
sys.path.insert(0, str(REPO))

from infra.prefect_server import install  # noqa: E402 (needs the repository on sys.path)

install()  # a killed or timed-out test run leaves no temporary Prefect server behind


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


def start_moto_server(env: dict[str, str] | None = None):
    """Starts moto's standalone S3 server as a subprocess on a free loopback port.

    Returns (process, url) once it answers; ``env`` is added to the server's environment.
    """
    import subprocess
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return server, url
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server as a subprocess on a loopback port; yields its URL.

    AWS test credentials are set in the environment; clients reach it over HTTP with boto3.
    """
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    server, url = start_moto_server()
    yield url
    server.terminate()
    server.wait(timeout=10)


def build_tiny_expert(base, folder: Path, domain: str = "legal", seed: int = 0, steps: int = 8):
    """A LoRA expert on the tiny base, trained a few plain-torch steps so it differs from it."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from factory.base_model import load_base
    from factory.expert import LORA_TARGETS, Expert, ExpertManifest, lora_config_dict, save_expert
    from factory.hashing import tensors_sha256

    torch.manual_seed(seed)
    model, tokenizer = load_base(base.path)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    )
    text = "The licensee shall indemnify the licensor against every claim. " * 8
    batch = tokenizer([text], return_tensors="pt")["input_ids"][:, :64]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    config = model.config
    manifest = ExpertManifest(
        expert_id=f"expert-{domain}",
        domain=domain,
        version=1,
        base_model=base.name,
        base_model_sha256=base.sha256,
        adapter_sha256=tensors_sha256(adapter),
        rank=4,
        lora_alpha=8.0,
        target_modules=sorted(LORA_TARGETS),
        num_layers=config.num_hidden_layers,
        provenance={"seed": seed},
    )
    generator = torch.Generator().manual_seed(seed)
    router = torch.randn(config.num_hidden_layers, config.hidden_size, generator=generator)
    expert = Expert(manifest, adapter, lora_config_dict(4, 8.0), router)
    return save_expert(folder, expert, overwrite=True)


@pytest.fixture(scope="session")
def tiny_expert_folder(tiny_base, tmp_path_factory):
    """A trained tiny LoRA expert folder (domain 'legal') on the tiny base."""
    return build_tiny_expert(tiny_base, tmp_path_factory.mktemp("experts") / "expert-legal")


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """``mlflow server`` on SQLite with artifacts proxied to a bucket on moto's S3; yields URL."""
    import boto3

    from infra.services import start_mlflow_server

    bucket = "taas-mlflow-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    folder = tmp_path_factory.mktemp("mlflow-server")
    handle = start_mlflow_server(
        f"sqlite:///{folder / 'mlflow.db'}",
        f"s3://{bucket}/artifacts",
        free_port(),
        env={"MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        log_path=folder / "server.log",
    )
    yield handle.url
    handle.stop()


@pytest.fixture(scope="session")
def prepared_data(tiny_base, tmp_path_factory):
    """A prepared data folder (``train/`` with an "input_ids" column of 64-token blocks) made
    by tokenizing standard-library docstrings with the tiny base's tokenizer."""
    from datasets import Dataset

    from factory.base_model import load_base
    from factory.corpus import general_text

    _, tokenizer = load_base(tiny_base.path)
    flat: list[int] = []
    for text in general_text(max_chars=60_000):
        flat.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    seq_len = 64
    blocks = [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)][:256]
    folder = tmp_path_factory.mktemp("prepared") / "data"
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(folder / "train"))
    return folder


TINY_COMMISSION = {
    "version": 1,
    "customer": "Acme Legal",
    "domain": "legal-licences",
    "description": "licence texts",
    "data": [{"uri": "licences.jsonl", "text_field": "text"}],
    "base_model": {"name": "taas-embedded-tiny", "preset": "tiny"},
    "expert": {"rank": 4, "alpha": 8},
    "budget": {
        "cycles": 1,
        "steps_per_cycle": 12,
        "production_lines": 2,
        "processes_per_line": 2,
        "batch_size": 4,
        "learning_rate": 0.01,
        "seq_len": 64,
        "zero_stage": 2,
    },
    "heldout": {"fraction": 0.15, "min_tokens": 512},
    "router": {"steps": 10},
    "licence": {"type": "usage", "price_per_1k_tokens": "0.01"},
    "seed": 3,
}


@pytest.fixture(scope="session")
def tiny_commission(tmp_path_factory, tiny_base):
    """A tiny commission run through the whole flow, with a crash in the middle.

    The flow first runs in a child process that is SIGKILLed as soon as its cycle is committed
    (training done, nothing composed or registered yet); the rerun here must resume from the
    committed cycle. Yields a dict: spec_path, settings, summary, train_logs (path -> mtime at
    the kill) and killed (whether the kill landed before the child finished).
    """
    import json
    import signal
    import subprocess
    import time

    import yaml

    from factory.corpus import licence_paragraphs
    from flows.commission import run_commission
    from infra.settings import get_settings

    root = tmp_path_factory.mktemp("commission")
    rows = licence_paragraphs()[:400]
    (root / "licences.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(TINY_COMMISSION))
    home = root / "home"
    child = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "commission_run.py"), str(spec_path), str(home),
         str(root), str(tiny_base.path)],
        stdout=open(root / "first_run.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 1200
    killed = False
    while time.time() < deadline and child.poll() is None:
        if list(home.glob("commissions/*/cycles/cycle-1/COMMITTED.json")):
            os.killpg(child.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    else:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            raise RuntimeError(f"first run neither committed a cycle nor ended; see {root}")
    child.wait()
    logs = sorted(home.glob("commissions/*/cycles/*.lines/*/checkpoints/train.log"))
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    settings = get_settings(home=home, data_roots=[root], base_model_dir=tiny_base.path)
    summary = run_commission(spec_path, settings)
    return {
        "spec_path": spec_path,
        "settings": settings,
        "summary": summary,
        "train_logs": stamps,
        "killed": killed,
    }


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL 15 server from the machine's binaries on a loopback port, for the session
    (see tests/pg.py); stopped and removed at teardown."""
    import pg

    reason = pg.missing()
    if reason:
        pytest.skip(reason)
    server = pg.start_postgres(free_port())
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """The SQLAlchemy URL of a fresh, empty database on the session's PostgreSQL server."""
    import pg

    return pg.new_database(postgres_server)
