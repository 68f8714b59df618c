"""What the Prefect UI shows of a commission: run names and artifacts.

Artifacts are keyed per expert (``<expert id>-pol``, ``-rejections``, ``-wise-ft``, ``-gate``,
``-mlflow``), so the UI's artifact page trends each one across a commission's cycles and across
retraining commissions of the same expert. Prefect keys allow only lowercase letters, digits and
dashes: :func:`artifact_key` maps an expert id onto them.
"""

from __future__ import annotations

import math
import re

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks.cycle_commit import CycleResult


def artifact_key(expert_id: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one expert's ``what``."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"{expert_id}-{what}".lower())
    return re.sub(r"-{2,}", "-", key).strip("-")


def _number(value: float | str | None, digits: int = 6) -> float | str | None:
    if isinstance(value, float) and math.isfinite(value):
        return round(value, digits)
    return value if value is None else str(value)


def cycle_run_name() -> str:
    """``<commission id> cycle <n>`` for a cycle flow run (from its ``inputs`` parameter)."""
    inputs = flow_run.parameters["inputs"]
    return f"{_get(inputs, 'commission_id')} cycle {_get(inputs, 'cycle')}"


def commission_run_name() -> str:
    """``commission <domain> for <customer> (<spec file>)`` for a commission flow run; the
    commission id itself is known only after intake."""
    from pathlib import Path

    from factory.commission import load_spec

    path = Path(flow_run.parameters["spec_path"])
    try:
        spec = load_spec(path)
    except (OSError, ValueError):  # the flow itself reports a bad spec; the name stays plain
        return f"commission {path.name}"
    return f"commission {spec.domain} for {spec.customer} ({path.name})"


def _get(obj, name: str):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def publish_cycle(result: CycleResult) -> list[str]:
    """The cycle's PoL table, its rejections with their reasons and the WiSE-FT curve as
    artifacts of the current run; returns the keys written."""
    expert, cycle = result.expert_id, result.cycle
    rows = [
        {
            "cycle": cycle,
            "candidate": c.candidate_id,
            "contributor": c.contributor_id or "",
            "accepted": c.accepted,
            "pol_score": _number(c.score),
            "merge_weight": _number(c.weight),
            "heldout_loss": _number(c.loss.mean) if c.loss is not None else None,
            "reason": c.reason or "",
        }
        for c in result.merge.candidates
    ]
    keys = [artifact_key(expert, "pol"), artifact_key(expert, "rejections")]
    create_table_artifact(
        rows,
        key=keys[0],
        description=f"Proof-of-Loss of cycle {cycle} of {result.commission_id}: score "
        f"max(0, L(current) - L(current + delta)) ** p per candidate; held-out loss "
        f"{_number(result.heldout_loss_before, 4)} -> {_number(result.heldout_loss_after, 4)}",
    )
    rejected = [c for c in result.merge.candidates if not c.accepted]
    lines = [f"# Rejected candidates, cycle {cycle} of {result.commission_id}", ""]
    if rejected:
        lines += ["| candidate | contributor | reason | detail |", "|---|---|---|---|"]
        lines += [
            f"| {c.candidate_id} | {c.contributor_id or '-'} | {c.reason} | "
            f"{(c.detail or '').replace('|', '/')} |"
            for c in rejected
        ]
    else:
        lines.append("None: every candidate passed the gate.")
    create_markdown_artifact("\n".join(lines), key=keys[1],
                             description=f"gate rejections of cycle {cycle}")  # fmt: skip
    if result.alpha_search is not None:
        keys.append(artifact_key(expert, "wise-ft"))
        chosen = result.alpha_search.chosen_alpha
        curve = [
            {
                "cycle": cycle,
                "alpha": p.alpha,
                "domain_loss": _number(p.domain_loss),
                "general_loss": _number(p.general_loss),
                "chosen": p.alpha == chosen,
            }
            for p in result.alpha_search.curve
        ]
        create_table_artifact(
            curve,
            key=keys[-1],
            description=f"WiSE-FT alpha search of cycle {cycle}: alpha {chosen} chosen "
            f"(general loss of the base {_number(result.alpha_search.base_general_loss, 4)})",
        )
    return keys


def publish_registration(
    expert_id: str,
    version: str,
    promoted: bool,
    gate_reasons: list[str],
    pol_gain: float,
    aliases: list[str],
    tracking_uri: str,
) -> list[str]:
    """The promotion gate's decision (markdown) and a link to the MLflow model version."""
    decision = "promoted to champion" if promoted else "kept as challenger"
    reasons = ", ".join(gate_reasons) or "none"
    text = "\n".join([
        f"# Gate: {expert_id} version {version} {decision}",
        "",
        f"- reasons against promotion: {reasons}",
        f"- Proof-of-Loss gain over the reference: {pol_gain:.6g}",
        f"- aliases: {', '.join(aliases) or '-'}",
    ])  # fmt: skip
    keys = [artifact_key(expert_id, "gate"), artifact_key(expert_id, "mlflow")]
    create_markdown_artifact(text, key=keys[0], description=f"promotion gate of version {version}")
    create_link_artifact(
        mlflow_version_url(tracking_uri, expert_id, version),
        link_text=f"{expert_id} version {version} in MLflow",
        key=keys[1],
        description=f"load with mlflow: models:/{expert_id}/{version}",
    )
    return keys


def mlflow_version_url(tracking_uri: str, name: str, version: str) -> str:
    """The MLflow UI page of a model version when the tracking server is HTTP; for an embedded
    store (SQLite), the ``models:/`` URI (``mlflow ui --backend-store-uri ...`` shows it)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"
    return f"models:/{name}/{version}"
