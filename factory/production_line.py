"""Production lines: K parallel training jobs for one cycle, each with its own seed and shard.

:func:`plan_lines` is pure: line k is contributor ``line-<k>``, seed ``base_seed + k``, data shard
``k mod num_shards``, plus optional per-line hyperparameter overrides. :func:`ensure_line_keys`
gives each line an ed25519 key under ``<home>/keys/<contributor>.pem`` registered in the ledger.
The cycle flow runs each line as a Prefect task (:func:`tasks.training.train_line`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from factory.ledger import Ledger
from factory.signing import load_or_create_key, public_key_b64

OVERRIDABLE = ("learning_rate", "warmup_steps", "lora_rank", "lora_alpha", "steps", "grad_accum")


class LineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    contributor_id: str
    seed: int
    shard_index: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict)


def plan_lines(
    num_lines: int,
    base_seed: int,
    num_shards: int,
    overrides: list[dict[str, Any]] | None = None,
) -> list[LineSpec]:
    """One spec per line; ``overrides[k]`` (if given) tunes line k's hyperparameters."""
    if num_lines < 1:
        raise ValueError("num_lines must be >= 1")
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    overrides = overrides or []
    if len(overrides) > num_lines:
        raise ValueError(f"overrides: {len(overrides)} entries for {num_lines} lines; give fewer")
    for k, entry in enumerate(overrides):
        unknown = set(entry) - set(OVERRIDABLE)
        if unknown:
            raise ValueError(
                f"overrides[{k}]: {sorted(unknown)} cannot be overridden; use {OVERRIDABLE}"
            )
    return [
        LineSpec(
            index=k,
            contributor_id=f"line-{k}",
            seed=base_seed + k,
            shard_index=k % num_shards,
            num_shards=num_shards,
            overrides=overrides[k] if k < len(overrides) else {},
        )
        for k in range(num_lines)
    ]


def key_path(home: Path, contributor_id: str) -> Path:
    return Path(home) / "keys" / f"{contributor_id}.pem"


def ensure_line_keys(home: Path, ledger: Ledger, lines: list[LineSpec]) -> dict[str, Path]:
    """Creates (or reuses) each line's key and registers its public key; contributor -> PEM."""
    paths = {}
    for line in lines:
        path = key_path(home, line.contributor_id)
        key = load_or_create_key(path)
        ledger.register_contributor(line.contributor_id, public_key_b64(key), kind="line")
        paths[line.contributor_id] = path
    return paths
