"""The expert library: experts as MLflow registered models, one version per accepted result.

One registered model per expert (named by the manifest's ``expert_id``, e.g. ``expert-legal``);
each version's source is the run artifact folder ``expert/`` (the committed expert folder), next to
``card/README.md`` (model card), ``benchmark/results.json`` (lm-eval) and ``plots/``. Provenance
lives in version tags (see :data:`PROVENANCE_TAGS`). A new version gets alias ``challenger``; only
:func:`promotion_gate` makes one ``champion``, and the champion it replaces is pushed onto the
model's ``champion_history`` tag so :meth:`ExpertLibrary.rollback` can restore it.

Dates are ISO-8601 UTC to the second: ``trained_at`` (version tag, written at registration, the
end of the result's training), ``promoted_at`` (version tag, written each time the version becomes
champion, by promotion or rollback); :attr:`LibraryVersion.created_at` is MLflow's own creation
time of the version. Prices (decimal strings: ``price_per_1k_tokens``, ``weight_fee``,
``maintenance_fee``, ``exclusive_premium``) come from the commission as version tags; the operator
may override them later as registered-model tags with :meth:`ExpertLibrary.set_price`.

Exactly once: the idempotency key is sha256(commission id + adapter sha256), kept as a version
tag. Concurrent registrations of one result race for a unique claim row in the factory database
(``settings.db_url``, SQLAlchemy): the primary key makes exactly one winner whether the MLflow
store is embedded SQLite or a server shared by many machines. Losers wait for the winner's version
and return it; a claim left by a crashed winner is taken over after ``stale_claim_s``.

The MLflow client is imported lazily (through :mod:`infra.tracking`) so that the pure
:func:`promotion_gate` imports without it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import String, create_engine, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from evaluation.benchmark import LOWER_IS_BETTER, BenchmarkResult
from factory.commission import PRICE_TAGS, price_amount
from factory.expert import load_expert
from factory.hashing import json_sha256
from factory.model_card import integration_markdown, model_card
from infra.atomic import atomic_write_json, atomic_write_text, committed_dir
from infra.settings import Settings

CHALLENGER, CHAMPION = "challenger", "champion"
GATE_REASONS = (
    "heldout_batches_differ",
    "no_pol_gain",
    "benchmark_missing",
    "benchmark_regression",
    "domain_regression",
)
PROVENANCE_TAGS = (
    "commission_id domain expert_id base_model base_model_sha256 dataset_sha256 adapter_sha256 "
    "config_hash code_version pol_scores wise_ft_alpha cycles contributors licence visibility "
    "parent_adapter_sha256 benchmark_summary idempotency_key trained_at"
).split()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# ---- promotion gate (pure) --------------------------------------------------------------------


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


def _regression(key: str, reference: float, candidate: float) -> float:
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
        key: _regression(key, ref, inputs.candidate_benchmarks[key])
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


# ---- registration inputs and results ----------------------------------------------------------


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
    code_version: str | None = None
    # Prices from the commission's licence section (exact decimal strings); None: not priced.
    price_per_1k_tokens: str | None = None
    weight_fee: str | None = None
    maintenance_fee: str | None = None
    exclusive_premium: str | None = None

    @field_validator(*PRICE_TAGS)
    @classmethod
    def _price(cls, value: str | None, info) -> str | None:
        return None if value is None else price_amount(info.field_name, value)


@dataclass
class LibraryVersion:
    name: str
    version: str
    run_id: str
    source: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created_at: str = ""  # MLflow's creation time of the version, ISO-8601 UTC

    @property
    def domain(self) -> str:
        return self.tags.get("domain", "")

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        return json.loads(self.tags.get("benchmark_scores", "{}"))


class _Base(DeclarativeBase):
    pass


class RegistrationClaim(_Base):
    __tablename__ = "library_registration_claims"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    claimed_at: Mapped[float]
    version: Mapped[str | None] = mapped_column(String(32), default=None)


def code_version() -> str:
    """The git commit of the checkout, else the installed package version."""
    repo = Path(__file__).resolve().parents[1]
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


def _expert_scores(result: BenchmarkResult) -> tuple[dict, dict | None]:
    """(expert scores, base scores): the 'expert' model, else the first one not named 'base'."""
    names = [n for n in result.table if n != "base"]
    chosen = "expert" if "expert" in result.table else (names[0] if names else None)
    return (result.table.get(chosen, {}) if chosen else {}), result.table.get("base")


def utc_now_iso() -> str:
    """Now, ISO-8601 UTC to the second (e.g. ``2026-03-01T09:30:00+00:00``)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _iso_from_millis(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).replace(microsecond=0).isoformat()


