"""The promotion gate: whether a registered version may become its expert's ``champion``.

Distinct from the candidate gate (:mod:`evaluation.gate`), which screens contributors'
submissions before a merge: this one compares a whole new version against the current champion
(the base when there is none) after benchmarking. Pure: no MLflow, prefect or boto3.

Promote iff all hold (else each failing check's reason, from :data:`GATE_REASONS`):

- ``heldout_batches_differ``: both losses were taken on the same held-out batches (the sha256 of
  their token ids);
- ``no_pol_gain``: PoL gain = reference loss - candidate loss > 0;
- ``benchmark_missing`` / ``benchmark_regression``: every reference benchmark (``task/metric``)
  is present and no worse than ``benchmark_tolerance``, relative (:func:`regression`);
- ``domain_regression``: no other domain's loss up by more than ``domain_tolerance``, relative
  (after / before - 1).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from evaluation.benchmark import LOWER_IS_BETTER

GATE_REASONS = (
    "heldout_batches_differ",
    "no_pol_gain",
    "benchmark_missing",
    "benchmark_regression",
    "domain_regression",
)


class GateInputs(BaseModel):
    """Numbers the gate compares; "reference" is the champion (the base when there is none).

    Benchmarks are keyed ``"task/metric"``; losses are mean token cross-entropy on held-out
    batches identified by the sha256 of their token ids.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate_heldout_loss: float
    reference_heldout_loss: float
    candidate_batches_sha256: str
    reference_batches_sha256: str
    candidate_benchmarks: dict[str, float]
    reference_benchmarks: dict[str, float]
    other_domain_losses_before: dict[str, float]
    other_domain_losses_after: dict[str, float]
    benchmark_tolerance: float = Field(default=0.02, ge=0)
    domain_tolerance: float = Field(default=0.02, ge=0)


class PromotionDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    promote: bool
    reasons: list[str]
    pol_gain: float
    benchmark_regressions: dict[str, float]
    domain_regressions: dict[str, float]
    previous_champion: str | None = None


def regression(key: str, reference: float, candidate: float) -> float:
    """Relative worsening, > 0 when worse: (ref - cand)/|ref| for higher-is-better metrics,
    (cand - ref)/|ref| for lower-is-better ones; the absolute difference when ref is 0."""
    worse = (
        candidate - reference
        if key.rsplit("/", 1)[-1] in LOWER_IS_BETTER
        else (reference - candidate)
    )
    return worse / abs(reference) if reference != 0 else worse


def promotion_gate(inputs: GateInputs) -> PromotionDecision:
    """Promote iff all hold: same held-out batches; PoL gain = reference loss - candidate loss
    > 0; no reference benchmark missing or worse than ``benchmark_tolerance`` (relative); no
    other domain's loss up by more than ``domain_tolerance`` (relative: after/before - 1)."""
    numbers = [inputs.candidate_heldout_loss, inputs.reference_heldout_loss]
    numbers += list(inputs.candidate_benchmarks.values()) + list(
        inputs.reference_benchmarks.values()
    )
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("gate_inputs: losses and benchmarks must be finite numbers")
    reasons = []
    if inputs.candidate_batches_sha256 != inputs.reference_batches_sha256:
        reasons.append("heldout_batches_differ")
    pol_gain = inputs.reference_heldout_loss - inputs.candidate_heldout_loss
    if not pol_gain > 0:
        reasons.append("no_pol_gain")
    missing = sorted(set(inputs.reference_benchmarks) - set(inputs.candidate_benchmarks))
    if missing:
        reasons.append("benchmark_missing")
    bench = {
        key: regression(key, ref, inputs.candidate_benchmarks[key])
        for key, ref in sorted(inputs.reference_benchmarks.items())
        if key in inputs.candidate_benchmarks
    }
    if any(value > inputs.benchmark_tolerance for value in bench.values()):
        reasons.append("benchmark_regression")
    domains = {}
    for domain, before in sorted(inputs.other_domain_losses_before.items()):
        after = inputs.other_domain_losses_after.get(domain, math.inf)
        domains[domain] = after / before - 1.0 if before > 0 else after - before
    if any(value > inputs.domain_tolerance for value in domains.values()):
        reasons.append("domain_regression")
    return PromotionDecision(
        promote=not reasons,
        reasons=reasons,
        pol_gain=pol_gain,
        benchmark_regressions=bench,
        domain_regressions=domains,
    )
