"""A candidate: one production line's (or outside contributor's) proposed expert update.

A candidate folder holds ``adapter_model.safetensors`` + ``adapter_config.json`` (the full adapter
after training from the parent version, i.e. current + delta), ``candidate.json`` (the
:class:`CandidateManifest`) and ``candidate.sig`` (the contributor's ed25519 signature over the
manifest's canonical JSON, base64). The gate in :mod:`evaluation.gate` checks all of it.

The manifest names the commission and cycle it was made for (``commission_id``, ``cycle``), so an
old candidate cannot be replayed into a later commission of the same expert. A candidate staged
from the inbox also holds ``arrival.json``, written by the factory (never by the contributor):
whose folder it came from and when the factory first saw it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE, write_adapter_files
from factory.hashing import tensors_sha256
from factory.signing import sign
from infra.atomic import atomic_write_json, atomic_write_text, committed_dir

MANIFEST_FILE = "candidate.json"
SIGNATURE_FILE = "candidate.sig"
ARRIVAL_FILE = "arrival.json"


class CandidateManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate_id: str
    expert_id: str
    # "" only for the factory's own lines, written into the commission's own folder; the gate
    # refuses an inbox candidate that does not name the commission being trained.
    commission_id: str = ""
    cycle: int = Field(ge=0)
    contributor_id: str
    base_model_sha256: str
    parent_adapter_sha256: str | None  # None: trained from the base (no parent expert)
    adapter_sha256: str
    data_shard: str
    seed: int
    steps: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    created_at: str


@dataclass(frozen=True)
class CandidateFiles:
    """Where a candidate's files are; nothing is read until the gate decides to."""

    folder: Path

    @property
    def adapter(self) -> Path:
        return self.folder / ADAPTER_FILE

    @property
    def adapter_config(self) -> Path:
        return self.folder / ADAPTER_CONFIG

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST_FILE

    @property
    def signature(self) -> Path:
        return self.folder / SIGNATURE_FILE

    @property
    def arrival(self) -> Path:
        return self.folder / ARRIVAL_FILE


def write_candidate(
    folder: Path,
    adapter: dict[str, torch.Tensor],
    adapter_config: dict,
    manifest: CandidateManifest,
    private_key,
) -> CandidateFiles:
    """Writes and signs a candidate as a committed folder."""
    assert manifest.adapter_sha256 == tensors_sha256(adapter), "manifest hash mismatch"
    body = manifest.model_dump(mode="json")
    with committed_dir(Path(folder), overwrite=True) as tmp:
        write_adapter_files(tmp, adapter, adapter_config)
        atomic_write_json(tmp / MANIFEST_FILE, body)
        atomic_write_text(tmp / SIGNATURE_FILE, sign(private_key, body))
    return CandidateFiles(Path(folder))


def read_manifest(files: CandidateFiles) -> CandidateManifest:
    return CandidateManifest.model_validate(json.loads(files.manifest.read_text()))
