"""prefect.yaml: every deployment loads, validates and schedules; the retrain deployment runs once.

The last test runs the ``retrain`` deployment's entrypoint, loaded from prefect.yaml, with the
deployment's parameters plus test overrides, on a copy of the ``tiny_commission`` fixture's home
(a copy, so the fixture's own library keeps exactly one version for the tests that count them).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
from datetime import UTC, datetime

import pytest
import yaml

from tests.conftest import REPO

SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}


def load_entrypoint(deployment: dict):
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = deployment["entrypoint"].partition(":")
    return load_flow_from_entrypoint(f"{REPO / path}:{name}")


def test_prefect_yaml_parses_as_prefect_deploy_reads_it():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(SPEC)
    assert [d.name for d in model.deployments] == [
        "commission", "retrain", "train-line", "buyer-commission"
    ]  # fmt: skip
    assert model.prefect_version.startswith("3.9")


def test_pull_step_resolves_the_repo_dir_from_the_environment(monkeypatch, tmp_path):
    from prefect.utilities.templating import apply_values

    (step,) = SPEC["pull"]
    monkeypatch.setenv("TAAS_REPO_DIR", str(tmp_path))
    resolved = apply_values(step, {})  # env placeholders resolve from os.environ
    assert resolved == {
        "prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}
    }


@pytest.mark.parametrize("name", ["commission", "retrain"])
def test_deployment_entrypoint_loads_and_parameters_validate(name):
    import inspect

    deployment = DEPLOYMENTS[name]
    flow = load_entrypoint(deployment)
    assert flow.name == name
    validated = flow.validate_parameters(deployment["parameters"])
    assert {k: validated[k] for k in deployment["parameters"]} == deployment["parameters"]
    assert set(deployment["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    with pytest.raises(Exception, match="not_a_parameter"):
        flow.validate_parameters({**deployment["parameters"], "not_a_parameter": 1})


@pytest.mark.parametrize("name", ["commission", "retrain", "buyer-commission"])
def test_deployment_has_concurrency_limit_work_pool_and_tags(name):
    deployment = DEPLOYMENTS[name]
    assert isinstance(deployment["concurrency_limit"], int)
    assert deployment["concurrency_limit"] >= 1
    assert deployment["work_pool"]["name"] == "factory"
    assert "taas" in deployment["tags"]


def test_train_line_deployment_is_what_cycles_submit_to():
    """The deployment a cycle's dispatcher names by default exists, on the lines pool, and its
    flow takes exactly one LineJob."""
    from infra.settings import Settings

    deployment = DEPLOYMENTS["train-line"]
    flow = load_entrypoint(deployment)
    assert f"{flow.name}/{deployment['name']}" == Settings.model_fields["line_deployment"].default
    assert list(flow.parameters.properties) == ["job"]
    assert deployment["work_pool"]["name"] == "lines"
    assert "taas" in deployment["tags"] and "schedules" not in deployment
    # the worker starts the engine itself (one process per run), through the start lock
    python, flag, module = deployment["work_pool"]["job_variables"]["command"].split()
    assert (python, flag, module) == ("python", "-m", "flows.line_engine")
    assert callable(importlib.import_module(module).main)


def test_buyer_commission_deployment_takes_what_the_desk_submits():
    """The marketplace's desk submits exactly two content hashes (no path of its machine) to
    the deployment ``Settings.commission_deployment`` names, on the factory pool."""
    deployment = DEPLOYMENTS["buyer-commission"]
    flow = load_entrypoint(deployment)
    assert f"{flow.name}/{deployment['name']}" == "buyer-commission/buyer-commission"
    assert list(flow.parameters.properties) == ["upload_tree", "base_tree"]
    assert "parameters" not in deployment and "schedules" not in deployment
    with pytest.raises(Exception, match="upload_tree"):
        flow.validate_parameters({"base_tree": "0" * 64})


def test_commission_deployment_spec_path_is_a_valid_spec():
    from factory.commission import load_spec

    spec = load_spec(REPO / DEPLOYMENTS["commission"]["parameters"]["spec_path"])
    assert spec.domain == "legal-licences"


def test_retrain_runs_daily_at_three_utc():
    from prefect.server.schemas.schedules import CronSchedule

    (schedule,) = DEPLOYMENTS["retrain"]["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    dates = asyncio.run(cron.get_dates(n=2, start=start))
    assert [(d.day, d.hour, d.minute) for d in dates] == [(1, 3, 0), (2, 3, 0)]
    assert schedule["active"] is True
    assert DEPLOYMENTS["retrain"]["concurrency_limit"] == 1  # two retrains must never overlap
    assert "schedules" not in DEPLOYMENTS["commission"]


def _run_on_worker(pool: dict, deployment: str, parameters: dict, timeout_s: float):
    """A run of ``deployment`` (its cron schedule paused first, so that no scheduled run joins
    in), picked up by the pool's worker; returns the finished flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: pool["api"]}):
        with get_client(sync_client=True) as client:
            found = client.read_deployment_by_name(deployment)
            for schedule in client.read_deployment_schedules(found.id):
                client.update_deployment_schedule(found.id, schedule.id, active=False)
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
            )
            for run in scheduled:
                client.delete_flow_run(run.id)
        return run_deployment(deployment, parameters=parameters, timeout=timeout_s)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the shared fixture's commission plus a one-cycle retrain, on 2 cores
