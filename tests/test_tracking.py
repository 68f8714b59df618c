"""MLflow wiring: the embedded store, S3 artifacts from the client, the local server start-up,
and the registry facts the library relies on."""

from __future__ import annotations

import json
import os

import pytest

from infra import tracking
from infra.services import start_mlflow_server
from infra.settings import Settings


def test_embedded_runs_and_registry(tmp_path):
    settings = Settings(home=tmp_path / "home")
    handle = tracking.configure(settings)
    assert handle.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    experiment = handle.client.get_experiment(handle.experiment_id)
    assert experiment.artifact_location == (tmp_path / "home" / "mlartifacts").as_uri()
    # configure() is idempotent: the same experiment comes back.
    assert tracking.configure(settings).experiment_id == handle.experiment_id

    run_id = tracking.start_run(handle, "unit", {"purpose": "test"})
    tracking.log_params(handle, run_id, {"alpha": 0.5, "targets": ["up_proj", "down_proj"]})
    tracking.log_metrics(handle, run_id, {"loss": 1.25}, step=3)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "a.txt").write_text("adapter bytes")
    tracking.log_artifacts(handle, run_id, folder, "expert")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([0, 1], [2.0, 1.0])
    tracking.log_figure(handle, run_id, figure, "plots/loss.png")
    plt.close(figure)
    tracking.end_run(handle, run_id)

    run = handle.client.get_run(run_id)
    assert run.data.params == {"alpha": "0.5", "targets": '["up_proj", "down_proj"]'}
    assert run.data.metrics == {"loss": 1.25}
    assert run.info.status == "FINISHED"
    paths = sorted(a.path for a in handle.client.list_artifacts(run_id, "plots"))
    assert paths == ["plots/loss.png"]

    tracking.ensure_registered_model(handle, "expert-x", tags={"domain": "x"})
    tracking.ensure_registered_model(handle, "expert-x")  # already there: kept
    version = tracking.create_version(handle, "expert-x", run_id, "expert", {"k": "v1"})
    assert version.version in ("1", 1)
    assert version.source.endswith("/expert")
    tracking.set_alias(handle, "expert-x", "challenger", "1")
    # search results carry no aliases; get_version does.
    found = tracking.search_versions(handle, name="expert-x", tags={"k": "v1"})
    assert [str(v.version) for v in found] == ["1"] and not found[0].aliases
    assert tracking.get_version(handle, "expert-x", "1").aliases == ["challenger"]
    assert tracking.search_versions(handle, name="expert-x", tags={"k": "other"}) == []
    assert tracking.get_version_by_alias(handle, "expert-x", "champion") is None
    got = tracking.download_run_artifacts(handle, run_id, "expert", tmp_path / "down")
    assert (got / "a.txt").read_text() == "adapter bytes"
    assert tracking.registered_model_tags(handle, "expert-x") == {"domain": "x"}
    assert tracking.resume_run(handle, run_id) == run_id
    handle.client.delete_run(run_id)
    with pytest.raises(ValueError, match="run_id"):
        tracking.resume_run(handle, run_id)


def test_client_side_s3_artifacts(s3_endpoint, tmp_path, monkeypatch):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="taas-client-art")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    settings = Settings(
        home=tmp_path / "home",
        mlflow_artifact_root="s3://taas-client-art/mlflow",
        s3_endpoint_url=s3_endpoint,
    )
    handle = tracking.configure(settings)
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == s3_endpoint
    run_id = tracking.start_run(handle, "s3")
    (tmp_path / "card.json").write_text(json.dumps({"ok": True}))
    tracking.log_artifacts(handle, run_id, tmp_path / "card.json", "meta")
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="taas-client-art")
    keys = [obj["Key"] for obj in listed["Contents"]]
    assert len(keys) == 1 and keys[0].endswith("/artifacts/meta/card.json")


def test_mlflow_server_proxies_artifacts_to_s3(mlflow_server, s3_endpoint, tmp_path):
    """Clients of the server need no S3 settings: the artifacts land in the bucket anyway."""
    import boto3

    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=mlflow_server)
    handle = tracking.configure(settings)
    run_id = tracking.start_run(handle, "proxied")
    (tmp_path / "x.txt").write_text("proxied")
    tracking.log_artifacts(handle, run_id, tmp_path / "x.txt", "expert")
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="taas-mlflow-test"
    )
    assert any(o["Key"].endswith(f"{run_id}/artifacts/expert/x.txt") for o in objects["Contents"])
    with pytest.raises(ValueError, match="port"):
        start_mlflow_server("sqlite:///unused.db", str(tmp_path), 0)
    port = int(mlflow_server.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match="already serves"):
        start_mlflow_server("sqlite:///unused.db", str(tmp_path), port)


def test_datasets_are_run_inputs_with_our_digests(tmp_path):
    import hashlib

    handle = tracking.configure(Settings(home=tmp_path / "home"))
    run_id = tracking.start_run(handle, "commission-c1")
    rows = {"train": ["first clause", "second clause", "third"], "heldout": ["held out"]}
    refs = []
    for part, texts in rows.items():
        path = tmp_path / f"{part}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        refs.append(tracking.DatasetRef.of_file(path, f"c1-{part}", part, dataset_sha256="s" * 64))
    tracking.log_datasets(handle, run_id, refs)
    inputs = handle.client.get_run(run_id).inputs.dataset_inputs
    got = {}
    for item in inputs:
        tags = {t.key: t.value for t in item.tags}
        profile = json.loads(item.dataset.profile)
        got[tags["mlflow.data.context"]] = (
            item.dataset.name, item.dataset.digest, tags["sha256"], tags["dataset_sha256"],
            profile["num_rows"],
        )  # fmt: skip
    for part, texts in rows.items():
        sha = hashlib.sha256((tmp_path / f"{part}.jsonl").read_bytes()).hexdigest()
        assert got[part] == (f"c1-{part}", sha[:36], sha, "s" * 64, len(texts))
