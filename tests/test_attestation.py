"""Provenance a buyer can verify: ``taas verify`` on bundles exported from a real library.

A version registered with a SQLite MLflow store gets a DSSE-signed in-toto statement (the
bundle's file hashes, base and dataset hashes, PoL seeds, contributors' signed candidates)
chained into the home's transparency log; the exported bundle carries it. Each tampering is
refused with its own reason: a changed adapter byte, a removed or reordered log entry, an
attestation re-signed by another key, an added file, a forked log.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_expert

from cli.main import main
from factory.attestation import (
    ATTESTATION_FILE,
    ATTESTATION_FILES,
    KEY_FILE,
    LOG_FILE,
    CandidateEvidence,
    CycleEvidence,
    Envelope,
    ProvenanceEvidence,
    Statement,
    public_key_text,
    sign_statement,
)
from factory.candidate import CandidateManifest
from factory.ledger import Ledger
from factory.library import ExpertLibrary
from factory.library.attest import ATTESTATION_TAG, signed_manifests
from factory.library.provenance import RegistrationProvenance
from factory.signing import generate_key, load_or_create_key, public_key_b64, sign
from factory.transparency_log import factory_key_path, log_path
from infra.atomic import atomic_write_json
from infra.settings import Settings


def signed_candidate(folder: Path, ledger: Ledger, adapter_sha256: str) -> None:
    """A line's candidate manifest and signature as the training worker writes them, its key
    registered in the ledger as the factory does for its lines."""
    key = load_or_create_key(folder.parent / "line-0.pem")
    ledger.register_contributor("line-0", public_key_b64(key), kind="line")
    manifest = CandidateManifest(
        candidate_id="expert-legal-c1-line-0", expert_id="expert-legal", cycle=1,
        contributor_id="line-0", base_model_sha256="b" * 64, parent_adapter_sha256=None,
        adapter_sha256=adapter_sha256, data_shard="0/2", seed=1003, steps=8, tokens_seen=512,
        created_at="2026-12-01T00:00:00+00:00",
    ).model_dump(mode="json")  # fmt: skip
    atomic_write_json(folder / "candidate.json", manifest)
    (folder / "candidate.sig").write_text(sign(key, manifest))


def provenance(commission: str, evidence: ProvenanceEvidence) -> RegistrationProvenance:
    return RegistrationProvenance(
        commission_id=commission, dataset_sha256="d" * 64, config_hash="c" * 64,
        pol_scores={"cycle-1/line-0": 0.125}, wise_ft_alpha=0.5, cycles=1,
        contributors={"line-0": "1"}, visibility="public", evidence=evidence,
    )  # fmt: skip


@pytest.fixture(scope="module")
def registered(tiny_base, tiny_expert_folder, tmp_path_factory):
    """Two versions of expert-legal registered in one home, both exported."""
    root = tmp_path_factory.mktemp("attested")
    settings = Settings(home=root / "home")
    library = ExpertLibrary(settings)
    from factory.expert import load_expert

    adapter_sha = load_expert(tiny_expert_folder).manifest.adapter_sha256
    line_dir = root / "cycle-1.lines" / "line-0" / "candidate"
    line_dir.mkdir(parents=True)
    signed_candidate(line_dir, Ledger(settings.db_url), adapter_sha)
    manifest, signature = signed_manifests([root / "cycle-1.lines"])[
        ("expert-legal-c1-line-0", adapter_sha)
    ]
    evidence = ProvenanceEvidence(
        spec_sha256="5" * 64,
        cycles=[
            CycleEvidence(
                cycle=1, pol_seed=3001, pol_batch_size=8, pol_num_batches=6,
                batch_indices=[[0, 1], [2, 3]], heldout_loss_before=4.5, heldout_loss_after=4.25,
                candidates=[CandidateEvidence(
                    candidate_id="expert-legal-c1-line-0", contributor_id="line-0",
                    accepted=True, reason=None, score=0.125, adapter_sha256=adapter_sha,
                    manifest=manifest, signature=signature,
                )],
            )
        ],
    )  # fmt: skip
    v1 = library.register(tiny_expert_folder, provenance("com-1", evidence))
    second = build_tiny_expert(tiny_base, root / "second" / "expert-legal", seed=1)
    v2 = library.register(second, provenance("com-2", ProvenanceEvidence()))
    return {
        "settings": settings,
        "versions": (v1, v2),
        "bundle1": library.export("expert-legal", "1", root / "bundle1"),
        "bundle2": library.export("expert-legal", "2", root / "bundle2"),
    }


def verify(capsys, *args: str) -> tuple[int, str]:
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    # The verdict is the last line of its stream (a library may log to stderr before it).
    lines = (captured.out if code == 0 else captured.err).strip().splitlines()
    return code, lines[-1] if lines else ""


def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_fresh_bundle_verifies_against_bundle_and_published_log(registered, capsys):
    home = registered["settings"].home
    v1, v2 = registered["versions"]
    assert ATTESTATION_TAG in v1.tags and ATTESTATION_TAG in v2.tags
    bundle = registered["bundle1"]
    assert set(ATTESTATION_FILES) <= {p.name for p in bundle.iterdir()}
    code, line = verify(capsys, bundle)
    assert code == 0, line
    assert line.startswith("verified expert-legal@1: 5 files, 1 contributor signatures")
    assert "entry 0 of 1" in line
    # The published log (2 entries) extends the bundle's excerpt; the pinned key is the home's.
    pub = home.parent / "factory.pub"
    pub.write_text(public_key_text(load_or_create_key(factory_key_path(home)).public_key()))
    code, line = verify(capsys, bundle, "--log", log_path(home), "--key", pub)
    assert code == 0 and "entry 0 of 2" in line and "(given key)" in line
    code, line = verify(capsys, registered["bundle2"], "--log", log_path(home), "--key", pub)
    assert code == 0 and line.startswith("verified expert-legal@2: 5 files, 0 contributor")


def test_statement_carries_registration_evidence(registered):
    envelope = Envelope.model_validate_json((registered["bundle1"] / ATTESTATION_FILE).read_text())
    statement = Statement.model_validate(json.loads(base64.b64decode(envelope.payload)))
    p = statement.predicate
    assert (p.name, p.version, p.commission_id, p.cycles) == ("expert-legal", "1", "com-1", 1)
    assert p.dataset_sha256 == "d" * 64 and p.spec_sha256 == "5" * 64
    assert p.pol_scores == {"cycle-1/line-0": 0.125}
    cycle = p.cycle_evidence[0]
    assert (cycle.pol_seed, cycle.batch_indices) == (3001, [[0, 1], [2, 3]])
    candidate = cycle.candidates[0]
    ledger = Ledger(registered["settings"].db_url)
    assert candidate.public_key == ledger.public_key("line-0")  # filled in from the ledger
    names = [s.name for s in statement.subject]
    assert names == sorted(names) and "adapter_model.safetensors" in names
    assert "README.md" in names and "library.json" not in names


def test_changed_adapter_byte_is_refused(registered, tmp_path, capsys):
    bundle = copy(registered["bundle1"], tmp_path)
    adapter = bundle / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x01
    adapter.write_bytes(bytes(data))
    code, line = verify(capsys, bundle)
    assert code == 1
    assert line == (
        "taas verify: refused: file_changed: adapter_model.safetensors differs from its attestation"
    )


def test_added_or_missing_file_is_refused(registered, tmp_path, capsys):
    bundle = copy(registered["bundle1"], tmp_path)
    (bundle / "replay.jsonl").write_text('{"text": "customer text"}\n')
    assert verify(capsys, bundle) == (
        1, "taas verify: refused: file_unattested: replay.jsonl is not covered by the attestation"
    )  # fmt: skip
    (bundle / "replay.jsonl").unlink()
    (bundle / "router.safetensors").unlink()
    code, line = verify(capsys, bundle)
    assert code == 1 and "file_missing: router.safetensors" in line


def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_removed_or_reordered_log_entry_is_refused(registered, tmp_path, capsys):
    home = registered["settings"].home
    published = _log_lines(log_path(home))
    assert len(published) == 2
    bundle = copy(registered["bundle2"], tmp_path)
    log = bundle / LOG_FILE
    log.write_text(published[1])  # entry 0 removed
    code, line = verify(capsys, bundle)
    assert code == 1 and "log_chain_broken: transparency-log.jsonl: entry 0 (seq 1)" in line
    log.write_text(published[1] + published[0])  # reordered
    code, line = verify(capsys, bundle)
    assert code == 1 and "log_chain_broken" in line
    log.write_text(published[0])  # its own entry removed
    code, line = verify(capsys, bundle)
    assert code == 1 and line.endswith("log_missing_entry: transparency-log.jsonl holds no entry "
                                       "for this attestation")  # fmt: skip
    # The same against a published log with an entry removed or moved.
    log.write_text("".join(published))
    given = tmp_path / "published.jsonl"
    given.write_text(published[1])
    code, line = verify(capsys, bundle, "--log", given)
    assert code == 1 and f"log_chain_broken: {given}: entry 0" in line
    given.write_text(published[1] + published[0])
    assert verify(capsys, bundle, "--log", given)[0] == 1


def test_attestation_resigned_by_another_key_is_refused(registered, tmp_path, capsys):
    bundle = copy(registered["bundle1"], tmp_path)
    envelope = Envelope.model_validate_json((bundle / ATTESTATION_FILE).read_text())
    statement = Statement.model_validate(json.loads(base64.b64decode(envelope.payload)))
    other = generate_key()
    forged = sign_statement(statement, other)
    (bundle / ATTESTATION_FILE).write_text(forged.model_dump_json())
    code, line = verify(capsys, bundle)
    assert code == 1 and "wrong_key: attestation signed by key" in line
    # Swapping in the forger's public key too: the log's entries are still the factory's.
    original_key = (bundle / KEY_FILE).read_text()
    (bundle / KEY_FILE).write_text(public_key_text(other.public_key()))
    code, line = verify(capsys, bundle)
    assert code == 1 and "log_signature: transparency-log.jsonl: entry 0 is not signed" in line
    # A buyer who pinned the factory's key refuses the forged envelope outright.
    pinned = tmp_path / "factory.pub"
    pinned.write_text(original_key)
    code, line = verify(capsys, bundle, "--key", pinned)
    assert code == 1 and "wrong_key" in line
    # Same key id, another signature: the signature itself fails.
    (bundle / KEY_FILE).write_text(original_key)
    swapped = envelope.signatures[0].model_copy(update={"sig": forged.signatures[0].sig})
    bad = envelope.model_copy(update={"signatures": [swapped]})
    (bundle / ATTESTATION_FILE).write_text(bad.model_dump_json())
    code, line = verify(capsys, bundle)
    assert code == 1 and "bad_signature" in line


def test_forged_contributor_signature_is_refused(registered, tmp_path, capsys):
    """A factory that vouches for a candidate its contributor never signed is caught: the
    statement records the contributor's registered key beside the manifest."""
    from factory.library.attest import attest_version, write_attestation

    bundle = copy(registered["bundle1"], tmp_path)
    envelope = Envelope.model_validate_json((bundle / ATTESTATION_FILE).read_text())
    statement = Statement.model_validate(json.loads(base64.b64decode(envelope.payload)))
    cycle = statement.predicate.cycle_evidence[0]
    candidate = cycle.candidates[0]
    changed = {**candidate.manifest, "tokens_seen": 10**9}
    forged = statement.model_copy(update={"predicate": statement.predicate.model_copy(update={
        "cycle_evidence": [cycle.model_copy(update={
            "candidates": [candidate.model_copy(update={"manifest": changed})]})]})})  # fmt: skip
    home = tmp_path / "home"
    shutil.copytree(registered["settings"].home / "keys", home / "keys")
    for name in ATTESTATION_FILES:
        (bundle / name).unlink()
    write_attestation(bundle, home, attest_version(home, forged))
    code, line = verify(capsys, bundle)
    assert code == 1
    assert line.endswith("contributor_signature: cycle 1 candidate expert-legal-c1-line-0: "
                         "signature invalid")  # fmt: skip


