"""Production lines on a Prefect work pool: the ``train-line`` flow and the cycle's dispatcher.

When ``Settings.line_work_pool`` names a pool, a cycle's lines run as runs of the ``train-line``
deployment (prefect.yaml) on whichever machine's worker picks them up; otherwise they stay local
subprocesses (:func:`flows.cycle.train_lines`). Cycle and line share only the object store:

- :func:`dispatch_lines` (the cycle's side) uploads the base model, the data's ``train`` split,
  the parent adapter and each line's signing key by content hash (:mod:`infra.line_io`, once per
  content), submits one deployment run per line, and watches them: a run that completes hands
  back its result and candidate through the store; a run that fails or crashes, or whose
  heartbeat stops while it is pending or running (its worker died: nobody else would notice on
  a process worker), is marked crashed and submitted again, up to ``line_max_attempts``, until
  the cycle's deadline;
- :func:`train_line_flow` (the worker's side) fetches the inputs into the machine's own cache
  (verified), restores the newest checkpoint the store holds for the line, takes ``nprocs`` of
  its machine's process slots (:func:`tasks.slots.held_machine_slots`) and as many of the pool's
  global concurrency limit ``line-slots-<pool>``, trains, publishes every
  checkpoint as soon as it is saved and beats a heartbeat while it works, then uploads the
  candidate. Its config holds only paths relative to the line's work folder, so its hash (which
  a checkpoint must match to be resumed) is the same on every machine.

Run a worker with ``prefect worker start --pool <pool> --type process --limit 2`` in an
environment with the repository, ``TAAS_HOME`` (the machine's cache, work folders and slots) and
the store's credentials. With ``--limit 2`` the machine's next line starts its process, imports
and stages its inputs while the current one trains, then waits for the machine's slots: the
flow-run start (most of a line's overhead) is hidden behind training, and the slots
(``Settings.line_machine_slots``) keep the machine from training two lines on the same GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from factory.train_config import TrainConfig
from infra import line_io
from infra.hardware import machine_slots
from infra.settings import get_settings
from infra.storage import ObjectStore, open_store
from tasks.slots import held_machine_slots, held_slots, machine_folder
from tasks.training import LineResult, run_training

REPO = Path(__file__).resolve().parents[1]


class LineJob(BaseModel):
    """Everything a line needs, by content hash; the ``train-line`` flow's only parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line_id: str  # object-store prefix of the line: lines/<expert>/cycle-<n>/<contributor>/<cfg>
    config: TrainConfig  # paths relative to the line's work folder (see _relative_config)
    objects_url: str
    s3_endpoint_url: str | None
    base_tree: str
    data_tree: str
    parent_tree: str | None
    key_blob: str
    overlay_blob: str | None
    nprocs: int
    launcher: Literal["torchrun", "deepspeed"]
    timeout_s: float
    pool: str
    heartbeat_s: float
    tracking_uri: str | None
    run_id: str | None


class LineOutcome(BaseModel):
    """What a line run leaves in the store (``<line_id>/results/<flow run id>.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    result: LineResult  # candidate_path relative to the worker's line folder; see candidate_tree
    candidate_tree: str | None
    worker: str
    flow_run_id: str
    resumed_from_step: int | None
    # stage_s (inputs, checkpoint), wait_s (for the machine's and the pool's slots), train_s,
    # publish_s (uploads)
    timings: dict[str, float]
    train_window: tuple[float, float]  # start and end of training by the machine's clock


def pool_slots_name(pool: str) -> str:
    return f"line-slots-{pool}"


# -- the worker's side ---------------------------------------------------------------------


@contextmanager
def _working_in(folder: Path):
    # The trainer resolves its config's relative paths against its working folder; the flow
    # run is a process of its own on a process worker, so changing it is local to this line.
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


class _Mirror(threading.Thread):
    """Publishes each new local checkpoint and beats the line's heartbeat until stopped."""

    def __init__(self, store: ObjectStore, job: LineJob, work: Path, worker: str, run: str):
        super().__init__(name="line-mirror", daemon=True)
        self.store, self.job, self.work, self.worker, self.run_key = store, job, work, worker, run
        self.stop = threading.Event()
        self.published = set(line_io.checkpoint_steps(store, job.line_id))
        self.seq = 0
        self.abandoned = False

    def sweep(self) -> None:
        from factory import checkpoint

        for step, folder in checkpoint.list_checkpoints(self.work / "checkpoints"):
            if step not in self.published and checkpoint.verify_committed(folder):
                line_io.publish_checkpoint(self.store, self.job.line_id, folder, step)
                self.published.add(step)
                line_io.prune_checkpoints(self.store, self.job.line_id, self.job.config.keep_last)

    def beat(self) -> None:
        if self.store.exists(f"{self.job.line_id}/attempts/{self.run_key}.abandoned"):
            # The cycle gave this run up (it looked dead) and resubmitted the line: two runs
            # must not train it at once, so this one stops its job and fails.
            from infra.launcher import stop_all_jobs

            self.abandoned = True
            stop_all_jobs()
            return
        self.seq += 1
        body = {"worker": self.worker, "pid": os.getpid(), "seq": self.seq,
                "checkpoints": sorted(self.published)}  # fmt: skip
        self.store.put_bytes(f"{self.job.line_id}/attempts/{self.run_key}.json",
                             json.dumps(body).encode())  # fmt: skip

    def run(self) -> None:
        last_beat = 0.0
        while not self.stop.wait(0.2):  # a saved checkpoint is seen within 0.2 s
            try:
                self.sweep()
                if time.monotonic() - last_beat >= self.job.heartbeat_s:
                    self.beat()
                    last_beat = time.monotonic()
            except FileNotFoundError:  # the trainer pruned a checkpoint while it was read
                continue
            except OSError as exc:  # a store hiccup must not kill training: next round retries
                print(f"line mirror: {exc}", file=sys.stderr)


