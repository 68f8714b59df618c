"""What the Prefect UI shows of a commission, read back from the real (ephemeral) Prefect API:
run names that say commission, cycle and line; the PoL table, the rejections, the WiSE-FT curve,
the gate's decision and the MLflow link as artifacts keyed per expert; the training slots as a
global concurrency limit that keeps lines from overlapping beyond its slots."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterName,
    TaskRunFilter,
    TaskRunFilterName,
)

from tasks.artifacts import artifact_key, mlflow_version_url
from tasks.slots import TRAIN_SLOTS, ensure_limit


def _artifacts(key: str):
    with get_client(sync_client=True) as client:
        only = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        return client.read_artifacts(artifact_filter=only)


def test_artifact_keys_follow_prefects_rules():
    assert artifact_key("legal-acme_legal-1234", "wise-ft") == "legal-acme-legal-1234-wise-ft"
    assert artifact_key("Médical Ünïon", "pol") == "m-dical-n-on-pol"
    assert mlflow_version_url("http://127.0.0.1:5000/", "e", "3") == (
        "http://127.0.0.1:5000/#/models/e/versions/3"
    )
    assert mlflow_version_url("sqlite:///x.db", "e", "3") == "models:/e/3"


def test_commission_publishes_artifacts_and_names_its_runs(tiny_commission):
    summary = tiny_commission["summary"]
    expert, commission = summary["expert_id"], summary["commission_id"]
    registered = summary["registered"]

    pol = _artifacts(artifact_key(expert, "pol"))
    assert pol and all(a.type == "table" for a in pol)
    rows = pol[-1].data if isinstance(pol[-1].data, list) else json.loads(pol[-1].data)
    assert {r["contributor"] for r in rows} == {"line-0", "line-1"}
    [cycle_scores] = summary["pol"].values()  # one cycle
    assert {r["contributor"]: r["pol_score"] for r in rows} == pytest.approx(cycle_scores, abs=1e-6)
    assert _artifacts(artifact_key(expert, "rejections"))[-1].type == "markdown"
    curve = _artifacts(artifact_key(expert, "wise-ft"))
    assert curve and curve[-1].type == "table"

    gate = _artifacts(artifact_key(expert, "gate"))[-1]
    assert f"version {registered['version']}" in gate.data
    assert ("promoted to champion" in gate.data) == registered["promoted"]
    link = _artifacts(artifact_key(expert, "mlflow"))[-1]
    # Prefect stores a link artifact as markdown: [text](url)
    url = f"models:/{registered['name']}/{registered['version']}"
    assert f"]({url})" in link.data

    # Read by name: the session's other tests make far more runs than one page holds. The
    # lines' own task runs are checked in tests/test_own_base_commission.py: this commission's
    # lines ran in the process killed mid-flow, and the rerun resumed past them.
    with get_client(sync_client=True) as client:
        cycle_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{commission} cycle 1"]))
        )
        commission_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="commission legal-licences"))
        )
    assert "COMPLETED" in [r.state_type.value for r in cycle_runs]
    named = [r.name for r in commission_runs]
    assert any(n.startswith("commission legal-licences for Acme Legal") for n in named)


def line_task_runs(expert: str, cycle: int, lines: list[str], wait_s: float = 60.0) -> list:
    """The ``train-line`` task runs of ``expert``'s cycle by their names, completed; waits for
    Prefect to record them (task-run states reach the API as events, a little after the run)."""
    names = [f"train-line {expert} cycle {cycle} {line}" for line in lines]
    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names))
            )
        done = [r for r in runs if r.state_type is not None and r.state_type.value == "COMPLETED"]
        if len(done) >= len(names) or time.monotonic() > deadline:
            return sorted(done, key=lambda r: r.name)
        time.sleep(1.0)


def test_train_slots_limit_holds_lines_to_its_slots():
    """Two-slot lines under a limit of 2: they run one after the other, never together."""
    from prefect.concurrency.sync import concurrency

    name = f"test-slots-{int(time.time() * 1000)}"
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    @task
    def hold(i: int) -> int:
        with concurrency(name, occupy=2, strict=True):
            start = time.monotonic()
            time.sleep(0.6)
            with lock:
                spans.append((start, time.monotonic()))
        return i

    @flow
    def lines() -> list[int]:
        with get_client(sync_client=True) as client:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
        return [f.result() for f in [hold.submit(i) for i in range(3)]]

    assert lines() == [0, 1, 2]
    spans.sort()
    assert len(spans) == 3
    pairs = zip(spans, spans[1:], strict=False)
    assert all(a_end <= b_start + 1e-3 for (_, a_end), (b_start, _) in pairs)


def test_ensure_train_slots_keeps_a_limit_ops_have_set():
    @flow
    def ensure() -> tuple[int, int]:
        first = ensure_limit(TRAIN_SLOTS, 3)  # created when absent (or kept from an earlier test)
        return first, ensure_limit(TRAIN_SLOTS, 99)

    first, second = ensure()
    assert second == first  # never overwritten by a later cycle's own guess


@pytest.mark.parametrize("log_prints", [True, None])
def test_no_bytecode_disassembly_when_datasets_hashes_the_tokenizer(
    tiny_base, tmp_path, capfd, caplog, log_prints
):
    """datasets fingerprints the tokenizing closure with dill, whose global-name scan prints
    ``dis.dis`` into a captured stdout; Prefect's ``log_prints`` patches ``print`` and forwards
    those lines to the run log instead (the 219 lines of "Disassembly of ..."). The factory's
    flows do not set ``log_prints``; the control run with it shows the test can fail."""
    from factory.data.packing import pack_rows
    from flows.commission import commission_flow
    from flows.cycle import cycle_flow
    from flows.retrain import retrain_flow

    assert not any(f.log_prints for f in (commission_flow, cycle_flow, retrain_flow))

    @task
    def pack() -> int:
        return pack_rows([f"row {i} of text" for i in range(40)], tiny_base.path, 16,
                         tmp_path / "packs").num_blocks  # fmt: skip

    @flow(log_prints=log_prints)
    def packing() -> int:
        return pack()

    caplog.set_level(logging.INFO)
    assert packing() > 0
    out, err = capfd.readouterr()
    assert ("Disassembly of" in out + err + caplog.text) == bool(log_prints)
