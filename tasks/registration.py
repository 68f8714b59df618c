"""Prefect tasks for the end of a commission: the promotion gate's inputs, registration, promotion.

:func:`provenance_for` is what the library records about the result; :func:`gate_inputs`
measures the candidate against the reference (the champion, else the base) on the same seeded
held-out batches and collects the benchmark and domain numbers the promotion gate compares.
:func:`register_task` and :func:`promote_task` talk to the registry (a server and an object store
in a team setup), so they retry; a retry is safe because registration is exactly-once on
(commission id, adapter sha256) and promotion re-applies the same alias.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from evaluation.benchmark import BenchmarkResult
from factory.attestation import ProvenanceEvidence
from factory.commission import PRICE_TAGS, CommissionSpec
from factory.hashing import json_sha256
from factory.library.promotion import GateInputs
from factory.library.provenance import RegistrationProvenance
from factory.library.registry import ExpertLibrary, LibraryVersion
from infra.settings import Settings
from tasks.compose import ComposeResult, LibrarySnapshot, blocks
from tasks.cycle_commit import CycleResult
from tasks.job import Job


class Registration(BaseModel):
    """The registered version and what the promotion gate decided about it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    gate_reasons: list[str]
    pol_gain_over_reference: float


def _io_failure(task, task_run, state) -> bool:
    """Retry registry and network failures; never bad input (ValueError) or a full queue wait."""
    try:
        state.result()
    except (ValueError, TimeoutError):
        return False
    except Exception:  # noqa: BLE001 - any other failure is the registry's I/O: worth a retry
        return True
    return False


_RETRY = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": _io_failure,
    "cache_policy": NO_CACHE,
}


def provenance_for(
    job: Job, spec: CommissionSpec, cycles: list[CycleResult]
) -> RegistrationProvenance:
    """The result's provenance: PoL scores, alpha, contributors' shares, licence and prices."""
    from factory.customer import customer_id_for
    from merging.rewards import reward_shares

    # A contributor's share of the version: its shares summed over the cycles, renormalized.
    totals: dict[str, float] = {}
    for cycle in cycles:
        for contributor, share in cycle.shares.items():
            totals[contributor] = totals.get(contributor, 0.0) + float(Decimal(share))
    shares = {k: str(v) for k, v in reward_shares(totals).items()} if totals else {}
    prices = {
        key: getattr(spec.licence, key)
        for key in PRICE_TAGS
        if spec.licence is not None and getattr(spec.licence, key) is not None
    }
    return RegistrationProvenance(
        commission_id=job.commission_id,
        dataset_sha256=job.dataset_sha256,
        config_hash=json_sha256({"spec": job.spec_sha256}),
        pol_scores={f"cycle-{c.cycle}/{k}": v for c in cycles for k, v in c.pol.items()},
        wise_ft_alpha=next((c.alpha for c in reversed(cycles) if c.improved), None),
        cycles=len(cycles),
        contributors=shares,
        licence=spec.licence.type if spec.licence else "usage",
        visibility="public" if spec.visibility == "public" else "private",
        parent_adapter_sha256=cycles[0].parent_adapter_sha256 or "",
        **_parent(job),
        customer_id=customer_id_for(spec.customer),
        base_model_path=job.base_model_path,  # referenced (with its sha256) by the MLflow model
        evidence=evidence_for(job, cycles),
        # The licence section's prices (decimal strings); unset ones are left to the catalog.
        **prices,
    )


def _parent(job: Job) -> dict[str, str]:
    """The warm start's parent expert and version, and the revenue share its contributors keep
    (``Settings.parent_revenue_share`` when the job opened); {} for a commission from the base."""
    if not job.warm_start_expert:
        return {}
    name, _, version = job.warm_start_expert.partition("@")
    return {"parent_expert": name, "parent_version": version, "parent_share": job.parent_share}


def evidence_for(job: Job, cycles: list[CycleResult]) -> ProvenanceEvidence:
    """What the attestation records of each cycle: the PoL batch plan and seed, and every
    candidate with its score and its contributor's signed manifest (read from the cycle's line
    and inbox folders)."""
    from factory.attestation import CandidateEvidence, CycleEvidence
    from factory.library.attest import signed_manifests

    recorded = []
    for c in cycles:
        folder = job.cycle_dir(c.cycle)
        signed = signed_manifests(
            [folder.with_name(f"{folder.name}.{s}") for s in ("lines", "inbox")]
        )
        candidates = []
        for cand in c.merge.candidates:
            manifest, signature = signed.get(
                (cand.candidate_id, cand.adapter_sha256 or ""), (None, None)
            )
            candidates.append(CandidateEvidence(
                candidate_id=cand.candidate_id, contributor_id=cand.contributor_id,
                accepted=cand.accepted, reason=cand.reason, score=cand.score,
                adapter_sha256=cand.adapter_sha256, manifest=manifest, signature=signature,
            ))  # fmt: skip
        recorded.append(CycleEvidence(
            cycle=c.cycle, pol_seed=c.pol_plan.seed, pol_batch_size=c.pol_plan.batch_size,
            pol_num_batches=c.pol_plan.num_batches, batch_indices=c.merge.batch_indices,
            heldout_loss_before=c.heldout_loss_before, heldout_loss_after=c.heldout_loss_after,
            candidates=candidates,
        ))  # fmt: skip
    return ProvenanceEvidence(spec_sha256=job.spec_sha256, cycles=recorded)


