"""Attestations: what the factory vouches for about one registered version, signed and checkable.

A registered version gets an in-toto Statement v1 (``_type``, ``subject``: each attested bundle
file with its sha256, ``predicateType`` :data:`PREDICATE_TYPE`, ``predicate``:
:class:`ExpertPredicate`: base model hash, dataset sha256, spec hash, cycles, Proof-of-Loss
scores with each cycle's held-out batch plan and seed, and every candidate with its
contributor's signed manifest). The statement travels in a DSSE envelope signed with the
factory's Ed25519 key over DSSE's pre-authentication encoding (PAE), so the payload type is
signed too. :mod:`factory.transparency_log` chains each envelope into an append-only log.

:func:`verify_envelope` and :func:`verify_subjects` are what ``taas verify`` runs offline; each
refusal is a :class:`VerificationError` whose ``reason`` is one of :data:`REASONS`.
Pure: no MLflow, prefect or boto3.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.signing import canonical_bytes
from factory.signing import verify as verify_signature
from infra.atomic import sha256_file

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://taas-factory/attestation/expert/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
ATTESTATION_FILE = "attestation.json"
KEY_FILE = "factory-key.pub"
LOG_FILE = "transparency-log.jsonl"
ATTESTATION_FILES = (ATTESTATION_FILE, KEY_FILE, LOG_FILE)

REASONS = (
    "attestation_missing",  # no attestation.json (or no key) in the bundle
    "attestation_malformed",  # not a DSSE envelope holding a statement of ours
    "wrong_key",  # signed by a key other than the trusted one
    "bad_signature",  # the envelope's signature does not verify
    "file_missing",  # an attested file is not in the bundle
    "file_changed",  # a bundle file's sha256 differs from the attested one
    "file_unattested",  # the bundle holds a file the attestation does not cover
    "contributor_signature",  # a candidate's manifest is not signed by its contributor
    "log_malformed",
    "log_chain_broken",  # an entry removed, reordered or changed
    "log_signature",  # an entry not signed by the factory key
    "log_missing_entry",  # the attestation is not in the log
    "log_fork",  # the bundle's log is not a prefix of the published log
)


class VerificationError(ValueError):
    """A refusal: ``reason`` from :data:`REASONS`, the message says which file or entry."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Digest(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Subject(_Model):
    name: str
    digest: Digest


class CandidateEvidence(_Model):
    """One candidate of a cycle: its gate outcome, PoL score and its contributor's signature
    over the manifest (``public_key``: the contributor's key as the ledger holds it; None when
    the factory knows none, and then only the factory vouches for it)."""

    candidate_id: str
    contributor_id: str | None
    accepted: bool
    reason: str | None
    score: float | str  # "inf"/"nan" where not finite, as cycle.json writes them
    adapter_sha256: str | None
    manifest: dict[str, str | int | None] | None
    signature: str | None
    public_key: str | None = None


class CycleEvidence(_Model):
    """One cycle's Proof-of-Loss: the seeded held-out batch plan and every candidate."""

    cycle: int
    pol_seed: int
    pol_batch_size: int
    pol_num_batches: int
    batch_indices: list[list[int]]
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    candidates: list[CandidateEvidence]


class ProvenanceEvidence(_Model):
    """What registration passes in beyond the tags: the spec's hash and each cycle's PoL."""

    spec_sha256: str = ""
    cycles: list[CycleEvidence] = Field(default_factory=list)


class ExpertPredicate(_Model):
    name: str
    version: str
    domain: str
    commission_id: str
    base_model: str
    base_model_sha256: str
    dataset_sha256: str
    spec_sha256: str
    adapter_sha256: str
    parent_adapter_sha256: str
    cycles: int
    pol_scores: dict[str, float]
    wise_ft_alpha: float | None
    contributors: dict[str, str]  # id -> exact decimal share
    cycle_evidence: list[CycleEvidence]
    code_version: str
    registered_at: str


class Statement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type_: str = Field(alias="_type", default=STATEMENT_TYPE)
    subject: list[Subject]
    predicateType: str = PREDICATE_TYPE  # noqa: N815 - the in-toto field name
    predicate: ExpertPredicate


class EnvelopeSignature(_Model):
    keyid: str
    sig: str


class Envelope(_Model):
    payloadType: str  # noqa: N815 - DSSE field names
    payload: str
    signatures: list[EnvelopeSignature] = Field(min_length=1)


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """sha256 of the raw public key, hex: how envelopes and log entries name their key."""
    return hashlib.sha256(public_raw(key)).hexdigest()


def public_key_text(key: Ed25519PublicKey) -> str:
    """The published form of the factory key (``factory-key.pub``): base64 of the raw key."""
    return base64.b64encode(public_raw(key)).decode("ascii") + "\n"


