"""The cycle's side of production lines on a work pool: stage, submit, watch, resubmit.

:func:`dispatch_lines` replaces the local subprocesses of :func:`flows.cycle.train_lines` when
``Settings.line_work_pool`` is set; see :mod:`flows.train_line` for the worker's side and for
what travels through the object store.

Why the cycle watches heartbeats: a process worker that dies (its machine lost, SIGKILL) leaves
its flow run PENDING or RUNNING on the server forever: nothing else marks it crashed. So a run
whose heartbeat object (``<line_id>/attempts/<flow run id>.json``, rewritten by the line every
``heartbeat_s``) has not changed for ``Settings.line_heartbeat_timeout_s`` by the cycle's own
clock (the machines' clocks are never compared) is set to Crashed and submitted again; the new
run, on any live worker, resumes from the newest checkpoint the store holds.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger

from factory.train_config import TrainConfig
from flows.train_line import LineJob, LineOutcome, pool_slots_name
from infra import line_io
from infra.settings import Settings
from infra.storage import ObjectNotFound, open_store
from tasks.slots import ensure_limit
from tasks.training import LineResult

POLL_S = 1.0


def ensure_pool_slots(pool: str, slots: int) -> int:
    """The pool's global concurrency limit, created with ``slots`` when absent."""
    return ensure_limit(pool_slots_name(pool), slots)


def _relative_config(config: TrainConfig) -> TrainConfig:
    """The line's config as every worker runs it: paths inside the line's work folder."""
    return config.model_copy(
        update={
            "base_model_path": Path("base"),
            "data_path": Path("data"),
            "init_adapter": None if config.init_adapter is None else Path("parent"),
            "key_path": Path("line.key"),
            "ds_config_overlay": None if config.ds_config_overlay is None else Path(
                "ds_overlay.json"),
            "checkpoint_dir": Path("checkpoints"),
            "output_dir": Path("candidate"),
        }
    )  # fmt: skip


def stage_jobs(
    configs: list[TrainConfig], nprocs: int, settings: Settings, timeout_s: float,
    run_id: str | None,
) -> list[LineJob]:  # fmt: skip
    """Uploads the lines' inputs (each content once) and returns one job per line."""
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    trees: dict[Path, str] = {}

    def tree(folder: Path, include: tuple[str, ...] = ()) -> str:
        if folder not in trees:
            trees[folder] = line_io.put_tree(store, folder, include)
        return trees[folder]

    # A worker can reach the tracking server only when it is one (not a local SQLite file).
    tracking = settings.tracking_uri if settings.tracking_uri.startswith("http") else None
    jobs = []
    for config in configs:
        remote = _relative_config(config)
        overlay = config.ds_config_overlay
        jobs.append(
            LineJob(
                line_id=f"lines/{config.expert_id}/cycle-{config.cycle}/"
                f"{config.contributor_id}/{remote.sha256()[:16]}",
                config=remote,
                objects_url=settings.objects_url,
                s3_endpoint_url=settings.s3_endpoint_url,
                base_tree=tree(config.base_model_path),
                data_tree=tree(config.data_path, ("train",)),  # held-out data stays home
                parent_tree=None if config.init_adapter is None else tree(config.init_adapter),
                key_blob=line_io.put_blob(store, config.key_path),
                overlay_blob=None if overlay is None else line_io.put_blob(store, overlay),
                nprocs=nprocs,
                launcher=settings.launcher,
                timeout_s=timeout_s,
                pool=settings.line_work_pool or "",
                heartbeat_s=max(1.0, settings.line_heartbeat_timeout_s / 6),
                tracking_uri=tracking if run_id else None,
                run_id=run_id if tracking else None,
            )
        )
    return jobs


@dataclass
class _Attempt:
    job: LineJob
    local: TrainConfig
    number: int = 0
    flow_run_id: object = None
    beat: bytes | None = None
    beat_seen: float = 0.0  # monotonic time the heartbeat last changed (or the run was seen)
    history: list[str] = field(default_factory=list)
    result: LineResult | None = None


def _lost(job: LineJob, local: TrainConfig, reason: str) -> LineResult:
    """An infrastructure failure: never the contributor's fault, so retryable."""
    return LineResult(contributor_id=local.contributor_id, candidate_path=None,
                      outcome="retryable", reason=reason, final_loss=None, tokens_seen=0,
                      config_sha256=job.config.sha256())  # fmt: skip


@contextmanager
def _cancelled_on_interrupt(client, attempts: list[_Attempt]):
    """A cancelled or failed cycle takes its outstanding line runs down with it."""
    from prefect.states import Cancelling

    try:
        yield
    except BaseException:
        for a in attempts:
            if a.result is None and a.flow_run_id is not None:
                try:
                    client.set_flow_run_state(a.flow_run_id, Cancelling(), force=True)
                except Exception:  # best effort: the original error is the one to report
                    pass
        raise


