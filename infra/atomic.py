"""Atomic writes: temp -> fsync -> rename, and committed folders with a sha256 marker.

A committed folder holds its files and, written last, ``COMMITTED.json`` listing every file's
sha256. Readers call :func:`verify_committed` and ignore a folder whose marker is missing or whose
files do not match it, so a crash mid-write never yields a half-written artifact. Links are never
part of a committed folder (a writer that leaves one is refused, a reader treats one as torn), so
a link swapped in later cannot make a folder read, bundle or serve what it points to.

Replacing a folder takes two renames (old aside to ``.<name>.old``, new into place). A crash
between them leaves only the ``.old`` copy: :func:`recover_committed` puts it back, and both
:func:`committed_dir` and :func:`verify_committed` call it first, so the next access finds the
previous version instead of nothing.

:func:`file_lock` serialises writers on one machine (an exclusive ``flock`` on a lock file).
"""

from __future__ import annotations

import errno
import fcntl
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


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_paths(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so that a
    reader of either path never finds it missing; False where the kernel, the libc or the file
    system cannot (the caller then falls back to two renames)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if done != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            return False
        raise OSError(code, os.strerror(code), str(b))
    fsync_dir(Path(b).parent)
    return True


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_committed(final: Path) -> bool:
    """Restores ``final`` from its ``.old`` copy when a replacement crashed between its renames;
    True when it did."""
    final = Path(final)
    old = _aside(final)
    if final.exists() or final.is_symlink() or not old.is_dir() or not _verified(old):
        return False
    try:
        os.replace(old, final)
    except OSError:
        return False  # a concurrent writer or reader put a folder there first: it wins
    fsync_dir(final.parent)
    return True


@contextmanager
def committed_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success fsyncs its files, writes the marker, renames.

    With ``overwrite`` an existing folder at ``final`` is replaced (it is moved aside first and
    removed only after the new one is in place).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_committed(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        links = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_symlink())
        if links:
            raise ValueError(f"{final}: a committed folder holds no links; found {links[:3]}")
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
            old = _aside(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_committed(final)  # failed between the renames: the previous version goes back
        raise


def verify_committed(folder: Path) -> bool:
    """True when the folder has a marker and every listed file exists, a regular file (not a
    link) with that sha256. A folder lost between a replacement's renames is recovered first."""
    recover_committed(Path(folder))
    return _verified(Path(folder))


def _verified(folder: Path) -> bool:
    marker = folder / MARKER
    try:
        if marker.is_symlink():
            return False
        listing = json.loads(marker.read_text())["files"]
        for rel, digest in listing.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                return False
            path = folder / rel
            if any(p.is_symlink() for p in (path, *path.parents) if folder in p.parents):
                return False
            if not path.is_file() or sha256_file(path) != digest:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created with its folder when missing); other
    processes of this machine wait for it. Released on exit, or when the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
