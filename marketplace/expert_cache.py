"""The marketplace's local copies of library experts: fetched once, verified, never torn.

:meth:`ExpertCache.folder` returns ``<root>/<quoted name>/<version>``, a committed expert folder
(:func:`infra.atomic.verify_committed`). The first request for a version fetches it while
holding an exclusive ``fcntl`` lock on ``<root>/.locks/<quoted name>@<version>.lock``, so
concurrent requests, in this process or in other server processes, wait for one fetch instead
of racing; ``fetch`` must create its destination by an atomic rename (as
:meth:`factory.library.ExpertLibrary.download` does). A committed version is immutable here: it
is never removed or replaced while it verifies. Only a folder that fails verification (torn by
a crash, tampered) is moved aside, under the lock, and fetched again.

Verifying hashes every file, so it is done once per folder and remembered by the identity of
its commit marker (inode, size, mtime): a request re-hashes nothing. :meth:`forget` drops that
memory (the bundle reader calls it when a file no longer matches its marker).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from infra.atomic import MARKER, file_lock, verify_committed


def _marker_id(folder: Path) -> tuple[int, int, int] | None:
    try:
        stat = (folder / MARKER).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ExpertCache:
    def __init__(self, root: Path, fetch: Callable[[str, str, Path], object]):
        self.root, self._fetch = Path(root), fetch
        self._verified: dict[Path, tuple[int, int, int]] = {}
        self._memo_lock = threading.Lock()

    def path(self, name: str, version: str) -> Path:
        # quoted with nothing safe: a name never becomes '..', a slash or a hidden file
        return self.root / quote(name, safe="") / quote(version, safe="")

    def folder(self, name: str, version: str) -> Path:
        target = self.path(name, version)
        if self._known(target):
            return target
        with self._locked(target):
            if verify_committed(target):
                self._remember(target)
                return target
            if target.exists() or target.is_symlink():
                aside = target.with_name(f".{target.name}.torn-{uuid.uuid4().hex[:8]}")
                os.replace(target, aside)  # nobody is served a folder that fails verification
                shutil.rmtree(aside, ignore_errors=True)
            self._fetch(name, version, target)
            if not verify_committed(target):
                raise ValueError(f"{name}@{version}: fetched folder is not committed")
            self._remember(target)
            return target

    def forget(self, name: str, version: str) -> None:
        with self._memo_lock:
            self._verified.pop(self.path(name, version), None)

    def _known(self, target: Path) -> bool:
        seen = _marker_id(target)
        with self._memo_lock:
            return seen is not None and self._verified.get(target) == seen

    def _remember(self, target: Path) -> None:
        seen = _marker_id(target)
        if seen is not None:
            with self._memo_lock:
                self._verified[target] = seen

    @contextmanager
    def _locked(self, target: Path) -> Iterator[None]:
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / ".locks" / f"{target.parent.name}@{target.name}.lock"):
            yield
