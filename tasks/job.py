"""Prefect tasks that open, log and close one commission's job (its MLflow run and its state).

:func:`open_job` marks the commission running, opens (or reopens) its MLflow run, packs the
general held-out set and stages the warm-start expert; it returns the :class:`Job` every later
step takes. :func:`log_cycle` puts a committed cycle into the run, :func:`finish_job` records the
outcome. All of them talk to the commission store and the tracking server, so they retry.
:func:`fail_job` is a plain function: it runs while the flow is being torn down (an exception or
a cancellation), when new task runs cannot be relied on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from factory.commission import CommissionSpec
from factory.commission_store import CommissionStore
from infra.atomic import atomic_write_json, verify_committed
from infra.settings import Settings
from tasks.intake import IntakeResult

if TYPE_CHECKING:  # both modules take a Job: imported for the annotations only
    from tasks.cycle_commit import CycleResult
    from tasks.registration import Registration

_IO = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE}


class Job(BaseModel):
    """One running commission: its ids, folders, base model and MLflow run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commission_id: str
    expert_id: str
    root: Path
    spec_sha256: str
    dataset_sha256: str
    base_model_name: str
    base_model_path: Path
    base_model_sha256: str
    data_dir: Path
    general_dir: Path
    parent_dir: Path | None
    run_id: str
    # The library expert the lines started from, "name@version" ("" for the base).
    warm_start_expert: str = ""
    parent_share: str = ""  # of the refined expert's revenue, for the parent's contributors
    tracking_uri: str

    def cycle_dir(self, number: int) -> Path:
        return self.root / "cycles" / f"cycle-{number}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "x"


def expert_id_for(spec: CommissionSpec) -> str:
    """The library name of the commission's expert: unique per customer
    (:func:`factory.customer.expert_id_for`)."""
    from factory.customer import expert_id_for as customer_expert_id

    return customer_expert_id(spec.domain, spec.customer)


def base_model_identity(spec: CommissionSpec, base_path: Path) -> tuple[str, str]:
    """(name, content sha256) of the commission's base model, prepared at ``base_path``."""
    from factory.base_model import base_model_ref

    base = base_model_ref(base_path, spec.base_model)
    return base.name, base.sha256


@task(name="open-job", **_IO)
def open_job(
    intake: IntakeResult, spec: CommissionSpec, settings: Settings, warm_start: str | None
) -> Job:
    """Marks the commission running, opens (or reopens) its MLflow run, packs the general set,
    and stages the warm-start expert (at the commission's LoRA rank) when one is named."""
    from factory.corpus import general_heldout_text
    from factory.data.packing import pack_rows
    from infra import tracking

    commission_id = intake.commission_id
    root = settings.home / "commissions" / commission_id
    store = CommissionStore(settings.db_url)
    if store.get(commission_id).state != "running":
        store.set_state(commission_id, "running")
    general = pack_rows(general_heldout_text(), intake.base_model_path, intake.seq_len,
                        settings.home / "cache" / "packs")  # fmt: skip
    warm_start = _resolve_warm_start(intake, spec, settings, warm_start or spec.warm_start)
    parent_dir = _stage_warm_start(root, spec, settings, warm_start) if warm_start else None
    t = tracking.configure(settings)
    run_file = root / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    if run_id is None:
        tags = {"commission_id": commission_id, "domain": spec.domain}
        if spec.description:
            tags["mlflow.note.content"] = spec.description  # the run's description in the UI
        run_id = tracking.start_run(t, f"commission-{commission_id}", tags)
        atomic_write_json(run_file, {"run_id": run_id})
        tracking.log_params(t, run_id, {
            "spec_sha256": intake.spec_sha256, "dataset_sha256": intake.dataset_sha256,
            **{f"spec.{k}": v for k, v in spec.model_dump(mode="json").items()},
        })  # fmt: skip
        tracking.log_datasets(t, run_id, [
            tracking.DatasetRef.of_file(intake.data_dir / f"{part}.jsonl",
                                        f"{commission_id}-{part}", part,
                                        dataset_sha256=intake.dataset_sha256)
            for part in ("train", "heldout")
        ])  # fmt: skip
    base_name, base_sha = base_model_identity(spec, intake.base_model_path)
    return Job(
        commission_id=commission_id,
        expert_id=expert_id_for(spec),
        root=root,
        spec_sha256=intake.spec_sha256,
        dataset_sha256=intake.dataset_sha256,
        base_model_name=base_name,
        base_model_path=intake.base_model_path,
        base_model_sha256=base_sha,
        data_dir=intake.data_dir,
        general_dir=general.path,
        parent_dir=parent_dir,
        run_id=run_id,
        tracking_uri=settings.tracking_uri,
        warm_start_expert=warm_start or "",
        parent_share=settings.parent_revenue_share if warm_start else "",
    )


