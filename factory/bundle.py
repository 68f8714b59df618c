"""What a weight bundle may hold: weights, router, manifest, model card and integration files.

A bundle (``taas library export`` and the marketplace's weight download) is built from an
expert folder, which over time may carry more than a buyer should get (experts composed before
:mod:`factory.replay` kept 64 rows of the customer's training text as ``replay.jsonl``). So a
bundle is an allowlist, not a copy: :func:`bundle_members` names, from the folder's commit
marker, the files of :data:`BUNDLE_FILES` that are regular files (never symlinks) and match the
marker's sha256. Anything else -- customer data, stray files, files added after the commit -- is
left out.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

from factory.attestation import ATTESTATION_FILES
from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE, MANIFEST_FILE, NULL_ROUTE_FILE, ROUTER_FILE
from infra.atomic import MARKER, atomic_write_json, atomic_write_text, committed_dir, sha256_file

CARD_FILE = "README.md"
INTEGRATION_FILE = "INTEGRATION.md"
LIBRARY_FILE = "library.json"
WEIGHT_FILES = (ADAPTER_CONFIG, ADAPTER_FILE, ROUTER_FILE, MANIFEST_FILE, NULL_ROUTE_FILE)
# The attestation files (factory.attestation): the signed statement over the weight files and
# the card, the factory's public key and the transparency log up to the version's entry.
BUNDLE_FILES = frozenset(
    {*WEIGHT_FILES, CARD_FILE, INTEGRATION_FILE, LIBRARY_FILE, MARKER, *ATTESTATION_FILES}
)
# The lm-eval reproduction of the general tasks (evaluation.reproduce): the command, its results
# and the general task folder. Never the commission's held-out task: that is customer text, kept
# with the registered version inside the factory.
LM_EVAL_DIR = "lm_eval"
LM_EVAL_FILES = frozenset(
    {"lm_eval_command.sh", "results.json", "tasks/taas_data.py"}
    | {f"tasks/{t}{ext}" for t in ("taas_general_cloze", "taas_general_perplexity")
       for ext in (".yaml", ".test.jsonl")}
)  # fmt: skip


class TornExpert(ValueError):
    """The folder's files do not match its commit marker."""


def bundle_members(folder: Path) -> list[str]:
    """Names of the weight files of a committed expert folder that may go into a bundle.

    Raises :class:`TornExpert` when the marker is missing or an allowed file differs from it.
    """
    folder = Path(folder)
    try:
        listing = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TornExpert(f"{folder}: no valid commit marker") from None
    members = []
    for rel in sorted(listing):
        if rel not in WEIGHT_FILES:
            continue  # not a deliverable (e.g. replay.jsonl), or not top level
        path = folder / rel
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise TornExpert(f"{folder}: {rel} is listed but missing") from None
        if not stat.S_ISREG(mode) or sha256_file(path) != listing[rel]:
            raise TornExpert(f"{folder}: {rel} is not the committed file")
        members.append(rel)
    return members


def write_bundle(
    dest: Path,
    expert_dir: Path,
    card: Path,
    integration: str,
    library_meta: dict,
    attestation: Path | None = None,
    lm_eval_dir: Path | None = None,
) -> Path:
    """Writes a weight bundle as a new committed folder ``dest``: :func:`bundle_members` of
    ``expert_dir``, the model card, INTEGRATION.md, library.json, from the folder
    ``attestation`` the version's attestation files (``taas verify`` checks them) and, from
    ``lm_eval_dir``, the files of :data:`LM_EVAL_FILES` it has (under ``lm_eval/``).

    ``dest`` must not exist or be an empty folder: the user's files are never replaced or deleted
    (an empty folder is removed first, so a file appearing meanwhile makes the commit fail).
    """
    dest = Path(dest)
    if dest.is_symlink() or dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"dest: {dest} exists and is not an empty folder; choose a new folder")
    members = bundle_members(expert_dir)
    if dest.is_dir():
        dest.rmdir()  # empty; fails (and nothing is lost) if a file appeared meanwhile
    with committed_dir(dest) as tmp:
        for rel in members:
            shutil.copyfile(expert_dir / rel, tmp / rel)
        shutil.copyfile(card, tmp / CARD_FILE)
        atomic_write_text(tmp / INTEGRATION_FILE, integration)
        atomic_write_json(tmp / LIBRARY_FILE, library_meta)
        for name in ATTESTATION_FILES if attestation is not None else ():
            source = Path(attestation) / name
            if source.is_symlink() or not source.is_file():
                raise ValueError(f"attestation: {source} is missing; the version is not attested")
            shutil.copyfile(source, tmp / name)
        for rel in sorted(LM_EVAL_FILES) if lm_eval_dir is not None else ():
            source = Path(lm_eval_dir) / rel
            if source.is_file() and not source.is_symlink():
                (tmp / LM_EVAL_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / LM_EVAL_DIR / rel)
    return dest
