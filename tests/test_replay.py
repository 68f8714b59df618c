"""Replay rows live in the factory's object store by expert id and adapter sha256."""

from __future__ import annotations

import json
import shutil

import pytest

from factory.replay import load_replay, replay_key, sample_rows, save_replay
from infra.storage import open_store

SHA = "ab" * 32


def test_replay_rows_round_trip_outside_the_expert_folder(tmp_path):
    store = open_store(tmp_path / "objects")
    rows = ["first row", "ünïcode row", 'a "quoted" row']
    key = save_replay(store, "legal-acme", SHA, rows)
    assert key == f"private/replay/legal-acme/{SHA}.jsonl"
    assert load_replay(store, "legal-acme", SHA) == rows
    assert load_replay(store, "legal-acme", "cd" * 32) is None  # another adapter: none
    assert load_replay(store, "legal-other", SHA) is None


def test_a_legacy_folder_sample_is_still_read(tmp_path):
    store = open_store(tmp_path / "objects")
    folder = tmp_path / "expert"
    folder.mkdir()
    (folder / "replay.jsonl").write_text(json.dumps({"text": "old row"}) + "\n")
    assert load_replay(store, "legal-acme", SHA, folder) == ["old row"]
    save_replay(store, "legal-acme", SHA, ["new row"])
    assert load_replay(store, "legal-acme", SHA, folder) == ["new row"]  # the store wins


@pytest.mark.parametrize("expert_id,sha", [("../x", SHA), ("a/b", SHA), ("ok", "zz"), ("", SHA)])
def test_keys_cannot_leave_the_replay_prefix(expert_id, sha):
    with pytest.raises(ValueError, match="replay key"):
        replay_key(expert_id, sha)


def test_sample_rows_takes_the_first_texts(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(100)))
    assert sample_rows(train, 3) == ["row 0", "row 1", "row 2"]


def test_rows_travel_beside_the_folder_and_through_the_store(tiny_expert_folder, tmp_path):
    from factory.expert import load_expert
    from factory.replay import publish_replay, read_staged, sidecar, stage_replay, write_sidecar

    store = open_store(tmp_path / "objects")
    composed = tmp_path / "composed" / "expert"
    composed.parent.mkdir()
    shutil.copytree(tiny_expert_folder, composed)
    write_sidecar(composed, ["customer row one", "customer row two"])
    assert sidecar(composed) == tmp_path / "composed" / "expert.replay.jsonl"
    assert not (composed / "replay.jsonl").exists()  # never inside the deliverable
    manifest = load_expert(composed).manifest
    key = publish_replay(store, composed)
    assert key == f"private/replay/{manifest.expert_id}/{manifest.adapter_sha256}.jsonl"
    # A later commission stages the library expert and finds its rows again.
    staged = tmp_path / "later" / "library" / manifest.expert_id
    shutil.copytree(tiny_expert_folder, staged)
    assert stage_replay(store, staged) == ["customer row one", "customer row two"]
    assert read_staged(staged) == ["customer row one", "customer row two"]
    assert publish_replay(store, tiny_expert_folder) is None  # nothing beside it: nothing stored