def _resolve_warm_start(
    intake: IntakeResult, spec: CommissionSpec, settings: Settings, asked: str
) -> str | None:
    """``none`` -> None; ``auto`` -> the best match on the held-out split, if it beats the base
    by the margin (:mod:`tasks.warm_start`); ``name[@ref]`` -> ``name@version`` as registered
    now, so provenance names the exact parent version."""
    if asked == "none":
        return None
    root = settings.home / "commissions" / intake.commission_id
    if asked == "auto":
        from tasks.warm_start import WARM_START_FILE, WarmStartChoice, choose_warm_start

        if (root / WARM_START_FILE).exists():  # a rerun keeps the first run's choice
            chosen = WarmStartChoice.model_validate_json((root / WARM_START_FILE).read_text())
        else:
            chosen = choose_warm_start(root, spec.customer, intake.base_model_path,
                                       intake.data_dir / "heldout", settings)  # fmt: skip
        print(f"[commission {intake.commission_id}] warm start auto: {chosen.chosen or 'base'}")
        return chosen.chosen or None
    from factory.library.registry import ExpertLibrary

    name, _, ref = asked.partition("@")
    return f"{name}@{ExpertLibrary(settings).show(name, ref or 'champion').version}"


def _stage_warm_start(root: Path, spec: CommissionSpec, settings: Settings, name: str) -> Path:
    """Downloads a library expert and re-compresses it to the spec's rank when it differs."""
    from factory.expert import load_expert, lora_config_dict, write_adapter_files
    from factory.library.registry import ExpertLibrary
    from infra.atomic import committed_dir
    from merging.lora_algebra import recompress, rescale_to_config

    folder = root / "warm_start"
    if verify_committed(folder):
        return folder
    name, _, ref = name.partition("@")
    source = ExpertLibrary(settings).download(name, ref or "champion", root / "warm_start.src",
                                              overwrite=True)  # fmt: skip
    expert = load_expert(source)
    adapter, config = expert.adapter, expert.adapter_config
    if int(config["r"]) != spec.expert.rank:
        packed = recompress(adapter, config, spec.expert.rank)
        adapter, config = packed.adapter, packed.adapter_config
    target = lora_config_dict(spec.expert.rank, spec.expert.alpha, tuple(config["target_modules"]))
    with committed_dir(folder, overwrite=True) as tmp:
        write_adapter_files(tmp, rescale_to_config(adapter, config, target), target)
    return folder


@task(name="log-cycle", **_IO)
def log_cycle(job: Job, settings: Settings, result: CycleResult) -> None:
    """The cycle's PoL scores, rejections, losses and alpha as run metrics; its files as
    artifacts."""
    from infra import tracking

    t = tracking.configure(settings)
    step = result.cycle
    metrics = {f"pol.{line}": score for line, score in result.pol.items()}
    metrics["cycle.rejections"] = len(result.rejections)
    for key in ("heldout_loss_before", "heldout_loss_after", "alpha", "recompress_error"):
        value = getattr(result, key)
        if value is not None:
            metrics[f"cycle.{key}"] = float(value)
    tracking.log_metrics(t, job.run_id, metrics, step=step)
    for name in ("cycle.json", "alpha_curve.png"):
        if (job.cycle_dir(step) / name).exists():
            tracking.log_artifacts(
                t, job.run_id, job.cycle_dir(step) / name, f"cycles/cycle-{step}"
            )


@task(name="finish-job", **_IO)
def finish_job(job: Job, settings: Settings, registered: Registration | None) -> None:
    """Marks the commission registered (or failed: nothing improved) and ends its run."""
    from infra import tracking

    store = CommissionStore(settings.db_url)
    if registered is not None:
        store.set_state(job.commission_id, "registered", f"{registered.name} v{registered.version}")
    else:
        store.set_state(job.commission_id, "failed", "no cycle improved the held-out loss")
    tracking.end_run(tracking.configure(settings), job.run_id)


def fail_job(job: Job, settings: Settings, exc: BaseException) -> None:
    """Records why the flow stopped (cancelled or failed) and ends the run as FAILED."""
    from infra import tracking

    store = CommissionStore(settings.db_url)
    detail = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
    state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
    try:
        if store.get(job.commission_id).state != "cancelled":
            store.set_state(job.commission_id, state, detail)
    finally:
        tracking.end_run(tracking.configure(settings), job.run_id, "FAILED")
