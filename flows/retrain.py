"""The retrain flow: keeps library experts current by recommissioning them from their champion.

Deployed on a cron schedule by ``prefect.yaml`` (deployment ``retrain``); by hand::

    python -c "from flows.retrain import retrain_flow; print(retrain_flow(max_age_days=30))"

For every library expert with a ``champion``: it is due when its data changed (the sha256 of its
commission's sources, fetched again now, differs from the champion's ``dataset_sha256`` tag) or
when the champion is older than ``max_age_days`` (by the version's creation timestamp). A due
expert is retrained by a new commission over its original customer spec, warm-started from the
champion; the commission flow registers the result as ``challenger`` and only its gate makes it
``champion``. The derived spec is kept under ``<home>/retrain/<expert>/<n>/spec.yaml``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from factory.commission import CommissionSpec, parse_spec
from factory.commission_store import CommissionStore
from flows.commission import commission_flow
from infra.atomic import atomic_write_text
from infra.settings import Settings, get_settings

DUE_REASONS = ("data_changed", "age")


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


def _created(tracking, name: str, version: str) -> datetime:
    from infra import tracking as t

    stamp_ms = t.get_version(tracking, name, version).creation_timestamp
    return datetime.fromtimestamp(stamp_ms / 1000.0, tz=UTC)


def _check_registered(library, name: str, version: str) -> dict[str, Any]:
    """The gate record of a freshly registered version; the commission flow must have
    registered it as challenger (or promoted it through the gate) and recorded the decision."""
    shown = library.show(name, version)
    if "gate_decision" not in shown.tags:
        raise RuntimeError(f"{name}@{version}: registered without a gate decision")
    decision = json.loads(shown.tags["gate_decision"])
    if not ({"challenger", "champion"} & set(shown.aliases)):
        raise RuntimeError(f"{name}@{version}: neither challenger nor champion")
    if ("champion" in shown.aliases) and not decision["promote"]:
        raise RuntimeError(f"{name}@{version}: champion although the gate refused it")
    return decision


def plan_expert(library, name: str, now: datetime, max_age: timedelta, settings: Settings):
    """(reason or None, the champion's commission spec, number of versions) for one expert."""
    from factory.data.sources import dataset_sha256, fetch_sources
    from infra import tracking as t

    champion = library.show(name, "champion")
    spec = CommissionStore(settings.db_url).get(champion.tags["commission_id"]).spec()
    data_sha = dataset_sha256(fetch_sources(spec, settings))
    created = _created(library.tracking, name, champion.version)
    reason = is_due(now, created, max_age, data_sha, champion.tags.get("dataset_sha256", ""))
    num_versions = len(t.search_versions(library.tracking, name=name))
    return reason, spec, num_versions


def retrain_expert(
    name: str, spec: CommissionSpec, num_versions: int, cycles: int, settings: Settings
) -> dict[str, Any]:
    """Writes the derived spec and runs the commission flow warm-started from the champion."""
    from factory.library import ExpertLibrary

    folder = settings.home / "retrain" / name / str(num_versions)
    spec_path = Path(folder) / "spec.yaml"
    atomic_write_text(spec_path, yaml.safe_dump(derived_spec(spec, cycles, num_versions)))
    summary = commission_flow(str(spec_path), settings, warm_start=f"{name}@champion")
    registered = summary["registered"]
    decision = _check_registered(ExpertLibrary(settings), name, str(registered["version"]))
    return {
        "commission_id": summary["commission_id"],
        "version": str(registered["version"]),
        "promoted": bool(decision["promote"]),
        "gate_reasons": list(decision["reasons"]),
        "spec_path": str(spec_path),
    }


@flow(name="retrain", log_prints=True)
def retrain_flow(
    max_age_days: float = 30,
    cycles: int = 1,
    settings: Settings | None = None,
    experts: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Retrains every due library expert (or only ``experts``) and reports per expert:
    ``{"due": reason | None, "commission_id", "version", "promoted", "gate_reasons"}``.

    An expert that fails is reported with ``"error"`` and the others still run; the flow then
    fails, so the schedule shows it.
    """
    from factory.library import ExpertLibrary

    if max_age_days < 0:
        raise ValueError(f"max_age_days: {max_age_days} must be >= 0")
    if cycles < 1:
        raise ValueError(f"cycles: {cycles} must be >= 1; retrain at least one cycle")
    settings = settings or get_settings()
    library = ExpertLibrary(settings)
    champions = [v.name for v in library.list() if "champion" in v.aliases]
    if experts is not None:
        unknown = sorted(set(experts) - set(champions))
        if unknown:
            raise ValueError(
                f"experts: {unknown} have no champion in the library; see `taas library list`"
            )
        champions = [name for name in champions if name in experts]
    now = datetime.now(UTC)
    report: dict[str, dict[str, Any]] = {}
    for name in champions:
        entry: dict[str, Any] = {"due": None, "commission_id": None, "version": None,
                                 "promoted": False, "gate_reasons": []}  # fmt: skip
        try:
            reason, spec, num_versions = plan_expert(
                library, name, now, timedelta(days=max_age_days), settings
            )
            entry["due"] = reason
            if reason is not None:
                print(f"[retrain] {name}: due ({reason}); commissioning from its champion")
                entry.update(retrain_expert(name, spec, num_versions, cycles, settings))
        except Exception as exc:  # noqa: BLE001 - one expert's failure must not stop the rest
            entry["error"] = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
        report[name] = entry
        print(f"[retrain] {name}: {json.dumps(entry, sort_keys=True)}")
    failed = sorted(name for name, entry in report.items() if "error" in entry)
    if failed:
        raise RuntimeError(f"retrain failed for {failed}: " + "; ".join(
            f"{name}: {report[name]['error']}" for name in failed))  # fmt: skip
    return report
