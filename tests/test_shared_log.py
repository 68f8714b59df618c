"""The team's transparency log (factory.library.shared_log): several machines, one chain.

Two "machines" (homes of their own, the same factory key file) append from two processes at
once onto one log in moto's S3 under a PostgreSQL advisory lock: every entry lands, in one
unbroken chain, and a bundle carrying any of them verifies against the published log. A
machine with another key is refused before it signs; a marketplace's mirror serves the shared
log and keeps its last good copy when the shared one stops verifying.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import shutil
from pathlib import Path

import pytest

from factory.attestation import ATTESTATION_FILE, ATTESTATION_FILES, Envelope, Statement
from factory.signing import load_or_create_key
from factory.transparency_log import log_path, parse_log, subject_sha256
from factory.transparency_log import verify_chain as chain_ok
from infra.settings import Settings
from tests.test_attestation import registered, verify  # noqa: F401  (registered: a fixture)

BUCKET = "taas-transparency"
PER_MACHINE = 6


def _statement(bundle: Path, version: str) -> Statement:
    envelope = Envelope.model_validate_json((bundle / ATTESTATION_FILE).read_text())
    statement = Statement.model_validate(json.loads(base64.b64decode(envelope.payload)))
    return statement.model_copy(
        update={"predicate": statement.predicate.model_copy(update={"version": version})}
    )


def _machine(settings_json: str, bundle: str, versions: list[str], start) -> None:
    """One machine's registrations, appended one after another (a spawned process), from when
    both machines are ready, so that their appends overlap."""
    from factory.library.shared_log import attest_shared

    settings = Settings.model_validate_json(settings_json)
    statements = [_statement(Path(bundle), version) for version in versions]
    start.wait(timeout=120)
    for statement in statements:
        attest_shared(settings, statement, "2026-12-02T00:00:00+00:00")


@pytest.fixture
def team(s3_endpoint, postgres_url, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET
    )
    key = tmp_path / "secrets" / "factory.pem"
    load_or_create_key(key)

    def machine(name: str, key_path: Path = key) -> Settings:
        return Settings(
            home=tmp_path / name, database_url=postgres_url, s3_endpoint_url=s3_endpoint,
            transparency_url=f"s3://{BUCKET}/{tmp_path.name}", factory_key_path=key_path,
        )  # fmt: skip

    return machine


def _shared(settings: Settings):
    from infra.storage import open_store

    return open_store(settings.transparency_url, settings.s3_endpoint_url)


@pytest.mark.slow  # two spawned processes importing torch, on 2 cores
def test_two_machines_append_at_once_into_one_chain(team, registered, tmp_path, capsys):  # noqa: F811
    bundle = registered["bundle1"]
    machines = [team("machine-a"), team("machine-b")]
    plan = [[f"{m}{i}" for i in range(PER_MACHINE)] for m in ("10", "20")]
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    procs = [
        spawn.Process(target=_machine, args=(s.model_dump_json(), str(bundle), versions, start))
        for s, versions in zip(machines, plan, strict=True)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0

    store = _shared(machines[0])
    entries = parse_log(store.get_bytes("log.jsonl"), "shared")
    # Every append landed once: none was chained onto an entry another machine also extended.
    assert [e.seq for e in entries] == list(range(2 * PER_MACHINE))
    wanted = {subject_sha256("expert-legal", v) for versions in plan for v in versions}
    assert {e.subject_sha256 for e in entries} == wanted
    public = load_or_create_key(machines[0].factory_key_path).public_key()
    chain_ok(entries, public, "shared")
    # Each machine's own copy is the shared log as it was at that machine's last append.
    shared = store.get_bytes("log.jsonl")
    for settings in machines:
        assert shared.startswith(log_path(settings.home).read_bytes())

    # A bundle carrying one of these attestations verifies against the mirrored log.
    from factory.library.shared_log import TransparencyMirror

    mirror_dir = tmp_path / "market" / "transparency"
    TransparencyMirror(machines[0], mirror_dir, every_s=0).refresh()
    assert (mirror_dir / "log.jsonl").read_bytes() == shared
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    for name in ATTESTATION_FILES:
        shutil.copy2(mirror_dir / "versions" / "expert-legal" / "203" / name, copy / name)
    code, line = verify(capsys, copy, "--log", mirror_dir / "log.jsonl", "--key",
                        mirror_dir / "factory-key.pub")  # fmt: skip
    assert code == 0, line
    assert line.startswith("verified expert-legal@203: 5 files, 1 contributor signatures")
    assert f"of {2 * PER_MACHINE} in log" in line


def test_another_key_is_refused_before_it_signs(team, registered, tmp_path):  # noqa: F811
    from factory.library.shared_log import attest_shared

    first = team("machine-a")
    attest_shared(first, _statement(registered["bundle1"], "1"), "2026-12-02T00:00:00+00:00")
    stranger_key = tmp_path / "elsewhere" / "other.pem"
    load_or_create_key(stranger_key)
    stranger = team("machine-c", key_path=stranger_key)
    before = _shared(first).get_bytes("log.jsonl")
    with pytest.raises(ValueError) as refused:
        attest_shared(stranger, _statement(registered["bundle1"], "2"), "2026-12-02T00:00:01Z")
    message = str(refused.value)
    assert message.startswith(f"factory_key_path: {stranger_key} holds key ")
    assert message.endswith("give every machine that registers the same key file")
    assert _shared(first).get_bytes("log.jsonl") == before
    assert not log_path(stranger.home).exists()


def test_mirror_keeps_its_last_good_copy(team, registered, tmp_path):  # noqa: F811
    from factory.library.shared_log import TransparencyMirror, attest_shared

    machine = team("machine-a")
    attest_shared(machine, _statement(registered["bundle1"], "1"), "2026-12-02T00:00:00+00:00")
    folder = tmp_path / "market" / "transparency"
    mirror = TransparencyMirror(machine, folder, every_s=0)
    mirror.refresh()
    good = (folder / "log.jsonl").read_bytes()
    assert len(parse_log(good, "mirror")) == 1
    assert (folder / "versions" / "expert-legal" / "1" / ATTESTATION_FILE).is_file()
    # Someone with write access to the bucket, not the key, rewrites an entry's time.
    forged = good.replace(b"2026-12-02T00:00:00", b"2026-12-02T00:00:09")
    _shared(machine).put_bytes("log.jsonl", forged)
    mirror.refresh()
    assert (folder / "log.jsonl").read_bytes() == good


def test_a_shared_log_needs_postgres(tmp_path):
    with pytest.raises(ValueError, match="transparency_url: s3://b-1/t is appended to by several"):
        Settings(home=tmp_path, transparency_url="s3://b-1/t")
