"""Atomic writes: temp -> fsync -> rename, and committed folders with a sha256 marker.

A committed folder holds its files and, written last, ``COMMITTED.json`` listing every file's
sha256. Readers call :func:`verify_committed` and ignore a folder whose marker is missing or whose
files do not match it, so a crash mid-write never yields a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = "COMMITTED.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def committed_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success fsyncs its files, writes the marker, renames.

    With ``overwrite`` an existing folder at ``final`` is replaced (it is moved aside first and
    removed only after the new one is in place).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        listing = {}
        for p in files:
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            listing[p.relative_to(tmp).as_posix()] = sha256_file(p)
        atomic_write_json(tmp / MARKER, {"files": listing})
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists")
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_committed(folder: Path) -> bool:
    """True when the folder has a marker and every listed file exists with that sha256."""
    marker = Path(folder) / MARKER
    try:
        listing = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, digest in listing.items():
        path = Path(folder) / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True
