"""The commission register: idempotent submit, the state machine, timestamps, cancel."""

from __future__ import annotations

import hashlib

import pytest

from factory.commission import parse_spec, spec_sha256
from factory.commission_store import CommissionStore, commission_id_for

SPEC = parse_spec({"version": 1, "customer": "acme", "domain": "legal", "data": [{"uri": "/a"}]})
DATA_A, DATA_B = "a" * 64, "b" * 64


@pytest.fixture
def store(tmp_path):
    return CommissionStore(f"sqlite:///{tmp_path / 'taas.db'}")


def test_submit_is_idempotent_and_ids_come_from_hashes(store, tmp_path):
    sha = spec_sha256(SPEC)
    first = store.submit(SPEC, sha, DATA_A)
    again = CommissionStore(f"sqlite:///{tmp_path / 'taas.db'}").submit(SPEC, sha, DATA_A)
    other = store.submit(SPEC, sha, DATA_B)
    expected = "c-" + hashlib.sha256(f"{sha}:{DATA_A}".encode()).hexdigest()[:12]
    assert first.commission_id == again.commission_id == expected == commission_id_for(sha, DATA_A)
    assert other.commission_id != first.commission_id
    assert [r.commission_id for r in store.list()] == [first.commission_id, other.commission_id]
    assert first.state == "submitted" and set(first.timestamps) == {"submitted"}
    assert store.get(first.commission_id).spec() == SPEC


def test_state_machine(store):
    cid = store.submit(SPEC, spec_sha256(SPEC), DATA_A).commission_id
    with pytest.raises(ValueError, match="cannot go from submitted to running"):
        store.set_state(cid, "running")
    store.set_state(cid, "validated")
    store.set_state(cid, "running")
    first_running = store.get(cid).timestamps["running"]
    store.set_state(cid, "running", "resumed after restart")
    record = store.get(cid)
    assert record.timestamps["running"] == first_running and record.detail.startswith("resumed")
    store.set_state(cid, "registered")
    with pytest.raises(ValueError, match=r"allowed: none \(final state\)"):
        store.set_state(cid, "failed")
    with pytest.raises(ValueError, match="cannot go from registered to cancelled"):
        store.cancel(cid)
    record = store.get(cid)
    assert list(record.timestamps) == ["submitted", "validated", "running", "registered"]
    stamps = list(record.timestamps.values())
    assert stamps == sorted(stamps)


def test_cancel_fail_and_bad_input(store):
    cid = store.submit(SPEC, spec_sha256(SPEC), DATA_A).commission_id
    assert store.cancel(cid).state == "cancelled"
    cid2 = store.submit(SPEC, spec_sha256(SPEC), DATA_B).commission_id
    store.set_state(cid2, "failed", "held-out too small")
    assert store.get(cid2).detail == "held-out too small"
    with pytest.raises(ValueError, match="cannot go from failed to registered"):
        store.set_state(cid2, "registered")
    assert store.set_state(cid2, "running", "retried").state == "running"
    with pytest.raises(ValueError, match="state 'done': use one of"):
        store.set_state(cid2, "done")
    with pytest.raises(ValueError, match="commission 'c-nope' not found"):
        store.get("c-nope")