def test_forked_log_is_refused(registered, tmp_path, capsys):
    """The factory showing one buyer a log and publishing another (same key) is caught."""
    from factory.library.attest import attest_version

    home = registered["settings"].home
    fork = tmp_path / "fork"
    shutil.copytree(home / "keys", fork / "keys")
    (fork / "transparency").mkdir()
    first = _log_lines(log_path(home))[0]
    (fork / "transparency" / "log.jsonl").write_text(first)
    envelope = Envelope.model_validate_json((registered["bundle2"] / ATTESTATION_FILE).read_text())
    statement = Statement.model_validate(json.loads(base64.b64decode(envelope.payload)))
    other = statement.model_copy(update={"predicate": statement.predicate.model_copy(
        update={"commission_id": "com-other"})})  # fmt: skip
    attest_version(fork, other)  # entry 1 of the fork differs from entry 1 of the home's log
    code, line = verify(capsys, registered["bundle2"], "--log", log_path(fork))
    assert code == 1 and line.endswith("log_fork: the bundle's log excerpt is not a prefix of "
                                       "the given log")  # fmt: skip


def test_tarball_and_bad_arguments(registered, tmp_path, capsys):
    import tarfile

    archive = tmp_path / "expert-legal-1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(registered["bundle1"], arcname="expert-legal-1")
    code, line = verify(capsys, archive)
    assert code == 0 and line.startswith("verified expert-legal@1")
    assert verify(capsys, tmp_path / "missing") == (
        2, f"taas: error: BUNDLE: no such file or folder {tmp_path / 'missing'}"
    )  # fmt: skip
    bare = tmp_path / "bare"
    shutil.copytree(registered["bundle1"], bare)
    (bare / ATTESTATION_FILE).unlink()
    code, line = verify(capsys, bare)
    assert code == 1 and f"attestation_missing: {bare}: no attestation.json" in line
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    assert verify(capsys, registered["bundle1"], "--key", bad_key) == (
        2, f"taas: error: {bad_key}: not an ed25519 public key (base64 raw or PEM)"
    )  # fmt: skip


