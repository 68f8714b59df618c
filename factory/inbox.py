"""The submission inbox: signed candidates dropped by outside contributors into an object store.

Layout under the store (a local folder or ``s3://bucket/prefix``, see :mod:`infra.storage`)::

    <prefix>/<expert_id>/cycle-<n>/<candidate_id>/adapter_model.safetensors
                                                 /adapter_config.json
                                                 /candidate.json
                                                 /candidate.sig

:func:`collect_inbox` copies every complete candidate whose files all arrived before the deadline
(object ``last_modified`` / file mtime) into a local staging folder and returns those folders.
Nothing is loaded or trusted here: hashes, signatures, shapes and values are the gate's job.
Everything else is rejected with a reason from :data:`REJECT_REASONS`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from factory.candidate import MANIFEST_FILE, SIGNATURE_FILE
from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE
from infra.storage import ObjectStore, open_store

REQUIRED_FILES = (ADAPTER_FILE, ADAPTER_CONFIG, MANIFEST_FILE, SIGNATURE_FILE)
REJECT_REASONS = ("late", "incomplete", "unexpected_file", "bad_name", "too_large")
MAX_FILE_BYTES = 256 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class InboxScan:
    accepted: list[Path] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # candidate_id -> reason


def inbox_prefix(prefix: str, expert_id: str, cycle: int) -> str:
    if not _NAME.match(expert_id):
        raise ValueError(f"expert_id {expert_id!r}: use letters, digits, '.', '_', '-'")
    parts = [p for p in (prefix.strip("/"), expert_id, f"cycle-{cycle}") if p]
    return "/".join(parts) + "/"


def scan_inbox(
    store: ObjectStore | str | Path,
    expert_id: str,
    cycle: int,
    deadline: datetime,
    staging: Path,
    prefix: str = "inbox",
) -> InboxScan:
    """Copies on-time, complete candidates to ``staging/<candidate_id>``; reasons for the rest."""
    if deadline.tzinfo is None:
        raise ValueError("deadline: give a timezone-aware datetime (for example UTC)")
    if isinstance(store, str | Path):
        store = open_store(store)
    root = inbox_prefix(prefix, expert_id, cycle)
    groups: dict[str, dict[str, object]] = {}
    scan = InboxScan()
    for info in store.list(root):
        rest = info.key[len(root) :]
        candidate_id, _, name = rest.partition("/")
        groups.setdefault(candidate_id, {})[name] = info
    for candidate_id, files in sorted(groups.items()):
        reason = _check(candidate_id, files, deadline)
        if reason:
            scan.rejected[candidate_id] = reason
            continue
        target = Path(staging) / candidate_id
        shutil.rmtree(target, ignore_errors=True)
        for name in REQUIRED_FILES:
            store.get_file(f"{root}{candidate_id}/{name}", target / name)
        scan.accepted.append(target)
    return scan


def _check(candidate_id: str, files: dict, deadline: datetime) -> str:
    if not _NAME.match(candidate_id):
        return "bad_name"
    if set(files) - set(REQUIRED_FILES):
        return "unexpected_file"
    if set(REQUIRED_FILES) - set(files):
        return "incomplete"
    if any(info.size > MAX_FILE_BYTES for info in files.values()):
        return "too_large"
    if any(info.last_modified > deadline for info in files.values()):
        return "late"
    return ""


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
