"""Prefect tasks for the retrain flow: which champions are due, and the spec that retrains one.

:func:`is_due` and :func:`derived_spec` are pure; :func:`plan_expert` (library and data sources),
:func:`write_derived_spec` and :func:`check_registered` (library) do I/O and retry.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from factory.commission import CommissionSpec, parse_spec
from factory.commission_store import CommissionStore
from factory.library.promotion import PromotionDecision
from infra.atomic import atomic_write_text
from infra.settings import Settings

DUE_REASONS = ("data_changed", "age")
_IO = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE}


class ExpertPlan(BaseModel):
    """Whether one library expert is due, and what retraining it starts from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: Literal["data_changed", "age"] | None
    spec: CommissionSpec  # the champion's commission spec
    num_versions: int


def is_due(
    now: datetime,
    created: datetime,
    max_age: timedelta,
    data_sha256: str,
    champion_dataset_sha256: str,
) -> str | None:
    """Why the champion needs retraining, or None.

    ``"data_changed"`` when the data's sha256 now differs from the one the champion was trained
    on (checked first: new data is the stronger reason); ``"age"`` when ``now - created`` is
    strictly greater than ``max_age``; else None.
    """
    if data_sha256 != champion_dataset_sha256:
        return "data_changed"
    if now - created > max_age:
        return "age"
    return None


def derived_spec(spec: CommissionSpec, cycles: int, num_versions: int) -> dict[str, Any]:
    """The retraining spec: the customer's spec with ``budget.cycles = cycles`` and
    ``seed = spec.seed + num_versions``.

    Why the seed changes: a commission's id is a hash of (spec, data). With unchanged data and
    an unchanged spec the retrain would map onto the commission that is already registered and
    do nothing; the shifted seed makes it a new commission (and gives the production lines new
    data orders). Counting versions keeps successive retrains distinct and reproducible.
    """
    if cycles < 1:
        raise ValueError(f"cycles: {cycles} must be >= 1; retrain at least one cycle")
    data = spec.model_dump(mode="json")
    data["budget"] = {**data["budget"], "cycles": cycles}
    data["seed"] = spec.seed + num_versions
    parse_spec(data)  # the derived spec must be a valid commission on its own
    return data


@task(name="plan-expert", **_IO)
def plan_expert(name: str, now: datetime, max_age: timedelta, settings: Settings) -> ExpertPlan:
    """Whether ``name``'s champion is due (its data, fetched again now, or its age)."""
    from factory.data.sources import dataset_sha256, fetch_sources
    from factory.library.registry import ExpertLibrary
    from infra import tracking as t

    library = ExpertLibrary(settings)
    champion = library.show(name, "champion")
    spec = CommissionStore(settings.db_url).get(champion.tags["commission_id"]).spec()
    data_sha = dataset_sha256(fetch_sources(spec, settings))
    stamp_ms = t.get_version(library.tracking, name, champion.version).creation_timestamp
    created = datetime.fromtimestamp(stamp_ms / 1000.0, tz=UTC)
    reason = is_due(now, created, max_age, data_sha, champion.tags.get("dataset_sha256", ""))
    num_versions = len(t.search_versions(library.tracking, name=name))
    return ExpertPlan(reason=reason, spec=spec, num_versions=num_versions)


@task(name="write-derived-spec", cache_policy=NO_CACHE)
def write_derived_spec(name: str, plan: ExpertPlan, cycles: int, settings: Settings) -> Path:
    """Writes the retraining spec under ``<home>/retrain/<expert>/<n>/spec.yaml``."""
    spec_path = settings.home / "retrain" / name / str(plan.num_versions) / "spec.yaml"
    body = derived_spec(plan.spec, cycles, plan.num_versions)
    atomic_write_text(spec_path, yaml.safe_dump(body))
    return spec_path


@task(name="check-registered", **_IO)
def check_registered(name: str, version: str, settings: Settings) -> PromotionDecision:
    """The gate record of a freshly registered version; the commission flow must have
    registered it as challenger (or promoted it through the gate) and recorded the decision."""
    from factory.library.registry import ExpertLibrary

    shown = ExpertLibrary(settings).show(name, version)
    if "gate_decision" not in shown.tags:
        raise RuntimeError(f"{name}@{version}: registered without a gate decision")
    decision = PromotionDecision.model_validate(json.loads(shown.tags["gate_decision"]))
    if not ({"challenger", "champion"} & set(shown.aliases)):
        raise RuntimeError(f"{name}@{version}: neither challenger nor champion")
    if ("champion" in shown.aliases) and not decision.promote:
        raise RuntimeError(f"{name}@{version}: champion although the gate refused it")
    return decision