def _stage_inputs(store: ObjectStore, job: LineJob, work: Path, cache: Path) -> int | None:
    """Fetches the inputs into the cache, links them into ``work`` and restores the store's
    newest checkpoint when it is newer than the local one; returns its step."""
    from factory import checkpoint

    _link(work / "base", line_io.cached_tree(store, job.base_tree, cache))
    _link(work / "data", line_io.cached_tree(store, job.data_tree, cache))
    if job.parent_tree is not None:
        _link(work / "parent", line_io.cached_tree(store, job.parent_tree, cache))
    line_io.fetch_blob(store, job.key_blob, work / "line.key")
    os.chmod(work / "line.key", 0o600)
    if job.overlay_blob is not None:
        line_io.fetch_blob(store, job.overlay_blob, work / "ds_overlay.json")
    remote = line_io.newest_checkpoint(store, job.line_id)
    local = checkpoint.latest_valid(work / "checkpoints")
    if remote is None or (local is not None and local[0] >= remote[0]):
        return None
    step, tree = remote
    target = work / "checkpoints" / checkpoint.checkpoint_name(step)
    shutil.rmtree(target, ignore_errors=True)
    line_io.fetch_tree(store, tree, target)
    return step


@flow(name="train-line", flow_run_name="line {job.config.contributor_id} cycle {job.config.cycle}")
def train_line_flow(job: LineJob) -> LineOutcome:
    """Trains one line on this machine (see the module docstring)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    settings = get_settings()
    store = open_store(job.objects_url, job.s3_endpoint_url or settings.s3_endpoint_url)
    worker = settings.line_worker_name or socket.gethostname()
    run_key = str(flow_run.id or f"local-{os.getpid()}")
    work = settings.home / "line-work" / job.line_id
    work.mkdir(parents=True, exist_ok=True)
    mirror = _Mirror(store, job, work, worker, run_key)
    mirror.beat()  # before the downloads: a slow fetch must not look like a dead worker
    mirror.start()
    clock = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        restored = _stage_inputs(store, job, work, settings.home / "line-cache")
        timings["stage_s"] = time.perf_counter() - clock
        logger.info("line %s on %s: inputs staged, checkpoint from the store: %s",
                    job.config.contributor_id, worker, restored)  # fmt: skip
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        slots = settings.line_machine_slots or machine_slots()
        clock = time.perf_counter()
        with held_machine_slots(machine_folder(settings.home), slots, job.nprocs):
            timings["machine_wait_s"] = time.perf_counter() - clock
            with held_slots(pool_slots_name(job.pool), job.nprocs):
                timings["wait_s"] = time.perf_counter() - clock
                clock, started = time.perf_counter(), time.time()
                with _working_in(work):
                    result = run_training(
                        job.config, job.nprocs, job.launcher, job.timeout_s,
                        job.tracking_uri, job.run_id, None, env,
                    )  # fmt: skip
                window = (started, time.time())
        timings["train_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        mirror.sweep()
    finally:
        mirror.stop.set()
        mirror.join(timeout=30)
        log = work / "checkpoints" / "train.log"
        if log.is_file():
            store.put_file(f"{job.line_id}/logs/{run_key}.log", log)
    if mirror.abandoned:
        raise RuntimeError("the cycle abandoned this run and resubmitted its line")
    tree = None
    if result.outcome == "ok":
        tree = line_io.put_tree(store, work / "candidate")
    timings["publish_s"] = time.perf_counter() - clock
    outcome = LineOutcome(
        result=result,
        candidate_tree=tree,
        worker=worker,
        flow_run_id=run_key,
        resumed_from_step=restored,
        timings=timings,
        train_window=window,
    )
    store.put_bytes(f"{job.line_id}/results/{run_key}.json", outcome.model_dump_json().encode())
    return outcome
