"""The registration claim table: exactly one registration per idempotency key, across machines.

Concurrent registrations of one result race to insert a row keyed by the result's idempotency
key (sha256 of commission id + adapter sha256) in the factory database (``settings.db_url``,
SQLAlchemy). The primary key makes exactly one winner whether the MLflow store is embedded
SQLite or a server shared by many machines. The winner settles the row with the version it
created (or deletes it on failure); a claim left unsettled by a crashed winner is taken over
after ``stale_s`` seconds.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from sqlalchemy import String, create_engine, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from infra.migrations import upgrade_head


class _Base(DeclarativeBase):
    pass


class RegistrationClaim(_Base):
    __tablename__ = "library_registration_claims"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    claimed_at: Mapped[float]
    version: Mapped[str | None] = mapped_column(String(32), default=None)


class ClaimTable:
    """Claims on idempotency keys in the database at ``db_url`` (created when missing)."""

    def __init__(self, db_url: str, stale_s: float):
        self.stale_s = stale_s
        connect_args = {"timeout": 60} if db_url.startswith("sqlite") else {}
        if db_url.startswith("sqlite:///"):
            Path(db_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_engine(db_url, connect_args=connect_args)
        upgrade_head(self._engine)  # alembic migrations (infra/migrations), not create_all

    def claim(self, key: str) -> str | None:
        """Inserts the claim row; returns the owner token when this caller won, else None."""
        owner = uuid.uuid4().hex
        try:
            with Session(self._engine) as session, session.begin():
                session.add(RegistrationClaim(key=key, owner=owner, claimed_at=time.time()))
            return owner
        except IntegrityError:
            pass  # another registration holds the key: take over only a stale, unfinished claim
        with Session(self._engine) as session, session.begin():
            row = session.get(RegistrationClaim, key)
            if row is None or row.version is not None:
                return None
            if time.time() - row.claimed_at < self.stale_s:
                return None
            taken = session.execute(
                update(RegistrationClaim)
                .where(RegistrationClaim.key == key, RegistrationClaim.owner == row.owner)
                .values(owner=owner, claimed_at=time.time())
            )
            return owner if taken.rowcount == 1 else None

    def settle(self, key: str, owner: str, version: str | None) -> None:
        """Records the version the owner created, or releases the claim (``version`` None)."""
        with Session(self._engine) as session, session.begin():
            where = (RegistrationClaim.key == key, RegistrationClaim.owner == owner)
            if version is None:
                session.execute(delete(RegistrationClaim).where(*where))
            else:
                session.execute(update(RegistrationClaim).where(*where).values(version=version))
