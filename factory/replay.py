"""Replay rows: a sample of an expert's training text, kept by the factory, never in its bundle.

A later composition replays each library expert's domain so router annealing does not make it
regress (see :mod:`merging.router_annealing`). Those rows are the customer's own text, so they
live in the factory's object store (``Settings.objects_url``), under a key named by the expert
and the exact adapter they were trained with::

    private/replay/<expert_id>/<adapter_sha256>.jsonl     one {"text": ...} per line

and never in the expert folder that is registered, exported or sold (:mod:`factory.bundle`
keeps a legacy folder's ``replay.jsonl`` out of every bundle). Only ``inbox/`` of the object
store is meant to be writable by outsiders; this prefix is the factory's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from factory.expert import REPLAY_FILE
from infra.storage import ObjectNotFound, ObjectStore

PREFIX = "private/replay"
LEGACY_FILE = REPLAY_FILE  # where experts composed before this module kept their rows
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def replay_key(expert_id: str, adapter_sha256: str) -> str:
    if not _ID.match(expert_id) or not _SHA.match(adapter_sha256):
        raise ValueError(f"replay key: bad expert id {expert_id!r} or adapter sha256")
    return f"{PREFIX}/{expert_id}/{adapter_sha256}.jsonl"


def save_replay(store: ObjectStore, expert_id: str, adapter_sha256: str, rows: list[str]) -> str:
    """Stores ``rows`` (texts) for this expert version; returns the key."""
    key = replay_key(expert_id, adapter_sha256)
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
    store.put_bytes(key, body.encode("utf-8"))
    return key


def load_replay(
    store: ObjectStore, expert_id: str, adapter_sha256: str, folder: Path | None = None
) -> list[str] | None:
    """The texts stored for this expert version; else a legacy ``replay.jsonl`` in ``folder``;
    None when neither exists."""
    try:
        data = store.get_bytes(replay_key(expert_id, adapter_sha256)).decode("utf-8")
    except ObjectNotFound:
        legacy = Path(folder) / LEGACY_FILE if folder is not None else None
        if legacy is None or not legacy.is_file():
            return None
        data = legacy.read_text(encoding="utf-8")
    return [json.loads(line)["text"] for line in data.splitlines() if line.strip()]


def sample_rows(train_jsonl: Path, limit: int) -> list[str]:
    """The first ``limit`` texts of a prepared ``train.jsonl``."""
    texts = []
    with open(train_jsonl, encoding="utf-8") as fh:
        for line in fh:
            if len(texts) >= limit:
                break
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts


# -- staging beside an expert folder (never inside it) --


def sidecar(folder: Path) -> Path:
    """Where a staged expert folder's replay rows sit: beside it, ``<folder>.replay.jsonl``."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".replay.jsonl")


def _identity(folder: Path) -> tuple[str, str]:
    from factory.expert import MANIFEST_FILE

    manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    return manifest["expert_id"], manifest["adapter_sha256"]


def write_sidecar(folder: Path, rows: list[str]) -> Path:
    from infra.atomic import atomic_write_text

    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
    atomic_write_text(sidecar(folder), body)
    return sidecar(folder)


def read_staged(folder: Path) -> list[str]:
    """The rows staged beside ``folder``, else a legacy ``replay.jsonl`` inside it, else []."""
    for path in (sidecar(folder), Path(folder) / LEGACY_FILE):
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line)["text"] for line in lines if line.strip()]
    return []


def stage_replay(store: ObjectStore, folder: Path) -> list[str]:
    """Fetches the stored rows of the expert in ``folder`` into its sidecar; returns them."""
    expert_id, adapter_sha = _identity(folder)
    rows = load_replay(store, expert_id, adapter_sha, folder) or []
    write_sidecar(folder, rows)
    return rows


def publish_replay(store: ObjectStore, folder: Path) -> str | None:
    """Stores the sidecar rows of a composed expert folder under its id and adapter sha256
    (None when it has none)."""
    if not sidecar(folder).is_file():
        return None
    expert_id, adapter_sha = _identity(folder)
    return save_replay(store, expert_id, adapter_sha, read_staged(folder))
