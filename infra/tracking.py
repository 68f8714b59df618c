"""All MLflow wiring: tracking and registry URIs, the experiment, runs, and registry operations.

The embedded default is a SQLite store under ``<home>`` with a local artifact folder; a team points
``TAAS_MLFLOW_TRACKING_URI`` at an ``mlflow server`` (which proxies artifacts to S3, so clients need
no AWS settings). Only this module imports the MLflow client; :mod:`factory.library` works through
a :class:`Tracking` handle.

Registry facts this module relies on (MLflow 3.17): ``register_model`` fails on a plain artifact
folder, so versions are made with ``create_model_version`` from a run's artifact URI; results of
``search_model_versions`` carry no aliases, ``get_model_version`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException

from infra.settings import Settings

# MLflow caps tag values; JSON provenance tags are kept below this.
MAX_TAG_CHARS = 5000
# The registry's description column (model versions) holds 5000 characters.
MAX_DESCRIPTION = 5000
# MLflow's dataset digest column holds 36 characters; the full sha256 goes into an input tag.
MAX_DIGEST_CHARS = 36


@dataclass(frozen=True)
class Tracking:
    """A configured MLflow client plus the factory's experiment."""

    client: MlflowClient
    experiment_id: str
    tracking_uri: str


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def configure(settings: Settings) -> Tracking:
    """Points tracking and registry at settings, creating the experiment when absent.

    The experiment's artifact location is ``settings.mlflow_artifact_root`` when set; against a
    server without one, the server's own (proxied) artifact store is used.
    """
    import mlflow

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if settings.s3_endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return Tracking(client, experiment.experiment_id, uri)
    location = settings.mlflow_artifact_root
    if location is None and not _is_remote(uri):
        location = Path(settings.artifact_root).resolve().as_uri()
    try:
        experiment_id = client.create_experiment(
            settings.mlflow_experiment, artifact_location=location
        )
    except MlflowException:
        # Another process created it between our lookup and create: use theirs.
        experiment = client.get_experiment_by_name(settings.mlflow_experiment)
        if experiment is None:
            raise
        experiment_id = experiment.experiment_id
    return Tracking(client, experiment_id, uri)


# ---- runs -------------------------------------------------------------------------------------


def start_run(tracking: Tracking, name: str, tags: dict[str, str] | None = None) -> str:
    """Creates a run in the factory experiment and returns its id (the run stays open)."""
    run = tracking.client.create_run(tracking.experiment_id, run_name=name, tags=tags or {})
    return run.info.run_id


def resume_run(tracking: Tracking, run_id: str) -> str:
    """Checks that a run exists and is not deleted; returns its id for further logging."""
    run = tracking.client.get_run(run_id)
    if run.info.lifecycle_stage != "active":
        raise ValueError(f"run_id: run {run_id} is {run.info.lifecycle_stage}; start a new run")
    return run_id


def end_run(tracking: Tracking, run_id: str, status: str = "FINISHED") -> None:
    tracking.client.set_terminated(run_id, status=status)


def log_params(tracking: Tracking, run_id: str, params: dict[str, Any]) -> None:
    for key, value in sorted(params.items()):
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        tracking.client.log_param(run_id, key, text[:6000])


def set_run_tags(tracking: Tracking, run_id: str, tags: dict[str, str]) -> None:
    """Tags, unlike params, may change: what differs per attempt (a retry) goes here."""
    for key, value in sorted(tags.items()):
        tracking.client.set_tag(run_id, key, str(value)[:MAX_TAG_CHARS])


@dataclass(frozen=True)
class DatasetRef:
    """A JSON-lines dataset to record as a run input: ``context`` is train, heldout, ...;
    ``sha256`` is over the file's bytes; ``tags`` are added to the input (e.g. the sources'
    ``dataset_sha256``)."""

    name: str
    context: str
    path: Path
    sha256: str
    tags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_file(cls, path: Path, name: str, context: str, **tags: str) -> DatasetRef:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return cls(name, context, Path(path), digest.hexdigest(), tuple(sorted(tags.items())))


