"""The expert library: experts as MLflow registered models, one version per accepted result.

One registered model per expert (named by the manifest's ``expert_id``, e.g. ``expert-legal``);
each version's source is the run artifact folder ``model/``, an MLflow pyfunc model
(:mod:`factory.library.mlflow_model`: the base by reference, the adapter inside), so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve`` answer prompts;
the version's description is its model card. Next to it: ``expert/`` (the committed expert
folder, which downloads read), ``card/README.md`` (model card), ``benchmark/results.json``
(lm-eval) and ``plots/``. Provenance
lives in version tags (:mod:`factory.library.provenance`). A new version gets alias
``challenger``; only the promotion gate (:mod:`factory.library.promotion`) makes one
``champion``, and the champion it replaces is pushed onto the model's ``champion_history`` tag so
:meth:`ExpertLibrary.rollback` can restore it.

Dates are ISO-8601 UTC to the second: ``trained_at`` (version tag, written at registration, the
end of the result's training), ``promoted_at`` (version tag, written each time the version becomes
champion, by promotion or rollback); :attr:`LibraryVersion.created_at` is MLflow's own creation
time of the version. Prices (decimal strings: ``price_per_1k_tokens``, ``weight_fee``,
``maintenance_fee``, ``exclusive_premium``) come from the commission as version tags; the operator
may override them later as registered-model tags with :meth:`ExpertLibrary.set_price`.

Exactly once: the idempotency key is sha256(commission id + adapter sha256), kept as a version
tag; concurrent registrations of one result race for its row in the claim table
(:mod:`factory.library.claims`). Losers wait for the winner's version and return it.

The MLflow client is imported lazily (through :mod:`infra.tracking`) so that the pure
promotion gate and provenance schema import without it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.benchmark import BenchmarkResult
from factory.commission import PRICE_TAGS, price_amount
from factory.customer import OWNER_TAG, check_owner
from factory.expert import load_expert
from factory.hashing import json_sha256
from factory.library.claims import ClaimTable
from factory.library.promotion import GateInputs, PromotionDecision, promotion_gate
from factory.library.provenance import (
    PER_ATTEMPT_TAGS,
    PROVENANCE_TAGS,
    RegistrationProvenance,
    expert_scores,
    iso_from_millis,
    utc_now_iso,
    version_tags,
)
from factory.model_card import integration_markdown, model_card
from infra.atomic import atomic_write_text, exchange_paths
from infra.settings import Settings

CHALLENGER, CHAMPION = "challenger", "champion"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


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


class ExpertLibrary:
    """Registration, promotion, rollback, browsing and export of experts over the registry."""

    def __init__(self, settings: Settings, stale_claim_s: float = 600.0, wait_s: float = 300.0):
        from infra import tracking

        self.settings = settings
        self._t = tracking
        self.tracking = tracking.configure(settings)
        self.wait_s = wait_s
        self._claims = ClaimTable(settings.db_url, stale_s=stale_claim_s)

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
            created_at=iso_from_millis(mv.creation_timestamp),
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

    def register(
        self,
        expert_folder: Path,
        provenance: RegistrationProvenance,
        benchmark: BenchmarkResult | None = None,
        plots: list[Path] | None = None,
        run_id: str | None = None,
    ) -> LibraryVersion:
        """Registers one accepted result exactly once and gives it alias ``challenger``."""
        if not isinstance(provenance, RegistrationProvenance):
            raise TypeError("provenance: pass a factory.library.RegistrationProvenance")
        if benchmark is not None and not isinstance(benchmark, BenchmarkResult):
            raise TypeError("benchmark: pass an evaluation.benchmark.BenchmarkResult or None")
        expert = load_expert(Path(expert_folder))
        manifest = expert.manifest
        prov = provenance
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
            owner = self._claims.claim(key)
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
            self._claims.settle(key, owner, None)
            raise
        self._claims.settle(key, owner, existing.version)
        return existing

    def _create(self, folder, expert, prov, key, benchmark, plots, run_id) -> LibraryVersion:
        from factory.library.mlflow_model import MODEL_ARTIFACT, save_expert_model

        t, manifest = self._t, expert.manifest
        scores, base_scores = expert_scores(benchmark)
        tags = version_tags(manifest, prov, key, scores, t.MAX_TAG_CHARS)
        if base_scores:  # the marketplace charts the base beside the expert
            tags["benchmark_base_scores"] = json.dumps(base_scores, sort_keys=True)[
                : t.MAX_TAG_CHARS
            ]
        t.ensure_registered_model(
            self.tracking,
            manifest.expert_id,
            tags={"domain": manifest.domain, OWNER_TAG: prov.customer_id},
        )
        # After ensure, not before: of two customers racing to create one name, one creates it
        # with its owner tag and the other is refused here.
        owner = t.registered_model_tags(self.tracking, manifest.expert_id).get(OWNER_TAG)
        check_owner(manifest.expert_id, owner, prov.customer_id)
        own_run = run_id is None
        run_id = (
            t.start_run(self.tracking, f"register-{manifest.expert_id}", {"commission_id": key})
            if own_run
            else t.resume_run(self.tracking, run_id)
        )
        with tempfile.TemporaryDirectory(prefix="taas-register-") as staging:
            staging = Path(staging)
            hidden = ("benchmark_scores", "benchmark_base_scores", "idempotency_key")
            shown = {k: v for k, v in tags.items() if k not in hidden}
            card = model_card(manifest, shown, scores, prov.licence, base_scores)
            atomic_write_text(staging / "card" / "README.md", card)
            t.log_artifacts(self.tracking, run_id, Path(folder), "expert")
            t.log_artifacts(self.tracking, run_id, staging / "card", "card")
            # The card travels inside the registered folder too (the Hub's README.md place).
            t.log_artifacts(self.tracking, run_id, staging / "card", "expert")
            if benchmark is not None:
                benchmark.save(staging / "benchmark" / "results.json")
                _reproduction(benchmark, staging / "benchmark", prov.base_model_path
                              or self.settings.base_model_dir)  # fmt: skip
                t.log_artifacts(self.tracking, run_id, staging / "benchmark", "benchmark")
            for plot in plots:
                t.log_artifacts(self.tracking, run_id, plot, "plots")
            save_expert_model(
                staging / MODEL_ARTIFACT,
                Path(folder),
                prov.base_model_path or self.settings.base_model_dir,
                manifest.base_model_sha256,
                {"expert_id": manifest.expert_id, "adapter_sha256": manifest.adapter_sha256},
            )
            t.log_artifacts(self.tracking, run_id, staging / MODEL_ARTIFACT, MODEL_ARTIFACT)
        # Params are immutable in MLflow: a retried registration on the same run logs the same
        # params again (allowed) and puts what differs per attempt into run tags.
        stable = {k: v for k, v in tags.items() if k not in PER_ATTEMPT_TAGS}
        t.log_params(self.tracking, run_id, {f"prov.{k}": v for k, v in stable.items()})
        t.set_run_tags(
            self.tracking, run_id, {f"prov.{k}": tags[k] for k in PER_ATTEMPT_TAGS if k in tags}
        )
        t.log_metrics(
            self.tracking,
            run_id,
            {f"bench.{task}.{m}": v for task, per in scores.items() for m, v in per.items()},
        )
        mv = t.create_version(
            self.tracking, manifest.expert_id, run_id, MODEL_ARTIFACT, tags, description=card
        )
        try:
            self._attest(run_id, Path(folder), manifest, prov, tags, card, str(mv.version))
        except BaseException:
            # Never a version without its attestation: the claim is released and a retry
            # registers (and attests) the result anew.
            t.delete_version(self.tracking, manifest.expert_id, str(mv.version))
            raise
        t.set_alias(self.tracking, manifest.expert_id, CHALLENGER, str(mv.version))
        if own_run:
            t.end_run(self.tracking, run_id)
        return self._version(manifest.expert_id, str(mv.version))

    def _attest(self, run_id, folder, manifest, prov, tags, card, version) -> None:
        """Signs the version's statement, appends it to the transparency log, and stores the
        envelope, key and log excerpt as the run's ``attestation/`` artifact."""
        from factory.attestation import envelope_sha256
        from factory.ledger import Ledger
        from factory.library import attest

        ledger = Ledger(self.settings.db_url)
        statement = attest.statement_for(
            folder, card, manifest, prov, tags, version, ledger.public_key
        )
        key_path = self.settings.factory_key_path
        if self.settings.transparency_url:  # one log for every machine of the team
            from factory.library.provenance import utc_now_iso
            from factory.library.shared_log import attest_shared

            attested = attest_shared(self.settings, statement, utc_now_iso())
        else:
            attested = attest.attest_version(self.settings.home, statement, key_path)
        with tempfile.TemporaryDirectory(prefix="taas-attest-") as staging:
            attest.write_attestation(Path(staging), self.settings.home, attested, key_path)
            self._t.log_artifacts(self.tracking, run_id, Path(staging), attest.ATTESTATION_ARTIFACT)
        digest = envelope_sha256(attested.envelope)
        self._t.set_version_tag(
            self.tracking, manifest.expert_id, version, attest.ATTESTATION_TAG, digest
        )

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
                    # a warm start's library parent, "name@version" ("" from the base)
                    "parent": "@".join(
                        (v.tags.get("parent_expert", ""), v.tags.get("parent_version", ""))
                    ).strip("@"),
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
            want = v.tags.get("adapter_sha256")
            if expert.manifest.adapter_sha256 != want:
                raise ValueError(f"{name}@{v.version}: adapter sha256 differs from its tag")
            # Swapped in, never removed in place: a reader or a concurrent download of the same
            # folder always finds one whole copy there. The old copy ends in the scratch folder
            # and goes with it.
            if dest.exists() and exchange_paths(got, dest):
                return dest
            try:
                os.replace(dest, Path(scratch) / "previous")
            except FileNotFoundError:
                pass
            try:
                os.replace(got, dest)
            except OSError:  # another download put its copy there first: the same version wins
                if load_expert(dest).manifest.adapter_sha256 != want:
                    raise
        return dest

    def export(self, name: str, ref: str | None, dest: Path) -> Path:
        """A weight bundle (:func:`factory.bundle.write_bundle`: only weights, router, manifest,
        model card, INTEGRATION.md, library.json) in a new or empty folder ``dest``."""
        from factory.bundle import write_bundle
        from factory.library.attest import ATTESTATION_ARTIFACT, ATTESTATION_TAG

        v = self._resolve(name, ref)
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ValueError(f"dest: {dest} exists and is not an empty folder; choose a new folder")
        with tempfile.TemporaryDirectory(prefix="taas-export-") as scratch:
            expert_dir = self.download(name, v.version, Path(scratch) / "expert")
            manifest = load_expert(expert_dir).manifest
            card = self._t.download_run_artifacts(self.tracking, v.run_id, "card", Path(scratch))
            hint = str(self.settings.base_model_dir or f"<folder of {manifest.base_model}>")
            meta = {"name": name, "version": v.version, "aliases": v.aliases, "tags": v.tags}
            attested = None  # versions registered before attestations existed carry none
            if ATTESTATION_TAG in v.tags:
                attested = self._t.download_run_artifacts(
                    self.tracking, v.run_id, ATTESTATION_ARTIFACT, Path(scratch)
                )
            lm_eval_dir = _general_reproduction(self._t, self.tracking, v.run_id, Path(scratch),
                                                hint)  # fmt: skip
            write_bundle(dest, expert_dir, card / "README.md",
                         integration_markdown(manifest, hint), meta, attested,
                         lm_eval_dir)  # fmt: skip
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


