"""The team's transparency log: one hash-chained log for every machine that registers.

By default each home keeps its own log (:mod:`factory.transparency_log`), which is right for
one machine. In team mode registrations run on whichever worker took the commission, so
``Settings.transparency_url`` (``s3://bucket/prefix``) names one shared copy, laid out like a
home's ``transparency/`` folder: ``log.jsonl``, ``factory-key.pub`` and
``versions/<name>/<version>/`` with a version's three attestation files.

:func:`attest_shared` appends under the team's lock, a PostgreSQL advisory lock on the
commission database held for the whole append, so two workers never chain onto the same
entry: it replaces the home's copy of the log with the shared one, appends there (which checks
the chain and signs), then publishes the version's files, the key and last the log, whose
write is what commits the entry. The factory key is the same secret file on every such machine
(``Settings.factory_key_path``); a machine holding another key is refused before it signs.
:class:`TransparencyMirror` copies the shared folder into a marketplace's own home, so what it
serves is what every machine appended.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from factory.attestation import (
    ATTESTATION_FILES,
    KEY_FILE,
    Statement,
    VerificationError,
    key_id,
    load_public_key,
    public_key_text,
)
from factory.signing import load_or_create_key
from factory.transparency_log import (
    Attested,
    attest,
    check_prefix,
    factory_key_path,
    log_path,
    parse_log,
    verify_chain,
    version_attestation_dir,
)
from infra.atomic import atomic_write_bytes, atomic_write_text, committed_dir, verify_committed
from infra.settings import Settings
from infra.storage import ObjectStore, StorageError, open_store

log = logging.getLogger(__name__)

LOG = "log.jsonl"
# One lock id for every factory sharing the database: the log is one per team.
LOCK_ID = int.from_bytes(hashlib.sha256(b"taas-transparency-log").digest()[:8], "big", signed=True)


@contextmanager
def team_lock(db_url: str) -> Iterator[None]:
    """Holds the team's transparency lock (a session-level PostgreSQL advisory lock)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_ID})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_ID})
    finally:
        engine.dispose()


def _store(settings: Settings) -> ObjectStore:
    return open_store(settings.transparency_url, settings.s3_endpoint_url)


def _check_key(store: ObjectStore, key_path: Path) -> None:
    """Refuses a machine whose factory key is not the key the team's log is signed with."""
    if not store.exists(KEY_FILE):
        return
    published = load_public_key(store.get_bytes(KEY_FILE).decode("ascii"), KEY_FILE)
    own = load_or_create_key(key_path).public_key()
    if key_id(own) != key_id(published):
        raise ValueError(
            f"factory_key_path: {key_path} holds key {key_id(own)}, but the team's "
            f"transparency log is signed with {key_id(published)}; give every machine that "
            "registers the same key file"
        )


def _take_shared_log(store: ObjectStore, home: Path) -> None:
    """The home's log becomes the shared one; a local log that is not a prefix of it (entries
    this machine made before the team shared one) is kept aside, never lost."""
    if not store.exists(LOG):
        return  # the first shared append: the home's own log (maybe empty) starts the team's
    shared = store.get_bytes(LOG)
    path = log_path(home)
    if path.exists():
        local = path.read_bytes()
        try:
            check_prefix(parse_log(local, str(path)), parse_log(shared, LOG))
        except VerificationError:
            digest = hashlib.sha256(local).hexdigest()[:12]
            shutil.copy2(path, path.with_name(f"log.local-{digest}.jsonl"))
    atomic_write_bytes(path, shared)


def attest_shared(settings: Settings, statement: Statement, logged_at: str) -> Attested:
    """:func:`factory.transparency_log.attest` onto the team's log, published when it returns."""
    store = _store(settings)
    home, key_path = settings.home, settings.factory_key_path or factory_key_path(settings.home)
    with team_lock(settings.db_url):
        _check_key(store, key_path)
        _take_shared_log(store, home)
        attested = attest(home, statement, logged_at, key_path)
        predicate = statement.predicate
        folder = version_attestation_dir(home, predicate.name, predicate.version)
        for name in ATTESTATION_FILES:
            store.put_bytes(f"versions/{predicate.name}/{predicate.version}/{name}",
                            (folder / name).read_bytes())  # fmt: skip
        store.put_bytes(KEY_FILE, public_key_text(load_or_create_key(key_path).public_key()
                                                  ).encode("ascii"))  # fmt: skip
        store.put_bytes(LOG, attested.log_excerpt)  # last: this write commits the entry
    return attested


class TransparencyMirror:
    """A marketplace's copy of the team's log in ``folder`` (its ``<home>/transparency``),
    refreshed at most every ``every_s`` seconds when read. A shared log whose chain does not
    verify under the published key is not taken: the last good copy stays served."""

    def __init__(self, settings: Settings, folder: Path, every_s: float = 5.0):
        self.store, self.folder, self.every_s = _store(settings), Path(folder), every_s
        self._lock, self._last = threading.Lock(), float("-inf")

    def refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._last < self.every_s:
                return
            self._last = time.monotonic()
            try:
                self._copy()
            except (StorageError, VerificationError, ValueError) as exc:
                log.warning("transparency mirror: kept the last copy (%s)", exc)

    def _copy(self) -> None:
        if not (self.store.exists(LOG) and self.store.exists(KEY_FILE)):
            return
        key_text = self.store.get_bytes(KEY_FILE).decode("ascii")
        data = self.store.get_bytes(LOG)
        verify_chain(parse_log(data, LOG), load_public_key(key_text, KEY_FILE), LOG)
        versions: dict[str, list[str]] = {}
        for info in self.store.list("versions/"):
            folder, _, name = info.key.rpartition("/")
            versions.setdefault(folder, []).append(name)
        for folder, names in versions.items():
            target = self.folder / folder
            if set(names) >= set(ATTESTATION_FILES) and not verify_committed(target):
                with committed_dir(target, overwrite=True) as tmp:
                    for name in ATTESTATION_FILES:
                        atomic_write_bytes(tmp / name, self.store.get_bytes(f"{folder}/{name}"))
        atomic_write_text(self.folder / KEY_FILE, key_text)
        atomic_write_bytes(self.folder / LOG, data)  # last, as on the shared side