def _summary(scores: dict[str, dict[str, float]]) -> str:
    parts = [f"{t}/{m}={v:.4g}" for t in sorted(scores) for m, v in sorted(scores[t].items())]
    return "; ".join(parts)[:500]


# ---- the library ------------------------------------------------------------------------------


class ExpertLibrary:
    """Registration, promotion, rollback, browsing and export of experts over the registry."""

    def __init__(self, settings: Settings, stale_claim_s: float = 600.0, wait_s: float = 300.0):
        from infra import tracking

        self.settings = settings
        self._t = tracking
        self.tracking = tracking.configure(settings)
        self.stale_claim_s = stale_claim_s
        self.wait_s = wait_s
        connect_args = {"timeout": 60} if settings.db_url.startswith("sqlite") else {}
        if settings.db_url.startswith("sqlite:///"):
            Path(settings.db_url.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        self._engine = create_engine(settings.db_url, connect_args=connect_args)
        _Base.metadata.create_all(self._engine)

    # -- lookups --

    def _version(self, name: str, version: str) -> LibraryVersion:
        mv = self._t.get_version(self.tracking, name, version)
        return LibraryVersion(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id,
            source=mv.source,
            aliases=sorted(mv.aliases or []),
            tags=dict(mv.tags),
            created_at=_iso_from_millis(mv.creation_timestamp),
        )

    def _resolve(self, name: str, ref: str | None = None) -> LibraryVersion:
        """``ref``: a version number, an alias, or None (the champion, else the latest)."""
        if ref is not None and str(ref).isdigit():
            return self._version(name, str(ref))
        alias = ref or CHAMPION
        found = self._t.get_version_by_alias(self.tracking, name, alias)
        if found is not None:
            return self._version(name, str(found.version))
        if ref is not None:
            raise ValueError(f"ref: {name} has no alias '{ref}'; give a version or another alias")
        versions = self._t.search_versions(self.tracking, name=name)
        if not versions:
            raise ValueError(f"name: no expert '{name}' in the library; see `taas library list`")
        return self._version(name, str(versions[-1].version))

    def find(self, name: str, idempotency_key: str) -> LibraryVersion | None:
        found = self._t.search_versions(
            self.tracking, name=name, tags={"idempotency_key": idempotency_key}
        )
        return self._version(name, str(found[0].version)) if found else None

    # -- registration --

    def _claim(self, key: str) -> str | None:
        """Inserts the claim row; returns the owner token when this caller won, else None."""
        owner = uuid.uuid4().hex
        try:
            with Session(self._engine) as session, session.begin():
                session.add(RegistrationClaim(key=key, owner=owner, claimed_at=time.time()))
            return owner
        except IntegrityError:
            pass  # another registration holds the key: take over only a stale, unfinished claim
        with Session(self._engine) as session, session.begin():
            row = session.get(RegistrationClaim, key)
            if row is None or row.version is not None:
                return None
            if time.time() - row.claimed_at < self.stale_claim_s:
                return None
            taken = session.execute(
                update(RegistrationClaim)
                .where(RegistrationClaim.key == key, RegistrationClaim.owner == row.owner)
                .values(owner=owner, claimed_at=time.time())
            )
            return owner if taken.rowcount == 1 else None

    def _settle_claim(self, key: str, owner: str, version: str | None) -> None:
        with Session(self._engine) as session, session.begin():
            where = (RegistrationClaim.key == key, RegistrationClaim.owner == owner)
            if version is None:
                session.execute(delete(RegistrationClaim).where(*where))
            else:
                session.execute(update(RegistrationClaim).where(*where).values(version=version))

    def register(
        self,
        expert_folder: Path,
        provenance: dict[str, Any],
        benchmark: BenchmarkResult | dict | None = None,
        plots: list[Path] | None = None,
        run_id: str | None = None,
    ) -> LibraryVersion:
        """Registers one accepted result exactly once and gives it alias ``challenger``."""
        expert = load_expert(Path(expert_folder))
        manifest = expert.manifest
        prov = RegistrationProvenance.model_validate(provenance)
        name = manifest.expert_id
        if not _NAME.match(name):
            raise ValueError(f"expert_id: {name!r} is not a registry name; use [A-Za-z0-9_.-]")
        plots = [Path(p) for p in plots or []]
        for plot in plots:
            if not plot.is_file():
                raise ValueError(f"plots: no such file {plot}")
        key = json_sha256([prov.commission_id, manifest.adapter_sha256])[:32]
        deadline = time.monotonic() + self.wait_s
        while True:
            existing = self.find(name, key)
            if existing is not None:
                return existing
            owner = self._claim(key)
            if owner is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"registration {key} is held by another process; retry later")
            time.sleep(0.2)
        try:
            existing = self.find(name, key)
            if existing is None:
                existing = self._create(expert_folder, expert, prov, key, benchmark, plots, run_id)
        except BaseException:
            self._settle_claim(key, owner, None)
            raise
        self._settle_claim(key, owner, existing.version)
        return existing

    def _create(self, folder, expert, prov, key, benchmark, plots, run_id) -> LibraryVersion:
        t, manifest = self._t, expert.manifest
        if isinstance(benchmark, dict):
            benchmark = BenchmarkResult.from_dict(
                benchmark if "table" in benchmark else {"table": benchmark}
            )
        scores, base_scores = _expert_scores(benchmark) if benchmark else ({}, None)
        tags = {
            "commission_id": prov.commission_id,
            "domain": manifest.domain,
            "expert_id": manifest.expert_id,
            "base_model": manifest.base_model,
            "base_model_sha256": manifest.base_model_sha256,
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
            "benchmark_scores": json.dumps(scores, sort_keys=True)[: t.MAX_TAG_CHARS],
            "idempotency_key": key,
            "trained_at": utc_now_iso(),
        }
        tags.update({k: getattr(prov, k) for k in PRICE_TAGS if getattr(prov, k) is not None})
        t.ensure_registered_model(
            self.tracking, manifest.expert_id, tags={"domain": manifest.domain}
        )
        own_run = run_id is None
        run_id = (
            t.start_run(self.tracking, f"register-{manifest.expert_id}", {"commission_id": key})
            if own_run
            else t.resume_run(self.tracking, run_id)
        )
        with tempfile.TemporaryDirectory(prefix="taas-register-") as staging:
            staging = Path(staging)
            shown = {
                k: v for k, v in tags.items() if k not in ("benchmark_scores", "idempotency_key")
            }
            card = model_card(manifest, shown, scores, prov.licence, base_scores)
            atomic_write_text(staging / "card" / "README.md", card)
            t.log_artifacts(self.tracking, run_id, Path(folder), "expert")
            t.log_artifacts(self.tracking, run_id, staging / "card", "card")
            if benchmark is not None:
                benchmark.save(staging / "benchmark" / "results.json")
                t.log_artifacts(self.tracking, run_id, staging / "benchmark", "benchmark")
            for plot in plots:
                t.log_artifacts(self.tracking, run_id, plot, "plots")
        t.log_params(self.tracking, run_id, {f"prov.{k}": v for k, v in tags.items()})
        t.log_metrics(
            self.tracking,
            run_id,
            {f"bench.{task}.{m}": v for task, per in scores.items() for m, v in per.items()},
        )
        mv = t.create_version(self.tracking, manifest.expert_id, run_id, "expert", tags)
        t.set_alias(self.tracking, manifest.expert_id, CHALLENGER, str(mv.version))
        if own_run:
            t.end_run(self.tracking, run_id)
        return self._version(manifest.expert_id, str(mv.version))

    # -- promotion --

    def _history(self, name: str) -> list[str]:
        tags = self._t.registered_model_tags(self.tracking, name)
        return json.loads(tags.get("champion_history", "[]"))

    def promote(self, name: str, version: str, gate_inputs: GateInputs) -> PromotionDecision:
        """Makes ``version`` the champion iff :func:`promotion_gate` accepts; records both."""
        target = self._version(name, str(version))
        decision = promotion_gate(gate_inputs)
        current = self._t.get_version_by_alias(self.tracking, name, CHAMPION)
        previous = None if current is None else str(current.version)
        decision.previous_champion = previous
        record = decision.model_dump(mode="json")
        self._t.set_version_tag(
            self.tracking, name, target.version, "gate_decision", json.dumps(record)[:4000]
        )
        if not decision.promote or previous == target.version:
            return decision
        if previous is not None:
            history = self._history(name) + [previous]
            self._t.set_model_tag(self.tracking, name, "champion_history", json.dumps(history))
            self._t.set_version_tag(self.tracking, name, previous, "superseded_by", target.version)
        self._t.set_version_tag(self.tracking, name, target.version, "promoted_at", utc_now_iso())
        self._t.set_alias(self.tracking, name, CHAMPION, target.version)
        if CHALLENGER in target.aliases:
            self._t.delete_alias(self.tracking, name, CHALLENGER)
        return decision

    def rollback(self, name: str) -> LibraryVersion:
        """Restores the previous champion; the demoted version is tagged ``rolled_back``."""
        history = self._history(name)
        if not history:
            raise ValueError(f"name: {name} has no previous champion to roll back to")
        previous = history.pop()
        current = self._t.get_version_by_alias(self.tracking, name, CHAMPION)
        self._t.set_version_tag(self.tracking, name, previous, "promoted_at", utc_now_iso())
        self._t.set_alias(self.tracking, name, CHAMPION, previous)
        self._t.set_model_tag(self.tracking, name, "champion_history", json.dumps(history))
        if current is not None:
            self._t.set_version_tag(self.tracking, name, str(current.version), "rolled_back", "1")
        return self._version(name, previous)

    # -- prices --

    def set_price(self, name: str, **amounts: Any) -> dict[str, str]:
        """Sets price overrides (keys from :data:`PRICE_TAGS`, decimal amounts) as tags of the
        registered model, so they apply to every version without retraining; returns all of
        the model's price overrides after the change."""
        unknown = sorted(set(amounts) - set(PRICE_TAGS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a price; use one of {', '.join(PRICE_TAGS)}")
        given = {k: price_amount(k, v) for k, v in amounts.items() if v is not None}
        if not given:
            raise ValueError(f"amounts: give at least one of {', '.join(PRICE_TAGS)}")
        self._resolve(name)  # ValueError naming the expert when it is not in the library
        for key, value in given.items():
            self._t.set_model_tag(self.tracking, name, key, value)
        return {k: v for k, v in self.model_tags(name).items() if k in PRICE_TAGS}

    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's own tags (domain, champion_history, price overrides)."""
        return self._t.registered_model_tags(self.tracking, name)

    # -- browsing --

    def list(self, domain: str | None = None) -> list[LibraryVersion]:
        """One entry per expert (its champion, else its latest version), optionally by domain."""
        entries = []
        for name in self._t.search_models(self.tracking):
            if (
                domain is not None
                and self._t.registered_model_tags(self.tracking, name).get("domain") != domain
            ):
                continue
            entries.append(self._resolve(name))
        return entries

    def show(self, name: str, ref: str | None = None) -> LibraryVersion:
        return self._resolve(name, ref)

    def compare(self, a: str, b: str) -> dict[str, Any]:
        """Benchmarks and provenance of two ``name[@version|alias]`` refs, side by side."""
        left, right = (self._resolve(*_split_ref(ref)) for ref in (a, b))
        benchmarks = {}
        for task in sorted(set(left.scores) | set(right.scores)):
            metrics = set(left.scores.get(task, {})) | set(right.scores.get(task, {}))
            for metric in sorted(metrics):
                benchmarks[f"{task}/{metric}"] = (
                    left.scores.get(task, {}).get(metric),
                    right.scores.get(task, {}).get(metric),
                )
        provenance = {k: (left.tags.get(k), right.tags.get(k)) for k in PROVENANCE_TAGS}
        return {
            "refs": (f"{left.name}@{left.version}", f"{right.name}@{right.version}"),
            "benchmarks": benchmarks,
            "provenance": provenance,
        }

    def lineage(self, name: str) -> list[dict[str, Any]]:
        """Every version, oldest first, with its parent adapter, cycles, commission and aliases."""
        rows = []
        for mv in self._t.search_versions(self.tracking, name=name):
            v = self._version(name, str(mv.version))
            rows.append(
                {
                    "version": v.version,
                    "aliases": v.aliases,
                    "adapter_sha256": v.tags.get("adapter_sha256", ""),
                    "parent_adapter_sha256": v.tags.get("parent_adapter_sha256", ""),
                    "cycles": v.tags.get("cycles", ""),
                    "commission_id": v.tags.get("commission_id", ""),
                    "rolled_back": v.tags.get("rolled_back") == "1",
                }
            )
        return rows

    # -- moving weights out --

    def download(self, name: str, ref: str | None, dest: Path, overwrite: bool = False) -> Path:
        """The version's expert folder at ``dest``, verified with :func:`load_expert`."""
        v = self._resolve(name, ref)
        dest = Path(dest)
        if dest.exists() and not overwrite:
            raise ValueError(f"dest: {dest} exists; choose a new folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as scratch:
            got = self._t.download_run_artifacts(self.tracking, v.run_id, "expert", Path(scratch))
            expert = load_expert(got)  # ValueError when torn or tampered in the store
            if expert.manifest.adapter_sha256 != v.tags.get("adapter_sha256"):
                raise ValueError(f"{name}@{v.version}: adapter sha256 differs from its tag")
            if dest.exists():
                shutil.rmtree(dest)
            got.rename(dest)
        return dest

    def export(self, name: str, ref: str | None, dest: Path) -> Path:
        """A weight bundle: adapter, router rows, manifest, model card, results, INTEGRATION.md."""
        v = self._resolve(name, ref)
        dest = Path(dest)
        with tempfile.TemporaryDirectory(prefix="taas-export-") as scratch:
            expert_dir = self.download(name, v.version, Path(scratch) / "expert")
            manifest = load_expert(expert_dir).manifest
            card = self._t.download_run_artifacts(self.tracking, v.run_id, "card", Path(scratch))
            with committed_dir(dest, overwrite=True) as tmp:
                for item in sorted(expert_dir.iterdir()):
                    if item.name != "COMMITTED.json":
                        shutil.copy2(item, tmp / item.name)
                shutil.copy2(card / "README.md", tmp / "README.md")
                hint = str(self.settings.base_model_dir or f"<folder of {manifest.base_model}>")
                atomic_write_text(tmp / "INTEGRATION.md", integration_markdown(manifest, hint))
                atomic_write_json(
                    tmp / "library.json",
                    {"name": name, "version": v.version, "aliases": v.aliases, "tags": v.tags},
                )
        return dest

    def resolve_expert_folder(self, name_or_alias: str) -> Path:
        """``name``, ``name@alias`` or ``name@version`` -> a verified local expert folder (cached
        under ``<home>/library/<name>/<version>``)."""
        name, ref = _split_ref(name_or_alias)
        v = self._resolve(name, ref)
        folder = self.settings.home / "library" / name / v.version
        try:
            if load_expert(folder).manifest.adapter_sha256 == v.tags.get("adapter_sha256"):
                return folder
        except (ValueError, OSError):
            pass  # not cached yet, or torn: download it again below
        return self.download(name, v.version, folder, overwrite=True)


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    if not name:
        raise ValueError(f"name: {ref!r} is empty; use NAME, NAME@ALIAS or NAME@VERSION")
    return name, version or None
