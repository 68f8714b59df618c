"""One typed settings object for every component that talks to the outside.

Values come from environment variables prefixed ``TAAS_`` (for example ``TAAS_HOME``,
``TAAS_MLFLOW_TRACKING_URI``) and from an optional YAML file named by ``TAAS_SETTINGS_FILE``.
The embedded default needs no server: MLflow on SQLite with a local artifact folder, Prefect's
ephemeral API, a local object store and a SQLite ledger, all under ``TAAS_HOME``. A team points
the same code at ``mlflow server``, an S3 store and a Prefect server by settings alone.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the file named by TAAS_SETTINGS_FILE, when set; environment variables win."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("TAAS_SETTINGS_FILE")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ValueError(f"TAAS_SETTINGS_FILE: no such file {path}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"TAAS_SETTINGS_FILE: {path} must hold a mapping of settings")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAAS_", extra="forbid", frozen=True)

    home: Path = Field(default=Path(".taas"), description="root of every local store")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="default: sqlite:///<home>/mlflow.db; or http://host:5000"
    )
    mlflow_artifact_root: str | None = Field(
        default=None, description="default: <home>/mlartifacts; or s3://bucket/prefix"
    )
    mlflow_experiment: str = "taas-factory"
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint")
    object_store_url: str | None = Field(
        default=None, description="default: <home>/objects; or s3://bucket/prefix"
    )
    database_url: str | None = Field(
        default=None, description="commissions and ledger; default sqlite:///<home>/taas.db"
    )
    data_roots: list[Path] = Field(
        default_factory=list,
        description="local folders data URIs may point into; unset: the spec file's folder only "
        "(never the home nor system folders, see factory.data.uri)",
    )
    s3_bucket_allowlist: list[str] = Field(
        default_factory=list, description="buckets data URIs may name; empty: none"
    )
    base_model_dir: Path | None = Field(
        default=None,
        description="a local HF folder replacing the spec's preset; checked like base_model.path",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on a CUDA device that supports it, else fp32"
    )
    ds_config_overlay: Path | None = Field(
        default=None, description="JSON object deep-merged over each line's DeepSpeed config"
    )
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    hostfile: Path | None = Field(
        default=None, description="DeepSpeed hostfile ('host slots=N' lines): lines span nodes"
    )
    rdzv_endpoint: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*:[1-9][0-9]{0,4}$",
        description="torchrun c10d rendezvous host:port: each line spans nnodes launcher groups, "
        "one per node, each node running the same line command (see infra.launcher)",
    )
    nnodes: int = Field(
        default=1,
        ge=1,
        description="nodes per line with rdzv_endpoint; ranks per node: processes_per_line",
    )
    processes_per_line: int | None = Field(
        default=None, ge=1, description="ranks per line here; default the spec's budget"
    )
    max_concurrent_lines: int = Field(default=1, ge=1)
    inbox_poll_s: float = Field(
        default=10.0,
        gt=0,
        description="while lines train, how often the inbox is listed to record when each "
        "outside candidate first arrived (its place in the arrival order)",
    )
    line_work_pool: str | None = Field(
        default=None,
        description="a Prefect work pool: each line runs as a train-line deployment run there, "
        "inputs and outputs through the object store; unset: local subprocesses",
    )
    line_deployment: str = Field(
        default="train-line/train-line", description="the line deployment as <flow>/<name>"
    )
    line_pool_slots: int | None = Field(
        default=None,
        ge=1,
        description="slots of the pool's limit line-slots-<pool> when a cycle creates it (GPUs, "
        "or CPU processes, of all its machines); default max_concurrent_lines * ranks per line",
    )
    line_machine_slots: int | None = Field(
        default=None,
        ge=1,
        description="process slots of a worker's machine: its lines train at most this many "
        "processes at once, the others wait with their inputs staged; default its GPUs, else "
        "its CPU cores",
    )
    line_heartbeat_timeout_s: float = Field(
        default=120.0, gt=0, description="a pool line silent this long counts as lost: resubmitted"
    )
    line_start_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="a pool line with no first heartbeat this long after a worker took it (its "
        "process start, imports and pull steps) counts as lost: resubmitted",
    )
    line_max_attempts: int = Field(default=3, ge=1, description="submissions of one pool line")
    line_worker_name: str | None = Field(
        default=None, description="this machine's name in line results; default the hostname"
    )
    commission_deployment: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
        description="a deployment (<flow>/<name>, e.g. buyer-commission/buyer-commission) that "
        "runs the marketplace's commissions, upload and base through the object store; unset: "
        "a local process",
    )
    transparency_url: str | None = Field(
        default=None,
        pattern=r"^s3://[a-z0-9.-]{3,63}(/[A-Za-z0-9._/-]*)?$",
        description="s3://bucket/prefix: one transparency log for every machine that registers "
        "(appends under a PostgreSQL lock); unset: <home>/transparency, this machine's",
    )
    factory_key_path: Path | None = Field(
        default=None,
        description="the factory's attestation key (Ed25519 PEM); with transparency_url, the "
        "same secret file on every machine that registers; default <home>/keys/factory/",
    )
    parent_revenue_share: str = Field(
        default="0.2",
        pattern=r"^(0(\.\d{1,6})?|1(\.0{1,6})?)$",
        description="share of a warm-started expert's licence revenue for its parent's "
        "contributors (decimal in [0, 1], recorded on each version at registration)",
    )
    torch_extensions_dir: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls))

    @model_validator(mode="after")
    def _absolute_home(self) -> Settings:
        object.__setattr__(self, "home", self.home.expanduser().resolve())
        return self

    @model_validator(mode="after")
    def _shared_log_needs_postgres(self) -> Settings:
        if self.transparency_url is not None and not (self.database_url or "").startswith(
            "postgresql"
        ):
            raise ValueError(
                f"transparency_url: {self.transparency_url} is appended to by several machines "
                "under a PostgreSQL lock; set database_url to the team's PostgreSQL"
            )
        return self

    @model_validator(mode="after")
    def _hostfile_needs_deepspeed(self) -> Settings:
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise ValueError(
                f"hostfile: {self.hostfile} is only read by the deepspeed launcher; set "
                "launcher to 'deepspeed' (TAAS_LAUNCHER=deepspeed) or unset the hostfile"
            )
        return self

    @model_validator(mode="after")
    def _rendezvous_needs_torchrun(self) -> Settings:
        if self.rdzv_endpoint is not None and self.launcher != "torchrun":
            raise ValueError(
                f"rdzv_endpoint: {self.rdzv_endpoint} is torchrun's rendezvous; with the "
                "deepspeed launcher lines span nodes by hostfile: unset one of them"
            )
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"nnodes: {self.nnodes} nodes need a rendezvous; set rdzv_endpoint "
                "(TAAS_RDZV_ENDPOINT=host:port)"
            )
        return self

    @cached_property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @cached_property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or str(self.home / "mlartifacts")

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'taas.db'}"

    @cached_property
    def objects_url(self) -> str:
        return self.object_store_url or str(self.home / "objects")

    @cached_property
    def extensions_dir(self) -> Path:
        return self.torch_extensions_dir or self.home / "torch_extensions"

    def ensure_home(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home


def get_settings(**overrides: Any) -> Settings:
    """Reads the settings now (environment and file), with explicit overrides on top."""
    return Settings(**overrides)
