"""The submission inbox: signed candidates dropped by outside contributors into an object store.

Layout under the store (a local folder or ``s3://bucket/prefix``, see :mod:`infra.storage`)::

    <prefix>/<expert_id>/cycle-<n>/<contributor_id>/<candidate_id>/adapter_model.safetensors
                                                                  /adapter_config.json
                                                                  /candidate.json
                                                                  /candidate.sig

Each contributor drops into its own folder, named by the contributor id its key is registered
under; an operator grants each contributor write access to that prefix only (S3: a policy per
prefix). The gate then requires the manifest to be signed by that folder's contributor
(:data:`ARRIVAL_FILE` tells it whose folder the copy came from), so a rival's copy re-signed
under another name cannot sit in, or claim, someone else's folder.

:func:`scan_inbox` copies every complete candidate whose files all arrived before the deadline
(the store's own ``last_modified``) into ``staging/<contributor_id>/<candidate_id>`` and returns
them in arrival order: the time this factory first saw the candidate with exactly these files
(recorded in ``staging/.arrivals.json`` by every scan, and by :func:`watching_arrivals` every
few seconds while the cycle's lines train: the factory's own observation at that resolution,
not folder names or the uploaders' clocks), then the store's time,
then the name. Folder names never decide who came first. Files other than the four above are
ignored (unsigned, so never used), not held against the candidate: one stray file dropped into a
folder cannot void it. Nothing is loaded or trusted here: hashes, signatures, shapes and values
are the gate's job. A candidate that cannot be taken is rejected with a reason from
:data:`REJECT_REASONS`; nothing an outsider uploads raises out of a scan.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from factory.candidate import ARRIVAL_FILE, MANIFEST_FILE, SIGNATURE_FILE
from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE
from infra.atomic import atomic_write_json
from infra.storage import (
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    open_store,
)

REQUIRED_FILES = (ADAPTER_FILE, ADAPTER_CONFIG, MANIFEST_FILE, SIGNATURE_FILE)
REJECT_REASONS = ("late", "incomplete", "bad_name", "too_large", "changed")
MAX_FILE_BYTES = 256 * 1024 * 1024
ARRIVALS = ".arrivals.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class InboxScan:
    accepted: list[Path] = field(default_factory=list)  # arrival order
    rejected: dict[str, str] = field(default_factory=dict)  # "<contributor>/<candidate>" -> reason
    ignored: dict[str, list[str]] = field(default_factory=dict)  # candidate -> stray file names


def inbox_prefix(prefix: str, expert_id: str, cycle: int) -> str:
    if not _NAME.match(expert_id):
        raise ValueError(f"expert_id {expert_id!r}: use letters, digits, '.', '_', '-'")
    parts = [p for p in (prefix.strip("/"), expert_id, f"cycle-{cycle}") if p]
    return "/".join(parts) + "/"


def _groups(store: ObjectStore, root: str) -> dict[str, dict[str, ObjectInfo]]:
    """'<contributor>/<candidate>' -> file name -> info; a file at any other depth is grouped
    under what it would be named so it is refused by name."""
    groups: dict[str, dict[str, ObjectInfo]] = {}
    for info in store.list(root):
        parts = info.key[len(root) :].split("/")
        if len(parts) == 3:
            groups.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = info
        else:
            groups.setdefault("/".join(parts[:-1]) or parts[0], {})
    return groups


def _fingerprint(files: dict[str, ObjectInfo]) -> list:
    return sorted(
        [name, info.size, info.sha256, info.last_modified.isoformat()]
        for name, info in files.items()
        if name in REQUIRED_FILES
    )


def _load_arrivals(staging: Path) -> dict[str, dict]:
    try:
        data = json.loads((Path(staging) / ARRIVALS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_arrivals(
    store: ObjectStore | str | Path,
    expert_id: str,
    cycle: int,
    staging: Path,
    prefix: str = "inbox",
    now: datetime | None = None,
) -> dict[str, datetime]:
    """Records when this factory first saw each complete candidate (with exactly its current
    files: a candidate whose files change arrives anew); returns candidate -> first seen."""
    if isinstance(store, str | Path):
        store = open_store(store)
    now = now or datetime.now(UTC)
    known = _load_arrivals(staging)
    seen = {}
    for key, files in _groups(store, inbox_prefix(prefix, expert_id, cycle)).items():
        if set(REQUIRED_FILES) - set(files):
            continue
        current = _fingerprint(files)
        entry = known.get(key)
        if not isinstance(entry, dict) or entry.get("files") != current:
            entry = {"files": current, "first_seen": now.isoformat()}
        known[key] = entry
        seen[key] = datetime.fromisoformat(entry["first_seen"])
    atomic_write_json(Path(staging) / ARRIVALS, known)
    return seen


@contextmanager
def watching_arrivals(
    store: ObjectStore, expert_id: str, cycle: int, staging: Path, every_s: float
) -> Iterator[None]:
    """Records arrivals (:func:`record_arrivals`) on entry and then every ``every_s`` seconds in
    a thread for the duration of the block (the collecting scan records once more). A failed
    look (the store unreachable, a listing cut short) is logged and the next one tries again:
    watching never fails a cycle."""
    stop = threading.Event()
    logger = logging.getLogger(__name__)

    def look() -> None:
        try:
            record_arrivals(store, expert_id, cycle, staging)
        except Exception as exc:  # the watch is best effort; the final scan still runs
            logger.warning("inbox arrivals not recorded: %s", exc)

    def watch() -> None:
        while not stop.wait(every_s):
            look()

    look()
    thread = threading.Thread(target=watch, name="inbox-arrivals", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def scan_inbox(
    store: ObjectStore | str | Path,
    expert_id: str,
    cycle: int,
    deadline: datetime,
    staging: Path,
    prefix: str = "inbox",
) -> InboxScan:
    """Copies on-time, complete candidates to ``staging/<contributor>/<candidate>`` in arrival
    order; reasons for the rest."""
    if deadline.tzinfo is None:
        raise ValueError("deadline: give a timezone-aware datetime (for example UTC)")
    if isinstance(store, str | Path):
        store = open_store(store)
    root = inbox_prefix(prefix, expert_id, cycle)
    first_seen = record_arrivals(store, expert_id, cycle, staging, prefix)
    scan = InboxScan()
    ready = []
    for key, files in sorted(_groups(store, root).items()):
        reason = _check(key, files, deadline)
        if reason:
            scan.rejected[key] = reason
            continue
        stray = sorted(set(files) - set(REQUIRED_FILES))
        if stray:
            scan.ignored[key] = stray
        stored_at = max(files[name].last_modified for name in REQUIRED_FILES)
        ready.append((first_seen[key], stored_at, key, files))
    for seen, stored_at, key, files in sorted(ready, key=lambda r: r[:3]):
        target = Path(staging) / key
        reason = _stage(store, root, key, files, target)
        if reason:
            scan.rejected[key] = reason
            continue
        contributor = key.split("/")[0]
        arrival = {"contributor_id": contributor, "first_seen": seen.isoformat(),
                   "stored_at": stored_at.isoformat()}  # fmt: skip
        atomic_write_json(target / ARRIVAL_FILE, arrival)
        scan.accepted.append(target)
    return scan


def _check(key: str, files: dict[str, ObjectInfo], deadline: datetime) -> str:
    parts = key.split("/")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        return "bad_name"
    if set(REQUIRED_FILES) - set(files):
        return "incomplete"
    if any(files[name].size > MAX_FILE_BYTES for name in REQUIRED_FILES):
        return "too_large"
    if any(files[name].last_modified > deadline for name in REQUIRED_FILES):
        return "late"
    return ""


def _stage(store: ObjectStore, root: str, key: str, files: dict, target: Path) -> str:
    """Copies the four files; a reason when the upload changed or vanished meanwhile."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        for name in REQUIRED_FILES:
            store.get_file(f"{root}{key}/{name}", target / name, max_bytes=MAX_FILE_BYTES)
            if (target / name).stat().st_size != files[name].size:
                raise ChecksumMismatch(f"{key}/{name} changed after it was listed")
    except ObjectNotFound:
        reason = "incomplete"
    except ObjectTooLarge:
        reason = "too_large"
    except ChecksumMismatch:
        # The uploader's recorded sha256 does not match its bytes, or the files changed while
        # being copied: the upload's defect, not the store's failure.
        reason = "changed"
    else:
        return ""
    shutil.rmtree(target, ignore_errors=True)
    return reason


def collect_inbox(
    store: ObjectStore | str | Path,
    expert_id: str,
    cycle: int,
    deadline: datetime,
    staging: Path,
    prefix: str = "inbox",
) -> list[Path]:
    """The staged folders of every candidate that arrived complete before ``deadline``."""
    return scan_inbox(store, expert_id, cycle, deadline, staging, prefix).accepted
