"""The factory's transparency log: an append-only, hash-chained JSONL of every attestation.

Entry ``seq`` (0, 1, ...) carries ``prev_sha256``, the sha256 of the previous entry's canonical
JSON (:data:`GENESIS` for the first), the attested envelope's sha256, the sha256 of the version
it is about (``name@version``) and the factory key's signature over the entry without its
``sig``. Removing, reordering or
changing an entry breaks the chain from there on; rewriting the chain needs the factory key.
A bundle carries the log up to its own entry; the full log is published with the library
(``<home>/transparency/log.jsonl``, served at ``/transparency-log``), and a buyer's copy of an
older bundle's excerpt must be a prefix of it (a forked log is refused).

Appends hold an exclusive lock (``log.lock``) and rewrite the file atomically (temp, fsync,
rename), so readers never see half an entry. The factory key is created under the same lock,
so two first registrations cannot make two keys. Each append also keeps, under
``<home>/transparency/``, the public key (``factory-key.pub``) and the version's three
attestation files (``versions/<name>/<version>/``), which the marketplace links and ships.
Pure file I/O: no MLflow, prefect or boto3.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.attestation import (
    ATTESTATION_FILE,
    KEY_FILE,
    LOG_FILE,
    Envelope,
    Statement,
    VerificationError,
    envelope_sha256,
    key_id,
    public_key_text,
    sign_statement,
)
from factory.signing import canonical_bytes, load_or_create_key
from infra.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    committed_dir,
    file_lock,
)

GENESIS = "0" * 64


class LogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0)
    prev_sha256: str
    envelope_sha256: str
    # sha256 of "name@version": the published log names no expert (an exclusive one's name is
    # not public), yet a bundle's statement ties itself to its entry.
    subject_sha256: str
    logged_at: str
    keyid: str
    sig: str = ""

    def body(self) -> dict:
        return self.model_dump(mode="json", exclude={"sig"})


def factory_key_path(home: Path) -> Path:
    """The factory's attestation key, beside the lines' keys (a folder, so no contributor id
    can name the same file)."""
    return Path(home) / "keys" / "factory" / "attestation.pem"


def log_path(home: Path) -> Path:
    return Path(home) / "transparency" / "log.jsonl"


def published_key_path(home: Path) -> Path:
    """The factory's public key beside the log, as the marketplace publishes it."""
    return Path(home) / "transparency" / KEY_FILE


def version_attestation_dir(home: Path, name: str, version: str) -> Path:
    """A version's three attestation files (:data:`ATTESTATION_FILES`), kept beside the log so
    the marketplace can link and ship them without the registry."""
    return Path(home) / "transparency" / "versions" / name / version


def subject_sha256(name: str, version: str) -> str:
    return hashlib.sha256(f"{name}@{version}".encode()).hexdigest()


def entry_sha256(entry: LogEntry) -> str:
    return hashlib.sha256(canonical_bytes(entry.model_dump(mode="json"))).hexdigest()


def entry_line(entry: LogEntry) -> bytes:
    return canonical_bytes(entry.model_dump(mode="json")) + b"\n"


def parse_log(data: bytes, source: str) -> list[LogEntry]:
    entries = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(LogEntry.model_validate(json.loads(line)))
        except (ValueError, ValidationError):
            raise VerificationError("log_malformed", f"{source} line {number}") from None
    return entries


def verify_chain(entries: list[LogEntry], trusted: Ed25519PublicKey, source: str) -> None:
    """Each entry's number, link to its predecessor and factory signature."""
    prev, wanted = GENESIS, key_id(trusted)
    for position, entry in enumerate(entries):
        if entry.seq != position or entry.prev_sha256 != prev:
            raise VerificationError(
                "log_chain_broken",
                f"{source}: entry {position} (seq {entry.seq}) does not follow entry "
                f"{position - 1}; an entry was removed, reordered or changed",
            )
        try:
            if entry.keyid != wanted:
                raise InvalidSignature
            sig = base64.b64decode(entry.sig, validate=True)
            trusted.verify(sig, canonical_bytes(entry.body()))
        except (InvalidSignature, ValueError, binascii.Error):
            raise VerificationError(
                "log_signature", f"{source}: entry {position} is not signed by the factory key"
            ) from None
        prev = entry_sha256(entry)


def find_entry(entries: list[LogEntry], envelope: Envelope, source: str) -> LogEntry:
    digest = envelope_sha256(envelope)
    for entry in entries:
        if entry.envelope_sha256 == digest:
            return entry
    raise VerificationError("log_missing_entry", f"{source} holds no entry for this attestation")


def check_prefix(excerpt: list[LogEntry], published: list[LogEntry]) -> None:
    """The bundle's log must be where the published log started: same entries, same order."""
    if len(excerpt) > len(published) or any(
        entry_sha256(a) != entry_sha256(b) for a, b in zip(excerpt, published, strict=False)
    ):
        raise VerificationError(
            "log_fork", "the bundle's log excerpt is not a prefix of the given log"
        )


