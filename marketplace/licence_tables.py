"""The licensing ledger's tables and the values read from them.

Buyers, their session versions and API keys (salted sha256 of the secret, never the secret),
licences (with the unique indexes that make one active exclusive licence per expert and one
active licence of a kind per buyer and expert a property of the database), metered usage,
fees (charges), downloads, and the per-expert grant lock row. Declared on
:class:`factory.ledger.Base`, so they live in the ledger's database; the rules over them are in
:mod:`marketplace.licensing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from factory.ledger import Base


def utc_now() -> datetime:
    return datetime.now(UTC)


def period_of(moment: datetime) -> str:
    """The billing period of a moment: its calendar month, ``YYYY-MM`` (UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m") if moment.tzinfo else moment.strftime("%Y-%m")


class Buyer(Base):
    __tablename__ = "buyers"

    buyer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class BuyerSession(Base):
    """A buyer's session version: every session cookie is signed at the version it was opened
    at, so raising it (sign-out, a revoked key) ends them all at once."""

    __tablename__ = "buyer_sessions"

    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.buyer_id"), primary_key=True)
    version: Mapped[int] = mapped_column(default=1)


class ExpertGrantLock(Base):
    """One row per licensed expert, updated first in every grant: the row lock (PostgreSQL) or
    the write lock it takes (SQLite) serializes grants on one expert, so the checks that follow
    see every grant committed before."""

    __tablename__ = "expert_grant_locks"

    expert_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    grants: Mapped[int] = mapped_column(default=0)


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.buyer_id"), index=True)
    salt: Mapped[str] = mapped_column(String(64))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


_ACTIVE = text("revoked_at IS NULL")
_ACTIVE_EXCLUSIVE = text("kind = 'exclusive' AND revoked_at IS NULL")


class Licence(Base):
    __tablename__ = "licences"
    # The database's own guarantees, whatever the code above them does: one active exclusive
    # licence per expert, and one active licence of a kind per buyer and expert (so a repeated
    # purchase can never book its fee twice).
    __table_args__ = (
        Index("uq_licence_exclusive", "expert_name", unique=True,
              sqlite_where=_ACTIVE_EXCLUSIVE, postgresql_where=_ACTIVE_EXCLUSIVE),
        Index("uq_licence_active", "buyer_id", "expert_name", "kind", unique=True,
              sqlite_where=_ACTIVE, postgresql_where=_ACTIVE),
    )  # fmt: skip

    licence_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.buyer_id"), index=True)
    expert_name: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    price_per_token: Mapped[str] = mapped_column(String(64), default="0")
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class UsageRecord(Base):
    """Tokens one API call generated through one expert version, at the price then in force."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.key_id"), index=True)
    buyer_id: Mapped[str] = mapped_column(String(64), index=True)
    expert_name: Mapped[str] = mapped_column(String(128))
    expert_version: Mapped[str] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column()
    price_per_token: Mapped[str] = mapped_column(String(64))
    period: Mapped[str] = mapped_column(String(7), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Charge(Base):
    """A fee owed by a buyer: weight licence, yearly maintenance or exclusive premium."""

    __tablename__ = "charges"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    buyer_id: Mapped[str] = mapped_column(String(64), index=True)
    licence_id: Mapped[int] = mapped_column(ForeignKey("licences.licence_id"))
    expert_name: Mapped[str] = mapped_column(String(128))
    expert_version: Mapped[str] = mapped_column(String(32))
    item: Mapped[str] = mapped_column(String(32))  # weight_fee | maintenance | exclusive_premium
    amount: Mapped[str] = mapped_column(String(64))
    period: Mapped[str] = mapped_column(String(7), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class DownloadLog(Base):
    __tablename__ = "downloads"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    buyer_id: Mapped[str] = mapped_column(String(64), index=True)
    expert_name: Mapped[str] = mapped_column(String(128))
    expert_version: Mapped[str] = mapped_column(String(32))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


@dataclass(frozen=True)
class KeyRecord:
    """What a buyer may see of one API key: never its secret."""

    key_id: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def prefix(self) -> str:
        """The public start of the key, ``taas_<key_id>_``: enough to recognise it."""
        return f"taas_{self.key_id}_"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class InvoiceLine:
    expert_name: str
    expert_version: str
    item: str  # usage | weight_fee | maintenance | exclusive_premium
    tokens: int
    unit_price: Decimal
    amount: Decimal  # exact; usage is tokens * unit_price, rounded to the cent half-up


@dataclass(frozen=True)
class Invoice:
    buyer_id: str
    period: str
    lines: list[InvoiceLine]

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal("0.00"))
