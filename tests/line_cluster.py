"""A work pool on this machine for tests and benches: a real ``prefect server start`` on a
loopback port, the ``train-line`` deployment from prefect.yaml (``prefect deploy``), process
workers each in its own working folder with its own TAAS_HOME and PREFECT_HOME, and moto's S3
server, the only thing a cycle shares with the workers. :func:`local_pool` kills every process
tree it started when it exits, however it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import free_port, start_moto_server  # noqa: E402

POOL = "lines"
BUCKET = "taas-lines"
PREFECT = str(Path(sys.executable).with_name("prefect"))
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
PASSED = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR",
          "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM")  # fmt: skip


def s3_creds() -> dict:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}  # fmt: skip


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process, its group and every descendant (flow runs sit in sessions of their
    own, torchrun's ranks too): what losing the machine does to them."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()  # not a group leader (moto's server): the group kill missed it
    proc.wait(timeout=10)
    psutil.wait_procs(family, timeout=10)


def wait_for(what: str, check, seconds: float, step: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


def _cli(args: list[str], env: dict, cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def local_pool(
    root: Path,
    workers: tuple[str, ...] = ("wA", "wB"),
    limit: int = 1,
    pool: str = POOL,
    deployment: str = "train-line",
    worker_env: dict[str, str] | None = None,
    database_url: str | None = None,
) -> Iterator[dict]:
    """Yields {"api", "s3", "root", "client_env", "workers": {name: {"proc", "home", "folder"}}}
    for ``deployment`` of prefect.yaml on ``pool``; ``worker_env`` overrides the workers'
    environment (a TAAS_HOME of the caller's, say; ``{s3}`` in a value is the S3 endpoint).

    ``database_url`` (an empty PostgreSQL database, tests/pg.py) is the server's database, as
    on a pool of several machines: on its default SQLite, the server's writes (states, slot
    leases, worker heartbeats) wait on one lock, and under a cycle's load some fail with
    "database is locked" and are retried by the client, seconds later."""
    import boto3

    root.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TAAS_"))}
    base_env.update(AWS, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    try:
        moto, s3_url = start_moto_server(AWS)
        started.append(moto)
        boto3.client("s3", endpoint_url=s3_url, **s3_creds()).create_bucket(Bucket=BUCKET)
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        server_db = {}
        if database_url:  # Prefect's server speaks asyncpg
            driverless = database_url.split("://", 1)[1]
            server_db["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://{driverless}"
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**base_env, "PREFECT_HOME": str(root / "server"), **server_db},
            stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        started.append(server)

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(api + "/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for("the Prefect server", healthy, 180)
        client_env = {**base_env, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / "client"),
                      "TAAS_REPO_DIR": str(REPO)}  # fmt: skip
        _cli(["work-pool", "create", pool, "--type", "process"], client_env, root)
        _cli(["--no-prompt", "deploy", "--name", deployment], client_env, REPO)
        handles = {}
        for name in workers:
            folder = root / name
            (folder / "home").mkdir(parents=True)
            env = {
                **client_env,
                **{key: os.environ[key] for key in PASSED if key in os.environ},
                "PREFECT_HOME": str(folder / "prefect"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "TAAS_HOME": str(folder / "home"),
                "TAAS_LINE_WORKER_NAME": name,
                # each worker stands for a machine of one line process
                "TAAS_LINE_MACHINE_SLOTS": "1",
                "PYTHONPATH": str(REPO),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                **{k: v.replace("{s3}", s3_url) for k, v in (worker_env or {}).items()},
            }
            proc = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                 "--limit", str(limit), "--name", name],
                env=env, cwd=folder, stdout=open(folder / "worker.log", "wb"),
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            started.append(proc)
            handles[name] = {"proc": proc, "home": folder / "home", "folder": folder}
        yield {"api": api, "s3": s3_url, "root": root, "client_env": client_env,
               "workers": handles}  # fmt: skip
    finally:
        for proc in reversed(started):
            kill_tree(proc)


def pool_cycle(pool: dict, base, data_dir: Path, name: str, lines: int, steps: int,
               heartbeat_timeout_s: float = 15, batch_size: int = 4) -> tuple:  # fmt: skip
    """(inputs, plan, settings) of a cycle with its own TAAS_HOME whose lines go to the pool."""
    import json
    from datetime import UTC, datetime, timedelta

    from factory.commission import CommissionSpec
    from factory.ledger import Ledger
    from factory.production_line import ensure_line_keys, plan_lines
    from infra.settings import get_settings
    from tasks.cycle import CycleInputs, CyclePlan, PolPlan
    from tests.conftest import TINY_COMMISSION

    home = pool["root"] / f"cycle-{name}"
    os.environ.update(AWS)
    settings = get_settings(
        home=home,
        object_store_url=f"s3://{BUCKET}/factory",
        s3_endpoint_url=pool["s3"],
        line_work_pool=POOL,
        line_pool_slots=len(pool["workers"]),
        line_heartbeat_timeout_s=heartbeat_timeout_s,
        processes_per_line=1,
    )
    body = json.loads(json.dumps(TINY_COMMISSION))
    body["budget"].update(production_lines=lines, processes_per_line=1, steps_per_cycle=steps,
                          zero_stage=0, batch_size=batch_size)  # fmt: skip
    inputs = CycleInputs(
        commission_id=f"c-{name}", expert_id=f"expert-{name}", cycle=1,
        spec=CommissionSpec.model_validate(body), base_model_path=base.path,
        base_model_sha256=base.sha256, data_dir=data_dir, general_dir=data_dir,
        parent_dir=None, cycle_dir=home / "cycles" / "cycle-1",
    )  # fmt: skip
    specs = plan_lines(lines, base_seed=7, num_shards=lines)
    keys = ensure_line_keys(settings.ensure_home(), Ledger(settings.db_url), specs)
    plan = CyclePlan(
        lines=specs, key_paths=keys, pol=PolPlan(batch_size=1, num_batches=1, seed=0),
        deadline=datetime.now(UTC) + timedelta(seconds=900), parent_dir=None,
    )  # fmt: skip
    return inputs, plan, settings


def run_train_step(api: str, inputs, plan, settings):
    """The cycle's train step (flows.cycle.train_lines) inside a flow run on the pool's server."""
    from prefect import flow
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cycle import train_lines

    @flow(name="cycle-train-step")
    def train_step():
        return train_lines(inputs, plan, settings)

    with temporary_settings({PREFECT_API_URL: api}):
        try:
            return train_step()
        finally:
            # The step's logs and events go to the pool's server in the background; sent now,
            # while it is up, they are not retried against a stopped server at this process's
            # exit (a minute of "Error logging to API" after the tests that use the pool).
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