def test_retrain_deployment_runs_once(tiny_commission, tmp_path):
    """``prefect deploy`` of the retrain deployment on a real Prefect server; a run of it, taken
    by a process worker whose settings name the library, retrains and registers version 2."""
    from factory.library import ExpertLibrary
    from infra.settings import get_settings
    from tests.line_cluster import local_pool

    original = tiny_commission["settings"]
    home = tmp_path / "home"
    shutil.copytree(original.home, home)
    # A separate experiment keeps this run's new artifacts inside the copy.
    settings = get_settings(
        home=home,
        data_roots=original.data_roots,
        base_model_dir=original.base_model_dir,
        mlflow_experiment="taas-factory-retrain",
    )
    name = tiny_commission["summary"]["registered"]["name"]
    library = ExpertLibrary(settings)
    first = library.show(name, "champion")
    assert first.version == "1"

    deployment = DEPLOYMENTS["retrain"]
    flow = load_entrypoint(deployment)
    params = {**deployment["parameters"], "settings": settings, "experts": [name]}

    # Young champion, unchanged data: nothing is due, nothing is trained.
    quiet = flow(**flow.validate_parameters(params))
    assert quiet == {
        name: {"due": None, "commission_id": None, "version": None, "promoted": False,
               "gate_reasons": []}
    }  # fmt: skip

    worker_env = {
        "TAAS_HOME": str(home),
        "TAAS_DATA_ROOTS": json.dumps([str(p) for p in original.data_roots]),
        "TAAS_BASE_MODEL_DIR": str(original.base_model_dir),
        "TAAS_MLFLOW_EXPERIMENT": "taas-factory-retrain",
    }
    with local_pool(tmp_path / "pool", workers=("retrainer",), pool="factory",
                    deployment="retrain", worker_env=worker_env) as pool:  # fmt: skip
        run = _run_on_worker(pool, "retrain/retrain", {"max_age_days": 0, "experts": [name]},
                             timeout_s=1800)  # fmt: skip
        worker_log = (pool["workers"]["retrainer"]["folder"] / "worker.log").read_text()
    assert run.state is not None and run.state.is_completed(), (run.state, worker_log[-3000:])
    assert run.name.startswith("retrain experts older than 0")
    second = library.show(name, "2")
    assert second.tags["commission_id"] != first.tags["commission_id"]
    derived = yaml.safe_load((home / "retrain" / name / "1" / "spec.yaml").read_text())
    assert derived["seed"] == 3 + 1 and derived["budget"]["cycles"] == 1

    lineage = library.lineage(name)
    assert [row["version"] for row in lineage] == ["1", "2"]
    decision = json.loads(second.tags["gate_decision"])
    assert decision["previous_champion"] == "1"
    champion = library.show(name, "champion").version
    if decision["promote"]:
        assert champion == "2" and "champion" in second.aliases and not decision["reasons"]
    else:
        assert champion == "1" and "challenger" in second.aliases and decision["reasons"]
    # warm start from the champion: the new version's parent is version 1's adapter
    assert second.tags["parent_adapter_sha256"] == first.tags["adapter_sha256"] != ""
    assert second.tags["adapter_sha256"] != first.tags["adapter_sha256"]
    assert second.tags["dataset_sha256"] == first.tags["dataset_sha256"]