def log_datasets(tracking: Tracking, run_id: str, datasets: list[DatasetRef]) -> None:
    """Records each dataset as an MLflow dataset input (schema and row count, not the rows),
    its digest our sha256 (cut to MLflow's 36 characters; the full one in tag ``sha256``)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for ref in datasets:
        frame = pd.read_json(ref.path, lines=True) if ref.path.stat().st_size else pd.DataFrame()
        with warnings.catch_warnings():
            # mlflow registers its local-file source twice (schemes "" and "file") and warns
            # that a path could be either: the same class both ways
            warnings.filterwarnings("ignore", message="The specified dataset source can be")
            dataset = mlflow.data.from_pandas(
                frame, source=str(ref.path), name=ref.name, digest=ref.sha256[:MAX_DIGEST_CHARS]
            )
        tags = [InputTag("mlflow.data.context", ref.context), InputTag("sha256", ref.sha256)]
        tags += [InputTag(k, v) for k, v in ref.tags]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    tracking.client.log_inputs(run_id, datasets=inputs)


def log_metrics(
    tracking: Tracking, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    for key, value in sorted(metrics.items()):
        tracking.client.log_metric(run_id, key, float(value), step=step or 0)


def log_artifacts(
    tracking: Tracking, run_id: str, local: Path, artifact_path: str | None = None
) -> None:
    """Uploads a file or a folder's contents under ``artifact_path``."""
    local = Path(local)
    if local.is_dir():
        tracking.client.log_artifacts(run_id, str(local), artifact_path)
    else:
        tracking.client.log_artifact(run_id, str(local), artifact_path)


def log_figure(tracking: Tracking, run_id: str, figure: Any, artifact_file: str) -> None:
    tracking.client.log_figure(run_id, figure, artifact_file)


def download_run_artifacts(tracking: Tracking, run_id: str, path: str, dest: Path) -> Path:
    """Downloads a run's artifact file or folder into ``dest`` and returns the local path."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    return Path(tracking.client.download_artifacts(run_id, path, str(dest)))


# ---- registry ---------------------------------------------------------------------------------


def _not_found(exc: MlflowException) -> bool:
    code = getattr(exc, "error_code", "")
    return (
        code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        or isinstance(exc, RestException)
        and ("RESOURCE_DOES_NOT_EXIST" in str(exc))
    )


def ensure_registered_model(
    tracking: Tracking, name: str, tags: dict[str, str] | None = None, description: str = ""
) -> None:
    """Creates the registered model when absent; an existing one is kept as it is."""
    try:
        tracking.client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    try:
        tracking.client.create_registered_model(name, tags=tags, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def create_version(
    tracking: Tracking,
    name: str,
    run_id: str,
    artifact_path: str,
    tags: dict[str, str],
    description: str = "",
) -> ModelVersion:
    """A model version whose source is a folder of a run's artifacts (an MLflow model folder
    for ``models:/`` loading); ``description`` is cut to the registry's limit."""
    run = tracking.client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    return tracking.client.create_model_version(
        name, source, run_id=run_id, tags=tags, description=_cut(description, MAX_DESCRIPTION)
    )


def _cut(text: str, limit: int) -> str:
    marker = "\n\n[cut to the registry's limit; the full text is in the version's artifacts]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def get_version(tracking: Tracking, name: str, version: str) -> ModelVersion:
    """One version, with its aliases."""
    return tracking.client.get_model_version(name, str(version))


def get_version_by_alias(tracking: Tracking, name: str, alias: str) -> ModelVersion | None:
    try:
        return tracking.client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc) or "alias" in str(exc).lower():
            return None
        raise


def search_versions(
    tracking: Tracking, name: str | None = None, tags: dict[str, str] | None = None
) -> list[ModelVersion]:
    """Versions matching a model name and exact tag values, oldest first (aliases not filled)."""
    clauses = []
    if name is not None:
        clauses.append(f"name = '{name}'")
    for key, value in sorted((tags or {}).items()):
        clauses.append(f"tags.`{key}` = '{value}'")
    found = tracking.client.search_model_versions(" and ".join(clauses) or None)
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def search_models(tracking: Tracking) -> list[str]:
    return sorted(m.name for m in tracking.client.search_registered_models(max_results=1000))


def registered_model_tags(tracking: Tracking, name: str) -> dict[str, str]:
    return dict(tracking.client.get_registered_model(name).tags)


def set_model_tag(tracking: Tracking, name: str, key: str, value: str) -> None:
    tracking.client.set_registered_model_tag(name, key, value)


def set_version_tag(tracking: Tracking, name: str, version: str, key: str, value: str) -> None:
    tracking.client.set_model_version_tag(name, str(version), key, value)


def set_alias(tracking: Tracking, name: str, alias: str, version: str) -> None:
    tracking.client.set_registered_model_alias(name, alias, str(version))


def delete_alias(tracking: Tracking, name: str, alias: str) -> None:
    tracking.client.delete_registered_model_alias(name, alias)


def delete_version(tracking: Tracking, name: str, version: str) -> None:
    tracking.client.delete_model_version(name, str(version))
