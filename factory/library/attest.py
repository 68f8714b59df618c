"""A registered version's attestation: its statement, built from what registration records.

:func:`attest_version` makes the in-toto statement of :mod:`factory.attestation` for one
version (subjects: the expert folder's deliverable files and the model card, exactly the bytes
a bundle ships), signs it with the factory key and appends it to the home's transparency log
(:mod:`factory.transparency_log`; in team mode the team's, :mod:`factory.library.shared_log`).
:func:`write_attestation` writes the three files that travel with the version (the envelope,
the factory's public key, the log up to this entry), which the registry stores as the run's
``attestation/`` artifact and a bundle carries.
Pure: no MLflow, prefect or boto3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from factory.attestation import (
    ATTESTATION_FILE,
    KEY_FILE,
    LOG_FILE,
    Digest,
    ExpertPredicate,
    Statement,
    Subject,
    public_key_text,
    subjects_of,
)
from factory.bundle import CARD_FILE, bundle_members
from factory.expert import ExpertManifest
from factory.library.provenance import RegistrationProvenance, utc_now_iso
from factory.transparency_log import Attested, attest, factory_public_key
from infra.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

#: version tag naming the sha256 of the version's envelope
ATTESTATION_TAG = "attestation_sha256"
ATTESTATION_ARTIFACT = "attestation"


def statement_for(
    expert_folder: Path,
    card: str,
    manifest: ExpertManifest,
    prov: RegistrationProvenance,
    tags: dict[str, str],
    version: str,
    public_key_of: Callable[[str], str | None] = lambda _: None,
) -> Statement:
    """The statement of one version: ``tags`` are the version tags registration wrote;
    ``public_key_of`` gives a contributor's registered key (the ledger's), so a buyer can check
    each candidate's signature."""
    subjects = subjects_of(expert_folder, bundle_members(expert_folder))
    card_digest = hashlib.sha256(card.encode("utf-8")).hexdigest()
    subjects.append(Subject(name=CARD_FILE, digest=Digest(sha256=card_digest)))
    evidence = prov.evidence
    cycles = [
        cycle.model_copy(
            update={
                "candidates": [
                    c
                    if c.public_key or not c.contributor_id or c.signature is None
                    else c.model_copy(update={"public_key": public_key_of(c.contributor_id)})
                    for c in cycle.candidates
                ]
            }
        )
        for cycle in evidence.cycles
    ]
    predicate = ExpertPredicate(
        name=manifest.expert_id,
        version=version,
        domain=manifest.domain,
        commission_id=prov.commission_id,
        base_model=manifest.base_model,
        base_model_sha256=manifest.base_model_sha256,
        dataset_sha256=prov.dataset_sha256,
        spec_sha256=evidence.spec_sha256,
        adapter_sha256=manifest.adapter_sha256,
        parent_adapter_sha256=prov.parent_adapter_sha256,
        cycles=prov.cycles,
        pol_scores=prov.pol_scores,
        wise_ft_alpha=prov.wise_ft_alpha,
        contributors=prov.contributors,
        cycle_evidence=cycles,
        code_version=tags.get("code_version", ""),
        registered_at=tags.get("trained_at", ""),
    )
    return Statement(subject=sorted(subjects, key=lambda s: s.name), predicate=predicate)


def attest_version(home: Path, statement: Statement, key_path: Path | None = None) -> Attested:
    """Onto the home's own log; :func:`factory.library.shared_log.attest_shared` is the
    team's."""
    return attest(Path(home), statement, utc_now_iso(), key_path)


def write_attestation(
    folder: Path, home: Path, attested: Attested, key_path: Path | None = None
) -> Path:
    """The envelope, the factory's public key and the log excerpt in ``folder``."""
    folder = Path(folder)
    public = factory_public_key(Path(home), key_path)
    atomic_write_json(folder / ATTESTATION_FILE, attested.envelope.model_dump(mode="json"))
    atomic_write_text(folder / KEY_FILE, public_key_text(public))
    atomic_write_bytes(folder / LOG_FILE, attested.log_excerpt)
    return folder


def signed_manifests(roots: list[Path]) -> dict[tuple[str, str], tuple[dict, str]]:
    """Every candidate manifest and signature under ``roots`` (a cycle's line and inbox
    folders), keyed by (candidate id, adapter sha256); unreadable ones are left out (the gate
    rejected them, and the statement then records them without a signature)."""
    import json

    from factory.candidate import MANIFEST_FILE, SIGNATURE_FILE

    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob(MANIFEST_FILE)) if Path(root).is_dir() else []:
            try:
                manifest = json.loads(path.read_text())
                signature = (path.parent / SIGNATURE_FILE).read_text().strip()
                key = (str(manifest["candidate_id"]), str(manifest["adapter_sha256"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a readable candidate: nothing to vouch for
            found.setdefault(key, (manifest, signature))
    return found
