"""Prefect task for commission intake: validate the spec, record the commission, prepare its data.

``intake_task(spec_path, settings)`` returns an :class:`IntakeResult` (ids, hashes, the data
folder, counts).
Its cache key is built from content hashes (the validated spec's sha256 and the dataset's sha256),
never from paths. It retries only when object storage is unreachable; bad data marks the
commission ``failed`` and is not retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from factory.commission import load_spec, spec_sha256
from factory.commission_store import CommissionStore
from factory.data.prepare import base_model_folder, prepare_data
from factory.data.sources import dataset_sha256, fetch_sources
from factory.hashing import json_sha256
from infra.settings import Settings
from infra.storage import StorageUnavailable


class IntakeResult(BaseModel):
    """The commission as intake left it: its ids and hashes, and its prepared data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commission_id: str
    state: str
    spec_sha256: str
    dataset_sha256: str
    data_dir: Path
    base_model_path: Path
    seq_len: int
    num_train_blocks: int
    num_heldout_blocks: int
    heldout_tokens: int


def intake(
    spec_path: Path, settings: Settings, benchmark_items: Sequence[str] = ()
) -> IntakeResult:
    """validate -> record (submitted) -> prepare data -> validated; returns the intake summary."""
    spec = load_spec(spec_path)
    spec_sha = spec_sha256(spec)
    settings.ensure_home()
    files = fetch_sources(spec, settings)
    data_sha = dataset_sha256(files)
    store = CommissionStore(settings.db_url)
    record = store.submit(spec, spec_sha, data_sha)
    if record.state == "cancelled":
        raise ValueError(
            f"commission {record.commission_id} was cancelled; change the spec "
            "(for example its seed) to commission it again"
        )
    base = base_model_folder(spec, settings)
    data_dir = settings.home / "commissions" / record.commission_id / "data"
    try:
        prepared = prepare_data(
            spec, base, data_dir, settings, benchmark_items=benchmark_items, files=files
        )
    except ValueError as exc:
        store.set_state(record.commission_id, "failed", str(exc).splitlines()[0])
        raise
    if record.state == "submitted":
        record = store.set_state(record.commission_id, "validated")
    return IntakeResult(
        commission_id=record.commission_id,
        state=record.state,
        spec_sha256=spec_sha,
        dataset_sha256=data_sha,
        data_dir=prepared.root,
        base_model_path=base,
        seq_len=prepared.seq_len,
        num_train_blocks=prepared.num_train_blocks,
        num_heldout_blocks=prepared.num_heldout_blocks,
        heldout_tokens=prepared.heldout_tokens,
    )


def _content_key(context: Any, parameters: dict[str, Any]) -> str:
    settings: Settings = parameters["settings"]
    spec = load_spec(parameters["spec_path"])
    files = fetch_sources(spec, settings)
    items = json_sha256(list(parameters.get("benchmark_items") or ()))
    # The result names a folder and a row in this home's stores, so the key is scoped to them.
    return json_sha256(
        {"spec": spec_sha256(spec), "data": dataset_sha256(files), "items": items,
         "home": str(settings.home), "db": settings.db_url}
    )  # fmt: skip


def _storage_flake(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except StorageUnavailable:
        return True
    except Exception:
        return False
    return False


@task(
    name="commission-intake",
    cache_key_fn=_content_key,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_storage_flake,
)
def intake_task(
    spec_path: Path, settings: Settings, benchmark_items: Sequence[str] = ()
) -> IntakeResult:
    """Runs :func:`intake` (same arguments)."""
    return intake(Path(spec_path), settings, benchmark_items)
