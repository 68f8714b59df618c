"""The submission inbox over a local folder and over S3 (moto): on time and complete only,
in the order the factory saw them arrive, each contributor in its own folder."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest
import torch

from factory.candidate import ARRIVAL_FILE
from factory.inbox import (
    REJECT_REASONS,
    REQUIRED_FILES,
    collect_inbox,
    record_arrivals,
    scan_inbox,
)
from infra.storage import open_store

PREFIX = "inbox/e1/cycle-3"


def _put_candidate(store, candidate_id: str, files=REQUIRED_FILES, extra: str | None = None):
    """Drops a candidate into its contributor's folder (the id's first part: alice-1 -> alice)."""
    folder = f"{PREFIX}/{candidate_id.split('-')[0] or 'dash'}/{candidate_id}"
    for name in files:
        store.put_bytes(f"{folder}/{name}", f"{candidate_id}:{name}".encode())
    if extra:
        store.put_bytes(f"{folder}/{extra}", b"x")


def _fill(store):
    _put_candidate(store, "alice-1")
    _put_candidate(store, "bob-1", files=REQUIRED_FILES[:3])
    _put_candidate(store, "carol-1", extra="run.sh")
    _put_candidate(store, "-dash")
    store.put_bytes("inbox/e1/cycle-3/stray.json", b"{}")  # not in a contributor's folder
    store.put_bytes("inbox/e1/cycle-2/old/old-1/candidate.json", b"{}")  # another cycle


def _check(scan, staging):
    # A stray file (run.sh) in carol's folder is ignored, not held against her candidate.
    assert [p.relative_to(staging).as_posix() for p in scan.accepted] == [
        "alice/alice-1", "carol/carol-1"
    ]  # fmt: skip
    for name in REQUIRED_FILES:
        assert (staging / "alice" / "alice-1" / name).read_text() == f"alice-1:{name}"
    assert not (staging / "carol" / "carol-1" / "run.sh").exists()
    assert scan.ignored == {"carol/carol-1": ["run.sh"]}
    assert scan.rejected == {
        "bob/bob-1": "incomplete",
        "dash/-dash": "bad_name",
        "stray.json": "bad_name",
    }


def test_folder_inbox(tmp_path):
    store = open_store(tmp_path / "objects")
    _fill(store)
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    scan = scan_inbox(tmp_path / "objects", "e1", 3, deadline, tmp_path / "staging")
    _check(scan, tmp_path / "staging")


def test_late_files_are_rejected(tmp_path):
    store = open_store(tmp_path / "objects")
    _put_candidate(store, "early-1")
    _put_candidate(store, "late-1")
    deadline = datetime.now(UTC) - timedelta(seconds=30)
    stamp = deadline.timestamp() - 60
    for path in (tmp_path / "objects" / PREFIX / "early" / "early-1").iterdir():
        os.utime(path, (stamp, stamp))
    late = tmp_path / "objects" / PREFIX / "late" / "late-1" / "candidate.json"
    os.utime(late, (time.time(), time.time()))
    for path in (tmp_path / "objects" / PREFIX / "late" / "late-1").iterdir():
        if path != late:
            os.utime(path, (stamp, stamp))
    scan = scan_inbox(store, "e1", 3, deadline, tmp_path / "staging")
    assert [p.name for p in scan.accepted] == ["early-1"]
    assert scan.rejected == {"late/late-1": "late"}


def test_too_large_and_bad_arguments(tmp_path, monkeypatch):
    import factory.inbox as inbox

    store = open_store(tmp_path / "objects")
    _put_candidate(store, "big-1")
    monkeypatch.setattr(inbox, "MAX_FILE_BYTES", 4)
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    assert scan_inbox(store, "e1", 3, deadline, tmp_path / "s").rejected == {
        "big/big-1": "too_large"
    }
    with pytest.raises(ValueError, match="deadline"):
        collect_inbox(store, "e1", 3, datetime.now(), tmp_path / "s")
    with pytest.raises(ValueError, match="expert_id"):
        collect_inbox(store, "../e1", 3, deadline, tmp_path / "s")
    assert set(REJECT_REASONS) == {"late", "incomplete", "bad_name", "too_large", "changed"}


def test_s3_inbox(tmp_path, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="taas-inbox")
    store = open_store("s3://taas-inbox/drop", endpoint_url=s3_endpoint)
    _fill(store)
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    scan = scan_inbox(store, "e1", 3, deadline, tmp_path / "staging")
    _check(scan, tmp_path / "staging")
    past = datetime.now(UTC) - timedelta(hours=1)
    assert collect_inbox(store, "e1", 3, past, tmp_path / "staging2") == []


# -- uploads that used to abort a scan, or let a later copy take a rival's place --


def test_a_backslash_in_a_file_name_is_ignored_not_raised(tmp_path):
    store = open_store(tmp_path / "objects")
    _put_candidate(store, "alice-1")
    folder = tmp_path / "objects" / PREFIX / "alice" / "alice-1"
    (folder / "evil\\name.bin").write_bytes(b"x")  # LocalStore.list used to raise on it
    scan = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1), tmp_path / "s")
    assert [p.name for p in scan.accepted] == ["alice-1"]
    assert scan.ignored == {"alice/alice-1": ["evil\\name.bin"]}


def test_first_arrival_is_when_the_factory_saw_it_not_the_folder_name(tmp_path):
    store = open_store(tmp_path / "objects")
    staging = tmp_path / "staging"
    _put_candidate(store, "zed-1")
    seen = record_arrivals(store, "e1", 3, staging, now=datetime(2030, 1, 1, 10, tzinfo=UTC))
    assert list(seen) == ["zed/zed-1"]
    # Later, a copy under an earlier-sorting name (and an mtime forged into the past).
    _put_candidate(store, "aaa-1")
    for path in (tmp_path / "objects" / PREFIX / "aaa" / "aaa-1").iterdir():
        os.utime(path, (1.0e9, 1.0e9))
    record_arrivals(store, "e1", 3, staging, now=datetime(2030, 1, 1, 11, tzinfo=UTC))
    scan = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1), staging)
    assert [p.name for p in scan.accepted] == ["zed-1", "aaa-1"]
    arrival = json.loads((staging / "zed" / "zed-1" / ARRIVAL_FILE).read_text())
    assert arrival["contributor_id"] == "zed"
    assert arrival["first_seen"] == "2030-01-01T10:00:00+00:00"
    # A candidate whose files are replaced arrives anew (it cannot keep its early place).
    store.put_bytes(f"{PREFIX}/zed/zed-1/{REQUIRED_FILES[0]}", b"replaced")
    record_arrivals(store, "e1", 3, staging, now=datetime(2030, 1, 1, 12, tzinfo=UTC))
    scan = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1), staging)
    assert [p.name for p in scan.accepted] == ["aaa-1", "zed-1"]


def test_seen_in_the_same_scan_the_store_time_decides_not_the_name(tmp_path):
    store = open_store(tmp_path / "objects")
    for name, stamp in (("aaa-1", 2.0e9), ("zed-1", 1.9e9)):
        _put_candidate(store, name)
        for path in (tmp_path / "objects" / PREFIX / name.split("-")[0] / name).iterdir():
            os.utime(path, (stamp, stamp))
    scan = scan_inbox(store, "e1", 3, datetime(2040, 1, 1, tzinfo=UTC), tmp_path / "staging")
    assert [p.name for p in scan.accepted] == ["zed-1", "aaa-1"]


def test_an_upload_whose_bytes_do_not_match_its_checksum_is_rejected_not_raised(tmp_path):
    store = open_store(tmp_path / "objects")
    _put_candidate(store, "alice-1")
    _put_candidate(store, "bob-1")
    path = tmp_path / "objects" / PREFIX / "bob" / "bob-1" / REQUIRED_FILES[0]
    path.write_bytes(path.read_bytes()[::-1])  # same size, other bytes than recorded
    scan = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1), tmp_path / "s")
    assert [p.name for p in scan.accepted] == ["alice-1"]
    assert scan.rejected == {"bob/bob-1": "changed"}
    assert not (tmp_path / "s" / "bob" / "bob-1").exists()


def test_s3_upload_with_a_forged_checksum_is_rejected(tmp_path, s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="taas-inbox-forged")
    store = open_store("s3://taas-inbox-forged/drop", endpoint_url=s3_endpoint)
    _put_candidate(store, "alice-1")
    key = f"drop/{PREFIX}/alice/alice-1/{REQUIRED_FILES[0]}"
    client.put_object(Bucket="taas-inbox-forged", Key=key, Body=b"abc",
                      Metadata={"sha256": "0" * 64})  # fmt: skip
    scan = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1), tmp_path / "s")
    assert scan.accepted == [] and scan.rejected == {"alice/alice-1": "changed"}


def test_inbox_to_gate_binds_signer_folder_and_commission(tmp_path):
    from evaluation.gate import GateContext, Reason, check_candidate
    from factory.candidate import CandidateFiles, CandidateManifest, write_candidate
    from factory.expert import lora_config_dict
    from factory.hashing import tensors_sha256
    from factory.ledger import Ledger
    from factory.signing import generate_key, public_key_b64
    from merging.lora_algebra import lora_shapes

    shapes = lora_shapes(1, 8, 16, 2, ["down_proj", "gate_proj", "up_proj"])
    tensors = {k: torch.randn(*s, generator=torch.Generator().manual_seed(0)) for k, s in
               shapes.items()}  # fmt: skip
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    alice = generate_key()
    ledger.register_contributor("alice", public_key_b64(alice))
    store = open_store(tmp_path / "objects")

    def upload(folder: str, commission: str, name: str) -> None:
        manifest = CandidateManifest(
            candidate_id=name, expert_id="e1", commission_id=commission, cycle=3,
            contributor_id="alice", base_model_sha256="b" * 64, parent_adapter_sha256=None,
            adapter_sha256=tensors_sha256(tensors), data_shard="own", seed=1, steps=1,
            tokens_seen=1, created_at="2020-01-01T00:00:00+00:00",
        )  # fmt: skip
        local = write_candidate(tmp_path / "out" / name, tensors, lora_config_dict(2, 4.0),
                                manifest, alice)  # fmt: skip
        for file in REQUIRED_FILES:
            store.put_file(f"{PREFIX}/{folder}/{name}/{file}", local.folder / file)

    upload("alice", "c-now", "fresh")
    upload("alice", "c-before", "replayed")
    upload("bob", "c-now", "planted")  # alice's own signed work, dropped into bob's folder
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    scan = scan_inbox(store, "e1", 3, deadline, tmp_path / "staging")
    ctx = GateContext(
        expert_id="e1", cycle=3, base_model_sha256="b" * 64, current_adapter_sha256=None,
        deadline=deadline, keys=ledger, reference_shapes=shapes,
        adapter_config=lora_config_dict(2, 4.0), commission_id="c-now",
    )  # fmt: skip
    decisions = {p.name: check_candidate(CandidateFiles(p), ctx) for p in scan.accepted}
    assert {k: d.reason for k, d in decisions.items()} == {
        "fresh": None, "replayed": Reason.LATE, "planted": Reason.WRONG_FOLDER
    }  # fmt: skip


def test_arrivals_watched_while_lines_train_keep_the_first_uploader_first(tmp_path):
    """A candidate uploaded while the lines train keeps its place against a copy uploaded
    later under an earlier-sorting name with a forged earlier store time (seen by the watch,
    not only at collection time, where the forged time would put the copy first)."""
    from factory.inbox import ARRIVALS, watching_arrivals

    store = open_store(tmp_path / "objects")
    staging = tmp_path / "staging"

    def recorded() -> set[str]:
        path = staging / ARRIVALS
        return set(json.loads(path.read_text())) if path.is_file() else set()

    with watching_arrivals(store, "e1", 3, staging, every_s=0.05):
        assert recorded() == set()  # looked once on entry: nothing yet
        _put_candidate(store, "zed-1")
        deadline = time.monotonic() + 30
        while "zed/zed-1" not in recorded():
            assert time.monotonic() < deadline, "the watch never recorded zed-1"
            time.sleep(0.05)
        time.sleep(0.02)  # a later moment for the copy (timestamps are microseconds)
        _put_candidate(store, "aaa-1")
        for path in (tmp_path / "objects" / PREFIX / "aaa" / "aaa-1").iterdir():
            os.utime(path, (1.0e9, 1.0e9))
    scan = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1), staging)
    assert [p.name for p in scan.accepted] == ["zed-1", "aaa-1"]
    # Without the watch both are first seen by the one scan, and the forged time decides.
    unwatched = scan_inbox(store, "e1", 3, datetime.now(UTC) + timedelta(minutes=1),
                           tmp_path / "unwatched")  # fmt: skip
    assert [p.name for p in unwatched.accepted] == ["aaa-1", "zed-1"]


def test_an_unreachable_store_never_fails_the_watch(tmp_path, caplog):
    from factory.inbox import watching_arrivals

    class Down:
        def list(self, prefix):
            raise ConnectionError("store unreachable")

    with watching_arrivals(Down(), "e1", 3, tmp_path / "staging", every_s=0.01):
        time.sleep(0.1)
    assert "inbox arrivals not recorded: store unreachable" in caplog.text
