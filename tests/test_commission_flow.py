"""The whole commission flow on a tiny configuration: real DeepSpeed lines (2 processes each,
gloo), real Proof-of-Loss, WiSE-FT, router annealing, lm-eval and MLflow registration.

The run behind the ``tiny_commission`` fixture is SIGKILLed right after its cycle commits and
then rerun: the rerun must not train again, and a further run must not register twice.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_commission_registers_an_expert_with_provenance(tiny_commission, tiny_base):
    from factory.library import ExpertLibrary

    settings, summary = tiny_commission["settings"], tiny_commission["summary"]
    registered = summary["registered"]
    assert registered is not None
    version = ExpertLibrary(settings).show(registered["name"], registered["version"])
    tags = version.tags
    assert tags["commission_id"] == summary["commission_id"]
    assert tags["domain"] == "legal-licences"
    assert tags["base_model_sha256"] == tiny_base.sha256
    # the base's own terms travel with the expert to the marketplace
    assert (tags["base_licence"], tags["base_origin"]) == (tiny_base.licence, tiny_base.origin)
    assert tiny_base.licence == "Apache-2.0" and "preset 'taas-embedded-tiny'" in tiny_base.origin
    assert len(tags["dataset_sha256"]) == 64
    assert len(tags["adapter_sha256"]) == 64
    scores = json.loads(tags["pol_scores"])
    assert set(scores) == {"cycle-1/line-0", "cycle-1/line-1"}
    assert all(math.isfinite(s) and s >= 0 for s in scores.values())
    assert max(scores.values()) > 0
    alpha = float(tags["wise_ft_alpha"])
    assert 0 < alpha <= 1
    contributors = json.loads(tags["contributors"])
    assert contributors and set(contributors) <= {"line-0", "line-1"}
    assert sum(float(v) for v in contributors.values()) == pytest.approx(1.0, abs=1e-12)
    assert "champion" in version.aliases  # the first version passes the gate against the base


def test_expert_beats_the_base_on_heldout(tiny_commission):
    summary = tiny_commission["summary"]
    assert summary["heldout_loss_expert"] < summary["heldout_loss_base"]
    table = summary["benchmark"]
    assert set(table) >= {"base", "expert", "mixture"}
    heldout_task = next(t for t in table["expert"] if t.startswith("heldout_"))
    expert, base = table["expert"][heldout_task], table["base"][heldout_task]
    assert expert["word_perplexity"] < base["word_perplexity"]


def test_crash_after_training_resumes_without_training_again(tiny_commission):
    assert tiny_commission["killed"], "the first run ended before the kill; nothing was tested"
    logs = tiny_commission["train_logs"]
    assert len(logs) == 2  # both production lines had trained before the kill
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def test_rerun_registers_nothing_twice(tiny_commission):
    from factory.library import ExpertLibrary
    from flows.commission import run_commission

    first = tiny_commission["summary"]
    again = run_commission(tiny_commission["spec_path"], tiny_commission["settings"])
    assert again["registered"] == first["registered"]
    versions = ExpertLibrary(tiny_commission["settings"]).lineage(first["registered"]["name"])
    assert len(versions) == 1


def test_commission_run_nests_line_runs_logs_datasets_and_registers_a_pyfunc(
    tiny_commission, monkeypatch
):
    import mlflow
    import pandas as pd
    from conftest import TINY_COMMISSION
    from mlflow import MlflowClient

    settings, summary = tiny_commission["settings"], tiny_commission["summary"]
    root = settings.home / "commissions" / summary["commission_id"]
    run_id = json.loads((root / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(run_id)
    # Each line's curves in a run of its own under the commission run, named by cycle and line.
    lines = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert sorted(r.info.run_name for r in lines) == ["cycle-1/line-0", "cycle-1/line-1"]
    steps = TINY_COMMISSION["budget"]["steps_per_cycle"]
    for line in lines:
        assert line.info.status == "FINISHED"
        history = client.get_metric_history(line.info.run_id, "loss")
        assert max(m.step for m in history) == steps
    assert "loss" not in run.data.metrics
    # The train and held-out sets are the run's dataset inputs, digests from our sha256.
    registered = summary["registered"]
    version = client.get_model_version(registered["name"], registered["version"])
    inputs = {}
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        inputs[tags["mlflow.data.context"]] = (item.dataset.digest, tags)
    assert set(inputs) == {"train", "heldout"}
    for digest, tags in inputs.values():
        assert digest == tags["sha256"][:36] and len(tags["sha256"]) == 64
        assert tags["dataset_sha256"] == version.tags["dataset_sha256"]
    # The registered version is an MLflow model that answers a prompt, its card the description.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}@champion")
    answer = model.predict(pd.DataFrame({"prompt": ["The licensee"]}), params={"max_new_tokens": 4})
    assert answer["text"].map(type).tolist() == [str]
    assert version.description.startswith("---\n")