def test_marketplace_publishes_log_key_attestation_and_ships_it(registered, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from factory.transparency_log import published_key_path
    from marketplace.app import create_app
    from marketplace.catalog import library_catalog
    from marketplace.licensing import Licensing
    from marketplace.market import Market, MarketplaceConfig

    settings = registered["settings"]
    home = settings.home
    catalog = library_catalog(settings)
    config = MarketplaceConfig(
        secret="s" * 32, base_model_path=home, transparency_dir=home / "transparency"
    )
    market = Market(config, catalog, Licensing(Ledger(settings.db_url)))
    with TestClient(create_app(market)) as client:
        log = client.get("/transparency-log")
        assert log.status_code == 200 and log.content == log_path(home).read_bytes()
        assert len(log.content.splitlines()) == 2
        assert b"expert-legal" not in log.content  # entries name versions only by hash
        key = client.get("/transparency-log/key")
        assert key.text == published_key_path(home).read_text()
        assert key.text == (registered["bundle1"] / KEY_FILE).read_text()
        page = client.get("/experts/expert-legal").text
        assert 'href="/experts/expert-legal/attestation"' in page
        assert 'href="/transparency-log"' in page
        champion = client.get("/experts/expert-legal/attestation")  # no champion: the latest
        assert champion.content == (registered["bundle2"] / ATTESTATION_FILE).read_bytes()
        first = client.get("/experts/expert-legal/attestation", params={"version": "1"})
        assert first.content == (registered["bundle1"] / ATTESTATION_FILE).read_bytes()
        missing = client.get("/experts/expert-legal/attestation", params={"version": "9"})
        assert missing.status_code == 404
        assert client.get("/experts/expert-nope/attestation").status_code == 404
        (tmp_path / "published.jsonl").write_bytes(log.content)
        (tmp_path / "factory.pub").write_text(key.text)
    # The marketplace's weight download (weights only, no card) carries the attestation too.
    data, _ = market.bundle(catalog.get("expert-legal"), "1")
    archive = tmp_path / "expert-legal-1.tar.gz"
    archive.write_bytes(data)
    code, line = verify(
        capsys, archive, "--log", tmp_path / "published.jsonl", "--key", tmp_path / "factory.pub"
    )
    assert code == 0 and line.startswith("verified expert-legal@1: 5 files") and "of 2" in line
    bare = Market(config.model_copy(update={"transparency_dir": None}), catalog, market.licensing)
    archive.write_bytes(bare.bundle(catalog.get("expert-legal"), "1")[0])
    code, line = verify(capsys, archive)
    assert code == 1 and "attestation_missing" in line


@pytest.mark.slow  # the whole commission flow on the tiny base (shared with test_commission_flow)
def test_version_registered_by_the_commission_flow_verifies(tiny_commission, tmp_path, capsys):
    """What goes in comes from the real path: provenance_for reads each cycle's PoL plan and
    its lines' signed candidates; registration fills in their ledger keys."""
    from tasks.cycle_commit import read_cycle_result

    settings, summary = tiny_commission["settings"], tiny_commission["summary"]
    name, version = summary["registered"]["name"], summary["registered"]["version"]
    bundle = ExpertLibrary(settings).export(name, version, tmp_path / "bundle")
    code, line = verify(capsys, bundle, "--log", log_path(settings.home))
    assert code == 0, line
    assert line.startswith(f"verified {name}@{version}: 6 files, 2 contributor signatures")
    envelope = Envelope.model_validate_json((bundle / ATTESTATION_FILE).read_text())
    p = Statement.model_validate(json.loads(base64.b64decode(envelope.payload))).predicate
    assert (p.commission_id, p.cycles) == (summary["commission_id"], 1)
    assert len(p.spec_sha256) == 64 and len(p.dataset_sha256) == 64
    root = settings.home / "commissions" / summary["commission_id"] / "cycles"
    recorded = read_cycle_result(root / "cycle-1")
    (cycle,) = p.cycle_evidence
    assert cycle.pol_seed == recorded.pol_plan.seed
    assert cycle.batch_indices == recorded.merge.batch_indices and cycle.batch_indices
    ledger = Ledger(settings.db_url)
    assert {c.contributor_id for c in cycle.candidates} == {"line-0", "line-1"}
    for candidate in cycle.candidates:
        assert candidate.public_key == ledger.public_key(candidate.contributor_id)
        assert candidate.manifest["commission_id"] in ("", summary["commission_id"])
        assert candidate.manifest["adapter_sha256"] == candidate.adapter_sha256
    assert p.pol_scores == pytest.approx(
        {f"cycle-1/{k}": v for k, v in summary["pol"]["cycle-1"].items()}
    )


def test_broken_log_refuses_registration_and_leaves_no_version(tiny_expert_folder, tmp_path):
    """The factory chains onto its own log only when that log is intact, and a version whose
    attestation failed is removed, so a retry registers and attests it anew."""
    settings = Settings(home=tmp_path / "home")
    library = ExpertLibrary(settings)
    log = log_path(settings.home)
    log.parent.mkdir(parents=True)
    log.write_text("not an entry\n")
    with pytest.raises(ValueError, match=f"log_malformed: {log} line 1"):
        library.register(tiny_expert_folder, provenance("com-1", ProvenanceEvidence()))
    assert library.lineage("expert-legal") == []
    log.unlink()
    again = library.register(tiny_expert_folder, provenance("com-1", ProvenanceEvidence()))
    assert ATTESTATION_TAG in again.tags
    assert [row["version"] for row in library.lineage("expert-legal")] == [again.version]
    assert len(log.read_text().splitlines()) == 1
