"""The provenance schema of a library version: what a registration records, as version tags.

:class:`RegistrationProvenance` is what the caller supplies (commission, data, config, PoL
scores, WiSE-FT alpha, cycles, contributors, licence, visibility, prices);
:func:`version_tags` adds what the expert folder and the benchmark say (domain, base model and
adapter hashes, benchmark scores) and when and from which code it was made. The tags named in
:data:`PROVENANCE_TAGS` are the ones compared side by side by ``taas library compare``.

Dates are ISO-8601 UTC to the second (:func:`utc_now_iso`). Pure: no MLflow, prefect or boto3.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evaluation.benchmark import BenchmarkResult
from factory.attestation import ProvenanceEvidence
from factory.commission import PRICE_TAGS, price_amount
from factory.expert import ExpertManifest

# Written anew by each registration attempt: run tags, never (immutable) run params.
PER_ATTEMPT_TAGS = ("trained_at", "code_version")

PROVENANCE_TAGS = (
    "commission_id domain expert_id base_model base_model_sha256 base_licence base_origin "
    "dataset_sha256 adapter_sha256 "
    "config_hash code_version pol_scores wise_ft_alpha cycles contributors licence visibility "
    "parent_adapter_sha256 benchmark_summary idempotency_key trained_at"
).split()


# Set only on a warm-started version (see RegistrationProvenance.parent_expert).
PARENT_TAGS = ("parent_expert", "parent_version", "parent_share")


class RegistrationProvenance(BaseModel):
    """Provenance of one accepted result, stored as version tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    commission_id: str = Field(min_length=1)
    dataset_sha256: str
    config_hash: str
    pol_scores: dict[str, float] = Field(default_factory=dict)
    wise_ft_alpha: float | None = None
    cycles: int = Field(default=0, ge=0)
    contributors: dict[str, str] = Field(default_factory=dict)  # id -> exact decimal share
    licence: str = "apache-2.0"
    visibility: Literal["private", "public"] = "private"
    parent_adapter_sha256: str = ""
    # A warm start's library parent (its name and registry version) and the share of this
    # version's licence revenue credited to the parent's contributors (exact decimal in [0, 1]).
    parent_expert: str = ""
    parent_version: str = ""
    parent_share: str = ""
    # The commission's customer (factory.customer.customer_id_for); the registered model is
    # tagged with its owner and refuses versions from any other customer.
    customer_id: str = ""
    code_version: str | None = None
    # Where the base lives on the registering machine: the MLflow model references it (with its
    # sha256) instead of copying it. Not a tag: another machine passes its own folder at load.
    base_model_path: Path | None = None
    # What the version's attestation (factory.library.attest) records beyond the tags: the
    # spec's sha256 and each cycle's PoL batch plan, candidates and contributors' signatures.
    evidence: ProvenanceEvidence = Field(default_factory=ProvenanceEvidence)
    # Prices from the commission's licence section (exact decimal strings); None: not priced.
    price_per_1k_tokens: str | None = None
    weight_fee: str | None = None
    maintenance_fee: str | None = None
    exclusive_premium: str | None = None

    @field_validator(*PRICE_TAGS)
    @classmethod
    def _price(cls, value: str | None, info) -> str | None:
        return None if value is None else price_amount(info.field_name, value)


def code_version() -> str:
    """The git commit of the checkout, else the installed package version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # no git here: fall back to the package version below
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"taas-factory=={version('taas-factory')}"
    except PackageNotFoundError:
        return "unknown"


def utc_now_iso() -> str:
    """Now, ISO-8601 UTC to the second (e.g. ``2026-03-01T09:30:00+00:00``)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def iso_from_millis(millis: int | None) -> str:
    """A registry timestamp (milliseconds since the epoch) as ISO-8601 UTC; "" when unset."""
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).replace(microsecond=0).isoformat()


def expert_scores(
    result: BenchmarkResult | None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]] | None]:
    """(expert scores, base scores) of a benchmark run: the model named 'expert', else the first
    one not named 'base'; ({}, None) without a benchmark."""
    if result is None:
        return {}, None
    names = [n for n in result.table if n != "base"]
    chosen = "expert" if "expert" in result.table else (names[0] if names else None)
    return (result.table.get(chosen, {}) if chosen else {}), result.table.get("base")


def _summary(scores: dict[str, dict[str, float]]) -> str:
    parts = [f"{t}/{m}={v:.4g}" for t in sorted(scores) for m, v in sorted(scores[t].items())]
    return "; ".join(parts)[:500]


def version_tags(
    manifest: ExpertManifest,
    prov: RegistrationProvenance,
    idempotency_key: str,
    scores: dict[str, dict[str, float]],
    max_tag_chars: int,
) -> dict[str, str]:
    """Every tag a new version carries: :data:`PROVENANCE_TAGS`, ``benchmark_scores`` (JSON,
    cut to ``max_tag_chars``) and the prices the provenance sets."""
    tags = {
        "commission_id": prov.commission_id,
        "domain": manifest.domain,
        "expert_id": manifest.expert_id,
        "base_model": manifest.base_model,
        "base_model_sha256": manifest.base_model_sha256,
        # The base's own licence and where it came from (recorded at composition): a buyer
        # licensing an expert also takes on its base's terms.
        "base_licence": str(manifest.provenance.get("base_licence") or ""),
        "base_origin": str(manifest.provenance.get("base_origin") or ""),
        "dataset_sha256": prov.dataset_sha256,
        "adapter_sha256": manifest.adapter_sha256,
        "config_hash": prov.config_hash,
        "code_version": prov.code_version or code_version(),
        "pol_scores": json.dumps(prov.pol_scores, sort_keys=True),
        "wise_ft_alpha": "" if prov.wise_ft_alpha is None else repr(prov.wise_ft_alpha),
        "cycles": str(prov.cycles),
        "contributors": json.dumps(prov.contributors, sort_keys=True),
        "licence": prov.licence,
        "visibility": prov.visibility,
        "parent_adapter_sha256": prov.parent_adapter_sha256,
        "benchmark_summary": _summary(scores),
        "benchmark_scores": json.dumps(scores, sort_keys=True)[:max_tag_chars],
        "idempotency_key": idempotency_key,
        "trained_at": utc_now_iso(),
    }
    tags.update({k: getattr(prov, k) for k in PRICE_TAGS if getattr(prov, k) is not None})
    tags.update({k: getattr(prov, k) for k in PARENT_TAGS if getattr(prov, k)})
    return tags
