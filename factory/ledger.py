"""The ledger: contributors and their keys, and their reward shares per cycle.

A cycle's shares are recorded under its cycle key (``<commission_id>/cycle-<n>``) and the sha256
of the adapter it produced; the marketplace (:mod:`marketplace.licensing`, its tables in the same
database) maps a registered version to its commission's cycles when it splits revenue.

SQLAlchemy on SQLite by default (``Settings.db_url``); a PostgreSQL URL works through settings.
Every write is one transaction. Money and shares are stored as exact decimal strings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Engine, ForeignKey, String, UniqueConstraint, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from infra.migrations import upgrade_head


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class Contributor(Base):
    __tablename__ = "contributors"

    contributor_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    public_key_b64: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="line")  # line | external
    created_at: Mapped[datetime] = mapped_column(default=_now)


class RewardShare(Base):
    """A contributor's share of one cycle's reward pool, against the expert version it produced."""

    __tablename__ = "reward_shares"
    __table_args__ = (UniqueConstraint("expert_id", "cycle_key", "contributor_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(String(128), index=True)
    cycle_key: Mapped[str] = mapped_column(String(128))
    expert_version: Mapped[str] = mapped_column(String(128), default="")
    contributor_id: Mapped[str] = mapped_column(ForeignKey("contributors.contributor_id"))
    share: Mapped[str] = mapped_column(String(64))  # exact decimal string in [0, 1]
    score: Mapped[float] = mapped_column(default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Ledger:
    def __init__(self, url: str):
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args)
        upgrade_head(self.engine)  # alembic migrations (infra/migrations), not create_all

    def register_contributor(self, contributor_id: str, public_key_b64: str, kind: str = "line"):
        """Registers a key; re-registering the same key is a no-op, a different key is refused."""
        with Session(self.engine) as session, session.begin():
            existing = session.get(Contributor, contributor_id)
            if existing is None:
                session.add(
                    Contributor(
                        contributor_id=contributor_id, public_key_b64=public_key_b64, kind=kind
                    )
                )
            elif existing.public_key_b64 != public_key_b64:
                raise ValueError(f"contributor {contributor_id} is registered with another key")

    def public_key(self, contributor_id: str) -> str | None:
        with Session(self.engine) as session:
            row = session.get(Contributor, contributor_id)
            return row.public_key_b64 if row else None

    def record_shares(
        self,
        expert_id: str,
        cycle_key: str,
        shares: dict[str, Decimal],
        scores: dict[str, float],
        expert_version: str = "",
    ) -> None:
        """Records one cycle's shares; idempotent for the same (expert, cycle, contributor)."""
        with Session(self.engine) as session, session.begin():
            for contributor_id, share in shares.items():
                stmt = select(RewardShare).where(
                    RewardShare.expert_id == expert_id,
                    RewardShare.cycle_key == cycle_key,
                    RewardShare.contributor_id == contributor_id,
                )
                if session.scalars(stmt).first() is None:
                    session.add(
                        RewardShare(
                            expert_id=expert_id,
                            cycle_key=cycle_key,
                            expert_version=expert_version,
                            contributor_id=contributor_id,
                            share=str(share),
                            score=float(scores.get(contributor_id, 0.0)),
                        )
                    )

    def shares_for(self, expert_id: str) -> list[RewardShare]:
        with Session(self.engine) as session:
            stmt = select(RewardShare).where(RewardShare.expert_id == expert_id)
            return list(session.scalars(stmt))