def _locked(home: Path):
    return file_lock(log_path(home).with_suffix(".lock"))


def factory_public_key(home: Path, key_path: Path | None = None) -> Ed25519PublicKey:
    """The factory's public key (created with the private key on first use); ``key_path``
    replaces the home's key (``Settings.factory_key_path``)."""
    with _locked(home):
        return load_or_create_key(key_path or factory_key_path(home)).public_key()


class Attested(BaseModel):
    """A signed statement and its place in the log: what goes beside a version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    envelope: Envelope
    entry: LogEntry
    log_excerpt: bytes  # the log up to and including ``entry``, as stored


def attest(
    home: Path, statement: Statement, logged_at: str, key_path: Path | None = None
) -> Attested:
    """Signs ``statement`` with the factory key (``key_path``, else the home's) and appends it
    to the home's log."""
    path = log_path(home)
    with _locked(home):
        key: Ed25519PrivateKey = load_or_create_key(key_path or factory_key_path(home))
        envelope = sign_statement(statement, key)
        data = path.read_bytes() if path.exists() else b""
        entries = parse_log(data, str(path))
        # The factory's own log must be intact before anything is chained onto it.
        verify_chain(entries, key.public_key(), str(path))
        predicate = statement.predicate
        entry = LogEntry(
            seq=len(entries),
            prev_sha256=entry_sha256(entries[-1]) if entries else GENESIS,
            envelope_sha256=envelope_sha256(envelope),
            subject_sha256=subject_sha256(predicate.name, predicate.version),
            logged_at=logged_at,
            keyid=key_id(key.public_key()),
        )
        sig = base64.b64encode(key.sign(canonical_bytes(entry.body()))).decode("ascii")
        entry = entry.model_copy(update={"sig": sig})
        excerpt = b"".join(entry_line(e) for e in [*entries, entry])
        atomic_write_bytes(path, excerpt)
        public = public_key_text(key.public_key())
        atomic_write_text(published_key_path(home), public)
        with committed_dir(
            version_attestation_dir(home, predicate.name, predicate.version), overwrite=True
        ) as tmp:
            atomic_write_json(tmp / ATTESTATION_FILE, envelope.model_dump(mode="json"))
            atomic_write_text(tmp / KEY_FILE, public)
            atomic_write_bytes(tmp / LOG_FILE, excerpt)
    return Attested(envelope=envelope, entry=entry, log_excerpt=excerpt)


class Verified(BaseModel):
    """What ``taas verify`` established about a bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str  # name@version
    files: int
    contributor_signatures: int
    log_seq: int
    log_entries: int
    keyid: str


def verify_bundle(
    bundle: Path,
    log: Path | None = None,
    key: Path | None = None,
    exempt: frozenset[str] = frozenset(),
) -> Verified:
    """Checks a bundle folder offline: the envelope's signature under the trusted key (``key``,
    else the bundle's own ``factory-key.pub``), every file against the statement, the
    contributors' signatures, and the chain of the log (``log``, else the bundle's excerpt)
    holding this attestation. Raises :class:`VerificationError` with the first refusal."""
    from factory.attestation import (
        ATTESTATION_FILES,
        load_public_key,
        read_envelope,
        verify_contributors,
        verify_envelope,
        verify_subjects,
    )

    bundle = Path(bundle)
    for name in (ATTESTATION_FILE, KEY_FILE, LOG_FILE):
        if not (bundle / name).is_file():
            raise VerificationError("attestation_missing", f"{bundle}: no {name}")
    bundled_key = load_public_key((bundle / KEY_FILE).read_text(), str(bundle / KEY_FILE))
    trusted = load_public_key(Path(key).read_text(), str(key)) if key else bundled_key
    envelope = read_envelope((bundle / ATTESTATION_FILE).read_text())
    statement = verify_envelope(envelope, trusted)
    verify_subjects(statement, bundle, exempt | set(ATTESTATION_FILES))
    signatures = verify_contributors(statement)
    excerpt = parse_log((bundle / LOG_FILE).read_bytes(), LOG_FILE)
    verify_chain(excerpt, trusted, LOG_FILE)
    entries, source = excerpt, LOG_FILE
    if log is not None:
        source = str(log)
        entries = parse_log(Path(log).read_bytes(), source)
        verify_chain(entries, trusted, source)
        check_prefix(excerpt, entries)
    entry = find_entry(entries, envelope, source)
    predicate = statement.predicate
    if entry.subject_sha256 != subject_sha256(predicate.name, predicate.version):
        raise VerificationError(
            "log_missing_entry", f"{source}: entry {entry.seq} names another version"
        )
    return Verified(
        subject=f"{predicate.name}@{predicate.version}",
        files=len(statement.subject),
        contributor_signatures=signatures,
        log_seq=entry.seq,
        log_entries=len(entries),
        keyid=key_id(trusted),
    )
