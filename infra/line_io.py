"""A production line's inputs and outputs in the object store, addressed by content hash.

A folder travels as a *tree*: every file is a blob under ``blobs/<sha256 of its bytes>`` and the
folder is a manifest under ``trees/<tree sha>.json`` listing ``{relative path: {sha256, size}}``;
the tree sha is the sha256 of the manifest's canonical JSON. :func:`put_tree` uploads a blob only
when the store lacks it and writes the manifest last (a reader never finds a manifest whose blobs
are missing), so a base model shared by a thousand lines is uploaded once. :func:`fetch_tree`
downloads a tree into a folder, checking every file against the manifest, and
:func:`cached_tree` keeps one verified copy per tree in a worker's own cache (downloaded into a
temporary sibling, verified, then renamed into place, so a half-downloaded tree is never used).

Checkpoints of a line are trees too, with a pointer object per saved step
(:func:`publish_checkpoint`, :func:`newest_checkpoint`): a retry on another machine fetches the
newest one and resumes from it. Nothing here knows Prefect; the line flow
(:mod:`flows.train_line`) and the cycle's dispatcher call these.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from infra.atomic import sha256_file
from infra.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

BLOBS = "blobs"
TREES = "trees"
_STEP = re.compile(r"/checkpoints/step-(\d{8})\.json$")


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def tree_manifest(folder: Path, include: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` for every regular file under ``folder`` (only
    the ``include`` files and those under the ``include`` subfolders when given). Links are
    refused: a tree is bytes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder, cannot stage it")
    roots = [folder / sub for sub in include] if include else [folder]
    files: dict[str, dict] = {}
    for root in roots:
        paths = sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []
        for path in paths:
            if path.is_symlink():
                raise ValueError(f"{path}: a staged folder holds no links")
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    if not files:
        raise ValueError(f"{folder}: no files to stage (include: {list(include) or 'all'})")
    return files


def tree_sha256(files: dict[str, dict]) -> str:
    return hashlib.sha256(_canonical({"files": files})).hexdigest()


def put_tree(store: ObjectStore, folder: Path, include: tuple[str, ...] = ()) -> str:
    """Uploads ``folder`` as a tree (missing blobs only, manifest last); returns its sha."""
    files = tree_manifest(folder, include)
    sha = tree_sha256(files)
    if store.exists(f"{TREES}/{sha}.json"):
        return sha
    for rel, info in files.items():
        key = f"{BLOBS}/{info['sha256']}"
        if not store.exists(key):
            store.put_file(key, Path(folder) / rel)
    store.put_bytes(f"{TREES}/{sha}.json", _canonical({"files": files}))
    return sha


def put_blob(store: ObjectStore, path: Path) -> str:
    """Uploads one file as a blob (when missing); returns its sha256."""
    sha = sha256_file(Path(path))
    if not store.exists(f"{BLOBS}/{sha}"):
        store.put_file(f"{BLOBS}/{sha}", Path(path))
    return sha


def read_manifest(store: ObjectStore, sha: str) -> dict[str, dict]:
    data = store.get_bytes(f"{TREES}/{sha}.json")
    if hashlib.sha256(data).hexdigest() != sha:
        raise ChecksumMismatch(f"tree {sha[:12]}...: manifest does not hash to its name")
    files = json.loads(data)["files"]
    for rel in files:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise ChecksumMismatch(f"tree {sha[:12]}...: unsafe path {rel!r} in its manifest")
    return files


def fetch_blob(store: ObjectStore, sha: str, dest: Path) -> Path:
    """Downloads blob ``sha`` to ``dest`` and checks its bytes hash to ``sha``."""
    store.get_file(f"{BLOBS}/{sha}", dest)
    if sha256_file(dest) != sha:
        Path(dest).unlink(missing_ok=True)
        raise ChecksumMismatch(f"blob {sha[:12]}...: downloaded bytes do not hash to its name")
    return Path(dest)


def fetch_tree(store: ObjectStore, sha: str, dest: Path) -> Path:
    """Downloads tree ``sha`` into the new folder ``dest`` (a temporary sibling first, every
    file verified against the manifest, then renamed into place)."""
    dest = Path(dest)
    files = read_manifest(store, sha)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        for rel, info in files.items():
            target = tmp / rel
            fetch_blob(store, info["sha256"], target)
            if target.stat().st_size != info["size"]:
                raise ChecksumMismatch(f"tree {sha[:12]}...: {rel} has the wrong size")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def cached_tree(store: ObjectStore, sha: str, cache_root: Path) -> Path:
    """The local copy of tree ``sha`` under ``cache_root`` (downloaded once per machine)."""
    final = Path(cache_root) / sha
    if final.is_dir():
        return final
    try:
        return fetch_tree(store, sha, final)
    except OSError:
        if final.is_dir():  # another line on this machine fetched it first: same bytes
            return final
        raise


# -- a line's checkpoints ------------------------------------------------------------------


def publish_checkpoint(store: ObjectStore, line_prefix: str, folder: Path, step: int) -> str:
    """Uploads a committed checkpoint folder as a tree, then its pointer (the pointer last, so
    a retry never finds one whose files are missing); returns the tree sha."""
    sha = put_tree(store, folder)
    pointer = {"step": step, "tree": sha}
    store.put_bytes(f"{line_prefix}/checkpoints/step-{step:08d}.json", _canonical(pointer))
    return sha


def checkpoint_steps(store: ObjectStore, line_prefix: str) -> list[int]:
    """The steps with a published checkpoint, oldest first."""
    found = []
    for info in store.list(f"{line_prefix}/checkpoints/"):
        match = _STEP.search("/" + info.key)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def newest_checkpoint(store: ObjectStore, line_prefix: str) -> tuple[int, str] | None:
    """(step, tree sha) of the newest published checkpoint, or None."""
    for step in reversed(checkpoint_steps(store, line_prefix)):
        try:
            pointer = json.loads(store.get_bytes(f"{line_prefix}/checkpoints/step-{step:08d}.json"))
        except ObjectNotFound:  # pruned while we listed
            continue
        return int(pointer["step"]), str(pointer["tree"])
    return None


def prune_checkpoints(store: ObjectStore, line_prefix: str, keep_last: int) -> None:
    """Removes all but the newest ``keep_last`` pointers (the blobs stay: other trees may share
    them, and they are content-addressed, so a later sweep can collect the unreferenced)."""
    for step in checkpoint_steps(store, line_prefix)[:-keep_last]:
        store.delete(f"{line_prefix}/checkpoints/step-{step:08d}.json")
