"""`taas commission ...` through cli.main.main, and the intake task on the tiny base model."""

from __future__ import annotations

import json
import random

import pytest

from cli.main import main
from factory.commission_store import CommissionStore
from infra.atomic import verify_committed
from infra.settings import get_settings

WORDS = "the tenant shall pay rent monthly and the landlord shall repair the roof promptly".split()


def _rows(n: int) -> list[str]:
    rng = random.Random(5)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 30))) for _ in range(n)]


@pytest.fixture
def workspace(tmp_path, taas_home, tiny_base, monkeypatch):
    data = tmp_path / "specs" / "data"
    data.mkdir(parents=True)
    (data / "leases.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in _rows(200)))
    monkeypatch.setenv("TAAS_DATA_ROOTS", json.dumps([str(tmp_path / "specs")]))
    monkeypatch.setenv("TAAS_BASE_MODEL_DIR", str(tiny_base.path))
    spec = tmp_path / "specs" / "lease.yaml"
    spec.write_text(
        "version: 1\ncustomer: acme\ndomain: leases\ndata:\n  - uri: data/leases.jsonl\n"
        "base_model: {preset: tiny}\nbudget: {seq_len: 32}\n"
        "heldout: {fraction: 0.2, min_tokens: 200}\n"
    )
    return spec, taas_home


BAD = {
    "missing.yaml": None,
    "malformed.yaml": "version: 1\ndata: [unclosed\n",
    "unknown.yaml": "version: 1\ncustomer: a\ndomain: law\ndata: [{uri: /x}]\nbudgett: {}\n",
    "wrongtype.yaml": "version: 1\ncustomer: a\ndomain: law\ndata: [{uri: /x}]\nseed: many\n",
}
EXPECTED = {
    "missing.yaml": "spec: no such file",
    "malformed.yaml": "spec: malformed YAML at line",
    "unknown.yaml": "spec: unknown field 'budgett'",
    "wrongtype.yaml": "spec: field 'seed': Input should be a valid integer",
}


@pytest.mark.parametrize("command", ["validate", "submit"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    command, name, tmp_path, taas_home, capsys
):
    spec = tmp_path / name
    if BAD[name] is not None:
        spec.write_text(BAD[name])
    before = sorted(tmp_path.rglob("*"))
    assert main(["commission", command, str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taas: error: ") and EXPECTED[name] in err
    assert err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before and list(taas_home.iterdir()) == []


def test_validate_reports_and_leaves_no_commission(workspace, capsys):
    spec, home = workspace
    assert main(["commission", "validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "spec ok" in out and "valid: ready to submit" in out
    assert "source: " in out and "leases.jsonl sha256 " in out
    assert "quality: 200 rows in, 200 kept" in out and "duplicate: 0" in out
    assert "train rows" in out and "held-out tokens (min 200)" in out
    assert not (home / "taas.db").exists() and not (home / "commissions").exists()


def test_validate_refuses_data_outside_roots(workspace, tmp_path, capsys):
    spec, _ = workspace
    spec.write_text(spec.read_text().replace("data/leases.jsonl", "/etc/hostname"))
    assert main(["commission", "validate", str(spec)]) == 2
    assert "data URI rejected (outside_roots)" in capsys.readouterr().err


def test_intake_task_records_prepares_and_list_show_cancel(workspace, capsys):
    from tasks.intake import intake_task

    spec, home = workspace
    settings = get_settings()
    result = intake_task.fn(spec, settings)
    assert result.state == "validated" and result.commission_id.startswith("c-")
    assert verify_committed(home / "commissions" / result.commission_id / "data")
    assert result.num_heldout_blocks > 0 and result.heldout_tokens >= 200
    again = intake_task.fn(spec, settings)
    assert again.commission_id == result.commission_id
    assert len(CommissionStore(settings.db_url).list()) == 1

    cid = result.commission_id
    assert main(["commission", "list"]) == 0
    assert f"{cid}  validated" in capsys.readouterr().out
    assert main(["commission", "show", cid]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dataset_sha256"] == result.dataset_sha256 and shown["spec"]["seed"] == 0
    assert main(["commission", "cancel", cid]) == 0
    assert CommissionStore(settings.db_url).get(cid).state == "cancelled"
    assert main(["commission", "cancel", cid]) == 2
    assert "cannot go from cancelled to cancelled" in capsys.readouterr().err
    assert main(["commission", "show", "c-000000000000"]) == 2


@pytest.mark.slow
def test_intake_task_runs_under_prefect_and_caches_by_content(workspace):
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from tasks.intake import intake_task

    spec, home = workspace
    settings = get_settings()
    # A loaded machine can take longer than the default to start the ephemeral API.
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        first = intake_task(spec, settings, return_state=True)
        second = intake_task(spec, settings, return_state=True)
        (home.parent / "specs" / "data" / "more.jsonl").write_text(
            json.dumps({"text": "an appended row about leases and rent " * 3}) + "\n"
        )
        spec.write_text(spec.read_text().replace("data/leases.jsonl", "data"))
        third = intake_task(spec, settings, return_state=True)
    assert first.is_completed() and not first.name == "Cached"
    assert second.name == "Cached" and second.result() == first.result()
    assert third.name != "Cached" and third.result().commission_id != first.result().commission_id
