"""Snapshots of a source's files in the factory's content-addressed cache.

Every file intake reads is first copied into ``<home>/cache/objects/<sha256>`` while it is hashed,
so every later step reads exactly the bytes whose sha256 is recorded, even if the customer's file
changes or is swapped for a link afterwards. Local files are opened with ``O_NOFOLLOW`` (and
``O_NONBLOCK``, so a FIFO swapped in cannot block) and the opened file itself is checked again
(a regular file, inside its root, outside the factory's home: :func:`factory.data.uri.
check_local_file`); S3 objects come through :mod:`infra.storage`, sized at download. Reading
stops past the byte budget, whatever size was listed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from factory.data.uri import UriRejected, check_local_file
from infra.atomic import sha256_file


def over_budget(total: int, max_bytes: int) -> ValueError:
    return ValueError(
        f"quality.max_bytes: the data holds more than {max_bytes} bytes (at least {total}); "
        "use less data or raise quality.max_bytes"
    )


def cached_download(
    store, key: str, cache: Path, expected_sha: str | None, budget: int
) -> tuple[Path, str]:
    if expected_sha is not None:
        cached = cache / expected_sha
        if cached.is_file() and sha256_file(cached) == expected_sha:
            return cached, expected_sha
    cache.mkdir(parents=True, exist_ok=True)
    fd, incoming = tempfile.mkstemp(dir=cache, prefix=".incoming-")
    os.close(fd)
    try:
        # Verifies size and the recorded sha256; the size is the object's at download time and
        # over ``budget`` nothing is downloaded (an object may grow after it was listed).
        store.get_file(key, Path(incoming), max_bytes=budget)
        sha = sha256_file(Path(incoming))
        os.replace(incoming, cache / sha)
    except BaseException:
        Path(incoming).unlink(missing_ok=True)
        raise
    return cache / sha, sha


def snapshot_local(
    path: Path, root: Path, uri: str, field: str, home: Path, cache: Path, budget: int
) -> tuple[Path, str, int]:
    """Copies a validated local file into the cache while hashing it; (copy, sha256, size).

    The file is opened without following a link (``O_NOFOLLOW``; ``O_NONBLOCK`` so a FIFO swapped
    in cannot block the open) and the opened file itself is checked again: a regular file, still
    inside its root and outside the home (``/proc/self/fd`` names what was really opened). Reading
    stops past ``budget`` bytes, whatever size the file reported.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ValueError(f"{field}: cannot open {uri} ({exc.strerror}); check the file") from None
    cache.mkdir(parents=True, exist_ok=True)
    out_fd, incoming = tempfile.mkstemp(dir=cache, prefix=".incoming-")
    try:
        with os.fdopen(fd, "rb") as src, os.fdopen(out_fd, "wb") as dst:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise UriRejected("special_file", f"{uri} -> {path}", field)
            opened = opened_path(src.fileno())
            if opened is not None:
                check_local_file(opened, root, uri, field, home)
            digest, size = hashlib.sha256(), 0
            while block := src.read(1 << 20):
                size += len(block)
                if size > budget:
                    raise over_budget(size, budget)
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        sha = digest.hexdigest()
        os.replace(incoming, cache / sha)
    except BaseException:
        Path(incoming).unlink(missing_ok=True)
        raise
    return cache / sha, sha, size


def opened_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None  # no /proc (macOS): O_NOFOLLOW and the fstat check remain