def _scores(table: dict, model: str, tasks: list[str]) -> dict[str, float]:
    return {
        f"{task}/{metric}": value
        for task in tasks
        for metric, value in table.get(model, {}).get(task, {}).items()
    }


@task(name="gate-inputs", retries=0, cache_policy=NO_CACHE)
def gate_inputs(
    job: Job,
    spec: CommissionSpec,
    cycles: list[CycleResult],
    composed: ComposeResult,
    bench: BenchmarkResult,
    library: LibrarySnapshot,
) -> GateInputs:
    """PoL of the candidate and the reference on the same seeded held-out batches, plus the
    benchmark and other-domain numbers the promotion gate compares."""
    from evaluation.benchmark import GENERAL_TASKS
    from evaluation.proof_of_loss import PolEvaluator
    from factory.expert import load_expert
    from tasks.cycle import pol_plan

    expert = load_expert(composed.expert_dir)
    plan = pol_plan(len(blocks(job.data_dir / "heldout")), spec.seed, len(cycles) + 1,
                    spec.heldout.pol_batches)  # fmt: skip
    evaluator = PolEvaluator(job.base_model_path, job.data_dir / "heldout", plan.batch_size,
                             plan.num_batches, plan.seed, expert.adapter_config,
                             job.base_model_sha256, job.root / "cycles" / "pol-cache")  # fmt: skip
    candidate_loss = evaluator.loss(expert.adapter, expert.adapter_config)
    if library.champion is not None:
        reference = load_expert(library.champion)
        reference_loss = evaluator.loss(reference.adapter, reference.adapter_config)
    else:
        reference_loss = evaluator.loss(None)
    table = bench.table
    domain_tasks = [t for t in bench.tasks if t.startswith("heldout_")] + list(
        spec.benchmarks.tasks
    )
    general_tasks = list(GENERAL_TASKS)
    reference_model = "champion" if library.champion is not None else "base"
    existing = composed.acceptance.existing
    # Domain tasks judge the expert itself; general tasks judge the deployed mixture, where
    # general text routes to the base (an expert alone is not meant to be a general model).
    return GateInputs(
        candidate_heldout_loss=candidate_loss.mean,
        reference_heldout_loss=reference_loss.mean,
        candidate_batches_sha256=json_sha256(candidate_loss.batch_indices),
        reference_batches_sha256=json_sha256(reference_loss.batch_indices),
        candidate_benchmarks={
            **_scores(table, "expert", domain_tasks),
            **_scores(table, "mixture", general_tasks),
        },  # fmt: skip
        reference_benchmarks={
            **_scores(table, reference_model, domain_tasks),
            **_scores(table, "base", general_tasks),
        },  # fmt: skip
        other_domain_losses_before={k: v.before for k, v in existing.items()},
        other_domain_losses_after={k: v.after for k, v in existing.items()},
    )


@task(name="register-expert", **_RETRY)
def register_task(
    settings: Settings,
    expert_folder: Path,
    provenance: RegistrationProvenance,
    benchmark: BenchmarkResult | None,
    plots: list[Path],
    run_id: str | None,
) -> LibraryVersion:
    """Registers one accepted result (alias ``challenger``); idempotent across retries. Its
    replay rows go to the factory's object store first (factory.replay), never to the registry."""
    from factory.replay import publish_replay
    from infra.storage import open_store

    publish_replay(open_store(settings.objects_url, settings.s3_endpoint_url), expert_folder)
    return ExpertLibrary(settings).register(expert_folder, provenance, benchmark, plots, run_id)


@task(name="promote-expert", **_RETRY)
def promote_task(settings: Settings, version: LibraryVersion, gate: GateInputs) -> Registration:
    """Makes the version ``champion`` iff the promotion gate accepts it."""
    library = ExpertLibrary(settings)
    decision = library.promote(version.name, version.version, gate)
    shown = library.show(version.name, version.version)
    return Registration(
        name=shown.name,
        version=str(shown.version),
        aliases=sorted(shown.aliases),
        promoted=decision.promote,
        gate_reasons=decision.reasons,
        pol_gain_over_reference=decision.pol_gain,
    )