def load_public_key(text: str, source: str) -> Ed25519PublicKey:
    """A key from ``factory-key.pub`` text (base64 raw) or a PEM public key; ValueError naming
    ``source`` otherwise."""
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = serialization.load_pem_public_key(text.encode("ascii"))
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not ed25519")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (ValueError, TypeError, binascii.Error):
        raise ValueError(f"{source}: not an ed25519 public key (base64 raw or PEM)") from None


def subjects_of(folder: Path, names: list[str]) -> list[Subject]:
    """The named files of ``folder`` with their sha256, sorted by name."""
    return [
        Subject(name=n, digest=Digest(sha256=sha256_file(Path(folder) / n))) for n in sorted(names)
    ]


def sign_statement(statement: Statement, key: Ed25519PrivateKey) -> Envelope:
    body = canonical_bytes(statement.model_dump(mode="json", by_alias=True))
    signature = key.sign(pae(PAYLOAD_TYPE, body))
    return Envelope(
        payloadType=PAYLOAD_TYPE,
        payload=base64.b64encode(body).decode("ascii"),
        signatures=[
            EnvelopeSignature(
                keyid=key_id(key.public_key()), sig=base64.b64encode(signature).decode("ascii")
            )
        ],
    )


def envelope_sha256(envelope: Envelope) -> str:
    return hashlib.sha256(canonical_bytes(envelope.model_dump(mode="json"))).hexdigest()


def read_envelope(text: str) -> Envelope:
    try:
        return Envelope.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        raise VerificationError(
            "attestation_malformed", "attestation.json is no DSSE envelope"
        ) from None


def verify_envelope(envelope: Envelope, trusted: Ed25519PublicKey) -> Statement:
    """The statement, once the envelope's signature verifies under ``trusted``."""
    if envelope.payloadType != PAYLOAD_TYPE:
        raise VerificationError("attestation_malformed", f"payloadType {envelope.payloadType!r}")
    wanted = key_id(trusted)
    signature = next((s for s in envelope.signatures if s.keyid == wanted), None)
    if signature is None:
        found = ", ".join(s.keyid[:16] for s in envelope.signatures)
        raise VerificationError(
            "wrong_key", f"attestation signed by key {found}, not the factory key {wanted[:16]}"
        )
    try:
        body = base64.b64decode(envelope.payload, validate=True)
        trusted.verify(base64.b64decode(signature.sig, validate=True), pae(PAYLOAD_TYPE, body))
    except (InvalidSignature, ValueError, binascii.Error):
        raise VerificationError(
            "bad_signature", f"attestation signature does not verify with key {wanted[:16]}"
        ) from None
    try:
        statement = Statement.model_validate(json.loads(body))
    except (ValueError, ValidationError):
        raise VerificationError("attestation_malformed", "payload is not our statement") from None
    if statement.type_ != STATEMENT_TYPE or statement.predicateType != PREDICATE_TYPE:
        raise VerificationError("attestation_malformed", f"predicateType {statement.predicateType}")
    return statement


#: attested files a bundle may leave out (the marketplace's download ships weights only); when
#: present they must match
OPTIONAL_SUBJECTS = frozenset({"README.md"})


def verify_subjects(statement: Statement, bundle: Path, exempt: frozenset[str]) -> None:
    """Every attested file is in ``bundle`` with its sha256 (those of
    :data:`OPTIONAL_SUBJECTS` may be absent), and every other bundle file is in ``exempt``
    (files made at export, or the attestation itself)."""
    bundle = Path(bundle)
    attested = {s.name for s in statement.subject}
    for subject in statement.subject:
        path = bundle / subject.name
        if subject.name in OPTIONAL_SUBJECTS and not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file():
            raise VerificationError("file_missing", f"{subject.name} is attested but missing")
        if sha256_file(path) != subject.digest.sha256:
            raise VerificationError("file_changed", f"{subject.name} differs from its attestation")
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if (path.is_file() or path.is_symlink()) and rel not in attested | exempt:
            raise VerificationError("file_unattested", f"{rel} is not covered by the attestation")


def verify_contributors(statement: Statement) -> int:
    """Checks each candidate's signature where its contributor's key is recorded; the number
    of signatures checked."""
    checked = 0
    for cycle in statement.predicate.cycle_evidence:
        for cand in cycle.candidates:
            if cand.public_key is None:
                continue
            where = f"cycle {cycle.cycle} candidate {cand.candidate_id}"
            if cand.manifest is None or cand.signature is None:
                raise VerificationError("contributor_signature", f"{where}: no signed manifest")
            if not verify_signature(cand.public_key, cand.manifest, cand.signature):
                raise VerificationError("contributor_signature", f"{where}: signature invalid")
            if cand.manifest.get("adapter_sha256") != cand.adapter_sha256:
                raise VerificationError("contributor_signature", f"{where}: adapter differs")
            checked += 1
    return checked
