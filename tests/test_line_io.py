"""infra.line_io: folders staged by content hash, verified on the way down, checkpoints by step."""

from __future__ import annotations

import hashlib
import json

import pytest

from infra import line_io
from infra.storage import ChecksumMismatch, open_store


def _folder(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "objects")
    import boto3

    url = request.getfixturevalue("s3_endpoint")
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="taas-line-io")
    return open_store("s3://taas-line-io/p", endpoint_url=url)


def test_tree_round_trip_uploads_each_content_once(store, tmp_path):
    files = {"a.bin": b"alpha", "sub/b.bin": b"beta", "sub/c.bin": b"alpha"}  # c duplicates a
    sha = line_io.put_tree(store, _folder(tmp_path / "src", files))
    manifest = {r: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                for r, d in files.items()}  # fmt: skip
    assert sha == line_io.tree_sha256(manifest)
    blobs = [i.key for i in store.list("blobs/")]
    assert len(blobs) == 2  # alpha once, beta once
    assert line_io.put_tree(store, tmp_path / "src") == sha  # again: nothing new
    assert len(store.list("blobs/")) == 2 and len(store.list("trees/")) == 1
    out = line_io.cached_tree(store, sha, tmp_path / "cache")
    assert out == tmp_path / "cache" / sha
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} \
        == files  # fmt: skip
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]


def test_include_stages_only_the_named_subfolders(store, tmp_path):
    src = _folder(tmp_path / "data", {"train/x": b"1", "heldout/y": b"2"})
    sha = line_io.put_tree(store, src, include=("train",))
    assert list(line_io.read_manifest(store, sha)) == ["train/x"]


def test_a_corrupted_blob_is_refused_and_leaves_no_folder(tmp_path):
    store = open_store(tmp_path / "objects")
    sha = line_io.put_tree(store, _folder(tmp_path / "src", {"w.bin": b"weights"}))
    blob = hashlib.sha256(b"weights").hexdigest()
    # Rewritten through the store (its own sha256 record matches): only the name can tell.
    store.put_bytes(f"blobs/{blob}", b"WEIGHTS")
    with pytest.raises(ChecksumMismatch, match="do not hash to its name"):
        line_io.cached_tree(store, sha, tmp_path / "cache")
    assert not (tmp_path / "cache" / sha).exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_manifest_must_hash_to_its_name_and_hold_safe_paths(tmp_path):
    store = open_store(tmp_path / "objects")
    evil = json.dumps({"files": {"../escape": {"sha256": "0" * 64, "size": 1}}},
                      sort_keys=True, separators=(",", ":")).encode()  # fmt: skip
    name = hashlib.sha256(evil).hexdigest()
    store.put_bytes(f"trees/{name}.json", evil)
    with pytest.raises(ChecksumMismatch, match="unsafe path"):
        line_io.fetch_tree(store, name, tmp_path / "out")
    store.put_bytes(f"trees/{'1' * 64}.json", evil)
    with pytest.raises(ChecksumMismatch, match="does not hash to its name"):
        line_io.fetch_tree(store, "1" * 64, tmp_path / "out")


def test_links_and_empty_folders_are_refused(tmp_path):
    store = open_store(tmp_path / "objects")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files to stage"):
        line_io.put_tree(store, tmp_path / "empty")
    src = _folder(tmp_path / "src", {"a": b"1"})
    (src / "link").symlink_to(src / "a")
    with pytest.raises(ValueError, match="holds no links"):
        line_io.put_tree(store, src)


def test_checkpoint_pointers_newest_and_pruned(store, tmp_path):
    prefix = "lines/e/cycle-1/line-0/abc"
    assert line_io.newest_checkpoint(store, prefix) is None
    trees = {}
    for step in (3, 6, 9):
        folder = _folder(tmp_path / f"step-{step}", {"state.json": f"{step}".encode()})
        trees[step] = line_io.publish_checkpoint(store, prefix, folder, step)
    assert line_io.checkpoint_steps(store, prefix) == [3, 6, 9]
    assert line_io.newest_checkpoint(store, prefix) == (9, trees[9])
    line_io.prune_checkpoints(store, prefix, keep_last=2)
    assert line_io.checkpoint_steps(store, prefix) == [6, 9]
    restored = line_io.fetch_tree(store, trees[9], tmp_path / "restored")
    assert (restored / "state.json").read_text() == "9"
