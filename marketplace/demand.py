"""The demand board: domains buyers asked for that the library did not cover.

A catalog search that found nothing, or a library match where no expert beat the base, records
its domain words (:func:`evaluation.match_sample.domain_words`: frequent content words through a
stop list, never the buyer's text or query as written) as one row per word. The readiness page
shows the words most often asked for, so contributors see where to train next. The table lives
in the ledger database beside the licences.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from factory.ledger import Base

DEMAND_SOURCES = ("search", "match")


class DemandWord(Base):
    __tablename__ = "demand_words"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    word: Mapped[str] = mapped_column(String(24), index=True)
    source: Mapped[str] = mapped_column(String(16))  # search | match
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))


class DemandBoard:
    def __init__(self, engine: Engine):
        self.engine = engine
        DemandWord.__table__.create(engine, checkfirst=True)

    def record(self, words: list[str], source: str) -> None:
        """One row per word; a word longer than 24 characters or with anything but letters
        is not a domain word and is refused (ValueError), so no text can slip in."""
        if source not in DEMAND_SOURCES:
            raise ValueError(f"source: use one of {DEMAND_SOURCES}, got {source!r}")
        bad = [w for w in words if not (w.isalpha() and w.islower() and len(w) <= 24)]
        if bad:
            raise ValueError(f"words: {bad[:3]} are not lower-case domain words")
        if not words:
            return
        with Session(self.engine) as session, session.begin():
            session.add_all(DemandWord(word=w, source=source) for w in words)

    def domains(self, limit: int = 20) -> list[tuple[str, int]]:
        """(word, times asked), most asked first, ties alphabetical."""
        count = func.count(DemandWord.id)
        stmt = (
            select(DemandWord.word, count)
            .group_by(DemandWord.word)
            .order_by(count.desc(), DemandWord.word)
            .limit(limit)
        )
        with Session(self.engine) as session:
            return [(word, int(n)) for word, n in session.execute(stmt)]
