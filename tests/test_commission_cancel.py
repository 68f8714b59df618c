"""A cancelled commission stops before its next cycle: no line is trained."""

from pathlib import Path

import pytest
from prefect import flow

from factory.commission import parse_spec, spec_sha256
from factory.commission_store import CommissionStore
from flows.commission import CommissionCancelled, run_cycles
from infra.settings import get_settings
from tasks.job import Job
from tests.conftest import TINY_COMMISSION


def test_cancelled_commission_trains_no_cycle(tmp_path):
    settings = get_settings(home=tmp_path / "home")
    settings.ensure_home()
    spec = parse_spec(TINY_COMMISSION, base_dir=tmp_path)
    store = CommissionStore(settings.db_url)
    record = store.submit(spec, spec_sha256(spec), "d" * 64)
    store.set_state(record.commission_id, "validated")
    store.set_state(record.commission_id, "running")
    store.cancel(record.commission_id)
    root = settings.home / "commissions" / record.commission_id
    job = Job(
        commission_id=record.commission_id, expert_id="legal-acme", root=root,
        spec_sha256=spec_sha256(spec), dataset_sha256="d" * 64, base_model_name="tiny",
        base_model_path=Path("/nonexistent"), base_model_sha256="b" * 64,
        data_dir=root / "data", general_dir=root / "general", parent_dir=None, run_id="r",
        tracking_uri=settings.tracking_uri,
    )  # fmt: skip

    @flow
    def commission_cycles() -> None:  # run_cycles is a step of the commission flow
        run_cycles(job, spec, settings)

    with pytest.raises(CommissionCancelled, match=record.commission_id):
        commission_cycles()
    assert not (root / "cycles").exists()
    assert store.get(record.commission_id).state == "cancelled"