def _reproduction(benchmark: BenchmarkResult, folder: Path, base: Path | None) -> None:
    """``benchmark/lm_eval/``: the expert's tasks (its held-out task included: this stays in the
    registry), the ``lm_eval`` command, run from there against ``../../expert``, and its
    lm-eval results. Skipped for results saved before runs recorded their task folders."""
    from evaluation.reproduce import write_reproduction

    model = (
        "expert"
        if "expert" in benchmark.table
        else next((n for n in benchmark.table if n != "base"), None)
    )
    if model is None or not benchmark.include_paths:
        return
    write_reproduction(benchmark, model, folder / "lm_eval", str(base or "<base model folder>"),
                       "../../expert")  # fmt: skip


def _general_reproduction(t, tracking, run_id: str, scratch: Path, base: str) -> Path | None:
    """For a bundle: the general tasks' reproduction (never the held-out task), run from the
    bundle's ``lm_eval/`` against ``..``; None for a version registered without one."""
    from evaluation.benchmark import GENERAL_TASKS
    from evaluation.reproduce import TASKS_DIR, write_reproduction

    try:
        got = t.download_run_artifacts(tracking, run_id, "benchmark", scratch / "benchmark")
    except Exception:  # noqa: BLE001 - a version registered without a benchmark has none
        return None
    result = BenchmarkResult.load(got / "results.json")
    tasks = [task for task in result.tasks if task in GENERAL_TASKS]
    model = "expert" if "expert" in result.table else None
    if not tasks or model is None or not (got / "lm_eval" / TASKS_DIR).is_dir():
        return None
    return write_reproduction(result, model, scratch / "lm_eval-general", base, "..", tasks,
                              [got / "lm_eval" / TASKS_DIR])  # fmt: skip


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    if not name:
        raise ValueError(f"name: {ref!r} is empty; use NAME, NAME@ALIAS or NAME@VERSION")
    return name, version or None
