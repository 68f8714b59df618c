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
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger

from flows.commission import commission_flow
from infra.settings import Settings, get_settings
from tasks.retraining import ExpertPlan, check_registered, plan_expert, write_derived_spec


def retrain_expert(name: str, plan: ExpertPlan, cycles: int, settings: Settings) -> dict[str, Any]:
    """Writes the derived spec and runs the commission flow warm-started from the champion."""
    spec_path = write_derived_spec(name, plan, cycles, settings)
    summary = commission_flow(str(spec_path), settings, warm_start=f"{name}@champion")
    if summary.registered is None:
        raise RuntimeError(f"{name}: the retraining commission registered nothing")
    decision = check_registered(name, summary.registered.version, settings)
    return {
        "commission_id": summary.commission_id,
        "version": summary.registered.version,
        "promoted": decision.promote,
        "gate_reasons": list(decision.reasons),
        "spec_path": str(spec_path),
    }


@flow(name="retrain", flow_run_name="retrain experts older than {max_age_days} days")
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
    from factory.library.registry import ExpertLibrary

    if max_age_days < 0:
        raise ValueError(f"max_age_days: {max_age_days} must be >= 0")
    if cycles < 1:
        raise ValueError(f"cycles: {cycles} must be >= 1; retrain at least one cycle")
    settings = settings or get_settings()
    champions = [v.name for v in ExpertLibrary(settings).list() if "champion" in v.aliases]
    if experts is not None:
        unknown = sorted(set(experts) - set(champions))
        if unknown:
            raise ValueError(
                f"experts: {unknown} have no champion in the library; see `taas library list`"
            )
        champions = [name for name in champions if name in experts]
    now = datetime.now(UTC)
    report: dict[str, dict[str, Any]] = {}
    logger = get_run_logger()
    for name in champions:
        entry: dict[str, Any] = {"due": None, "commission_id": None, "version": None,
                                 "promoted": False, "gate_reasons": []}  # fmt: skip
        try:
            plan = plan_expert(name, now, timedelta(days=max_age_days), settings)
            entry["due"] = plan.reason
            if plan.reason is not None:
                logger.info("%s: due (%s); commissioning from its champion", name, plan.reason)
                entry.update(retrain_expert(name, plan, cycles, settings))
        except Exception as exc:  # noqa: BLE001 - one expert's failure must not stop the rest
            entry["error"] = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
        report[name] = entry
        level = logging.ERROR if "error" in entry else logging.INFO
        logger.log(level, "%s: %s", name, json.dumps(entry, sort_keys=True))
    failed = sorted(name for name, entry in report.items() if "error" in entry)
    if failed:
        raise RuntimeError(f"retrain failed for {failed}: " + "; ".join(
            f"{name}: {report[name]['error']}" for name in failed))  # fmt: skip
    return report