def dispatch_lines(
    configs: list[TrainConfig], nprocs: int, settings: Settings, deadline: datetime,
    run_id: str | None = None,
) -> list[LineResult]:  # fmt: skip
    """Runs every line as a ``train-line`` deployment run on ``settings.line_work_pool`` and
    waits for them up to ``deadline``; results in the order of ``configs``, candidates fetched
    to each config's ``output_dir``."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run
    from prefect.states import Cancelling, Crashed

    logger = get_run_logger()
    pool = settings.line_work_pool
    assert pool, "dispatch_lines needs settings.line_work_pool"
    ensure_pool_slots(pool, settings.line_pool_slots or settings.max_concurrent_lines * nprocs)
    remaining = max(1.0, (deadline - datetime.now(UTC)).total_seconds())
    jobs = stage_jobs(configs, nprocs, settings, remaining, run_id)
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    parent = str(flow_run.id or "no-parent")
    attempts = [_Attempt(job, config) for job, config in zip(jobs, configs, strict=True)]

    def submit(a: _Attempt) -> None:
        a.number += 1
        run = run_deployment(
            settings.line_deployment,
            parameters={"job": a.job.model_dump(mode="json")},
            timeout=0,  # returns once created: this loop watches it
            as_subflow=True,
            idempotency_key=f"{parent}/{a.job.line_id}/{a.number}",
            tags=["taas", "line"],
        )
        a.flow_run_id, a.beat, a.beat_seen = run.id, None, time.monotonic()
        logger.info("line %s: attempt %d is flow run %s", a.local.contributor_id, a.number, run.id)

    def retry(a: _Attempt, why: str) -> None:
        a.history.append(f"attempt {a.number}: {why}")
        logger.warning("line %s: %s", a.local.contributor_id, a.history[-1])
        if a.number >= settings.line_max_attempts:
            a.result = _lost(a.job, a.local, f"lost after {a.number} attempts: {a.history}")
        else:
            submit(a)

    def finish(a: _Attempt) -> None:
        key = f"{a.job.line_id}/results/{a.flow_run_id}.json"
        try:
            outcome = LineOutcome.model_validate_json(store.get_bytes(key))
        except ObjectNotFound:
            return retry(a, "completed without a result in the store")
        candidate = None
        if outcome.candidate_tree is not None:
            candidate = Path(a.local.output_dir)
            shutil.rmtree(candidate, ignore_errors=True)
            line_io.fetch_tree(store, outcome.candidate_tree, candidate)
        a.result = outcome.result.model_copy(
            update={"candidate_path": candidate, "worker": outcome.worker,
                    "resumed_from_step": outcome.resumed_from_step}
        )  # fmt: skip

    for a in attempts:
        submit(a)
    with get_client(sync_client=True) as client, _cancelled_on_interrupt(client, attempts):
        while any(a.result is None for a in attempts):
            if datetime.now(UTC) >= deadline:
                for a in attempts:
                    if a.result is None:
                        client.set_flow_run_state(a.flow_run_id, Cancelling(), force=True)
                        a.result = _lost(a.job, a.local, "timeout: the cycle's deadline passed")
                break
            time.sleep(POLL_S)
            for a in (a for a in attempts if a.result is None):
                state = client.read_flow_run(a.flow_run_id).state
                kind = state.type.value if state is not None else "SCHEDULED"
                if kind == "COMPLETED":
                    finish(a)
                elif kind in ("FAILED", "CRASHED"):
                    retry(a, f"{kind.lower()}: {state.message or ''}".strip())
                elif kind == "CANCELLED":  # someone stopped it on purpose: not resubmitted
                    a.result = _lost(a.job, a.local, f"cancelled: {state.message or ''}")
                elif kind in ("PENDING", "RUNNING"):  # a worker holds it: is it alive?
                    beat_key = f"{a.job.line_id}/attempts/{a.flow_run_id}.json"
                    try:
                        beat = store.get_bytes(beat_key)
                    except ObjectNotFound:
                        beat = None
                    # Before its first beat a run is starting (a process, imports, pull
                    # steps: minutes on a busy machine); after it, silence means it is gone.
                    limit = (settings.line_start_timeout_s if a.beat is None
                             else settings.line_heartbeat_timeout_s)  # fmt: skip
                    if beat != a.beat:
                        a.beat, a.beat_seen = beat, time.monotonic()
                    elif time.monotonic() - a.beat_seen > limit:
                        message = f"no heartbeat for {limit:g} s: its worker is gone"
                        # Should it only be slow, its line stops itself on seeing this.
                        store.put_bytes(f"{a.job.line_id}/attempts/{a.flow_run_id}.abandoned",
                                        message.encode())  # fmt: skip
                        client.set_flow_run_state(a.flow_run_id, Crashed(message=message),
                                                  force=True)  # fmt: skip
                        retry(a, message)
    results = [a.result for a in attempts]
    for r in results:
        level = logging.INFO if r.outcome == "ok" else logging.WARNING
        logger.log(level, "line %s on %s: %s (%s)", r.contributor_id, r.worker, r.outcome,
                   r.reason or "ok")  # fmt: skip
    return results
