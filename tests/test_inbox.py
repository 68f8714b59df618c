"""The submission inbox over a local folder and over S3 (moto): on time and complete only."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from factory.inbox import REJECT_REASONS, REQUIRED_FILES, collect_inbox, scan_inbox
from infra.storage import open_store

PREFIX = "inbox/e1/cycle-3"


def _put_candidate(store, candidate_id: str, files=REQUIRED_FILES, extra: str | None = None):
    for name in files:
        store.put_bytes(f"{PREFIX}/{candidate_id}/{name}", f"{candidate_id}:{name}".encode())
    if extra:
        store.put_bytes(f"{PREFIX}/{candidate_id}/{extra}", b"x")


def _fill(store):
    _put_candidate(store, "alice-1")
    _put_candidate(store, "bob-1", files=REQUIRED_FILES[:3])
    _put_candidate(store, "carol-1", extra="run.sh")
    _put_candidate(store, "-dash")
    store.put_bytes("inbox/e1/cycle-2/old-1/candidate.json", b"{}")  # another cycle


def _check(scan, staging):
    assert [p.name for p in scan.accepted] == ["alice-1"]
    for name in REQUIRED_FILES:
        assert (staging / "alice-1" / name).read_text() == f"alice-1:{name}"
    assert scan.rejected == {
        "bob-1": "incomplete",
        "carol-1": "unexpected_file",
        "-dash": "bad_name",
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
    for path in (tmp_path / "objects" / PREFIX / "early-1").iterdir():
        os.utime(path, (stamp, stamp))
    late = tmp_path / "objects" / PREFIX / "late-1" / "candidate.json"
    os.utime(late, (time.time(), time.time()))
    for path in (tmp_path / "objects" / PREFIX / "late-1").iterdir():
        if path != late:
            os.utime(path, (stamp, stamp))
    scan = scan_inbox(store, "e1", 3, deadline, tmp_path / "staging")
    assert [p.name for p in scan.accepted] == ["early-1"]
    assert scan.rejected == {"late-1": "late"}


def test_too_large_and_bad_arguments(tmp_path, monkeypatch):
    import factory.inbox as inbox

    store = open_store(tmp_path / "objects")
    _put_candidate(store, "big-1")
    monkeypatch.setattr(inbox, "MAX_FILE_BYTES", 4)
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    assert scan_inbox(store, "e1", 3, deadline, tmp_path / "s").rejected == {"big-1": "too_large"}
    with pytest.raises(ValueError, match="deadline"):
        collect_inbox(store, "e1", 3, datetime.now(), tmp_path / "s")
    with pytest.raises(ValueError, match="expert_id"):
        collect_inbox(store, "../e1", 3, deadline, tmp_path / "s")
    assert set(REJECT_REASONS) == {"late", "incomplete", "unexpected_file", "bad_name", "too_large"}


def test_s3_inbox(tmp_path, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="taas-inbox")
    store = open_store("s3://taas-inbox/drop", endpoint_url=s3_endpoint)
    _fill(store)
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    scan = scan_inbox(store, "e1", 3, deadline, tmp_path / "staging")
    _check(scan, tmp_path / "staging")
    past = datetime.now(UTC) - timedelta(hours=1)
    assert collect_inbox(store, "e1", 3, past, tmp_path / "staging2") == []
