"""The commission register: one row per commission, its state machine and a timestamp per state.

SQLAlchemy on ``Settings.db_url`` (SQLite by default; a PostgreSQL URL works through settings),
table ``commissions``. ``commission_id`` is ``"c-"`` + the first 12 hex digits of
sha256(spec_sha256 ":" dataset_sha256), so submitting the same spec over the same data is
idempotent. States move only along::

    submitted -> validated -> running -> registered | failed | cancelled
    running -> running (a resumed run);  failed -> running (a retried run);
    submitted | validated -> failed | cancelled

Table ``customers`` records each customer once: ``customer_id`` (:func:`factory.customer.
customer_id_for`, derived from the name, so it is the same on every machine and database) and the
name as first submitted. A commission's expert belongs to that id (see :mod:`factory.customer`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, String, Text, create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from factory.commission import CommissionSpec
from factory.customer import customer_id_for
from infra.migrations import upgrade_head

STATES = ("submitted", "validated", "running", "registered", "failed", "cancelled")
TRANSITIONS: dict[str, frozenset[str]] = {
    "submitted": frozenset({"validated", "failed", "cancelled"}),
    "validated": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"running", "registered", "failed", "cancelled"}),
    "registered": frozenset(),
    # A failure may be the factory's own (a lost worker, an unreachable store): retrying resumes
    # from the committed steps, so failed is not final.
    "failed": frozenset({"running"}),
    "cancelled": frozenset(),
}


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class CommissionRow(Base):
    __tablename__ = "commissions"

    commission_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    spec_sha256: Mapped[str] = mapped_column(String(64), index=True)
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    customer: Mapped[str] = mapped_column(String(200))
    domain: Mapped[str] = mapped_column(String(64), index=True)
    spec_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    submitted_at: Mapped[datetime] = mapped_column(default=_now)
    validated_at: Mapped[datetime | None] = mapped_column(nullable=True)
    running_at: Mapped[datetime | None] = mapped_column(nullable=True)
    registered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=_now)


class CustomerRow(Base):
    __tablename__ = "customers"

    customer_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=_now)


@dataclass(frozen=True)
class CommissionRecord:
    """A commission as stored; ``timestamps`` maps each state reached to when (UTC)."""

    commission_id: str
    spec_sha256: str
    dataset_sha256: str
    customer: str
    domain: str
    spec_json: str
    state: str
    detail: str | None
    timestamps: dict[str, datetime]
    updated_at: datetime

    def spec(self) -> CommissionSpec:
        return CommissionSpec.model_validate_json(self.spec_json)

    @property
    def customer_id(self) -> str:
        return customer_id_for(self.customer)


def commission_id_for(spec_sha256: str, dataset_sha256: str) -> str:
    return "c-" + hashlib.sha256(f"{spec_sha256}:{dataset_sha256}".encode()).hexdigest()[:12]


def _utc(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; they were written as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _record(row: CommissionRow) -> CommissionRecord:
    stamps = {s: _utc(getattr(row, f"{s}_at")) for s in STATES}
    return CommissionRecord(
        commission_id=row.commission_id,
        spec_sha256=row.spec_sha256,
        dataset_sha256=row.dataset_sha256,
        customer=row.customer,
        domain=row.domain,
        spec_json=row.spec_json,
        state=row.state,
        detail=row.detail,
        timestamps={s: t for s, t in stamps.items() if t is not None},
        updated_at=_utc(row.updated_at),
    )


class CommissionStore:
    def __init__(self, url: str):
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args)
        upgrade_head(self.engine)  # alembic migrations (infra/migrations), not create_all

    def submit(
        self, spec: CommissionSpec, spec_sha256: str, dataset_sha256: str
    ) -> CommissionRecord:
        """Records a new commission, or returns the existing one for the same two hashes."""
        commission_id = commission_id_for(spec_sha256, dataset_sha256)
        self._record_customer(spec.customer)
        with Session(self.engine) as session, session.begin():
            row = session.get(CommissionRow, commission_id)
            if row is None:
                row = CommissionRow(
                    commission_id=commission_id,
                    spec_sha256=spec_sha256,
                    dataset_sha256=dataset_sha256,
                    customer=spec.customer,
                    domain=spec.domain,
                    spec_json=spec.model_dump_json(),
                    state="submitted",
                )
                session.add(row)
                session.flush()
            return _record(row)

    def _record_customer(self, name: str) -> str:
        customer_id = customer_id_for(name)
        try:
            with Session(self.engine) as session, session.begin():
                if session.get(CustomerRow, customer_id) is None:
                    session.add(CustomerRow(customer_id=customer_id, name=name))
        except IntegrityError:
            pass  # a concurrent submit recorded the same customer: the row is there either way
        return customer_id

    def customers(self) -> dict[str, str]:
        """customer_id -> the name first submitted under it."""
        with Session(self.engine) as session:
            rows = session.scalars(select(CustomerRow).order_by(CustomerRow.created_at))
            return {r.customer_id: r.name for r in rows}

    def _row(self, session: Session, commission_id: str) -> CommissionRow:
        row = session.get(CommissionRow, commission_id)
        if row is None:
            raise ValueError(f"commission {commission_id!r} not found; see `taas commission list`")
        return row

    def set_state(self, commission_id: str, state: str, detail: str | None = None):
        """Moves a commission along an allowed transition; refuses any other."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: use one of {', '.join(STATES)}")
        with Session(self.engine) as session, session.begin():
            row = self._row(session, commission_id)
            if state not in TRANSITIONS[row.state]:
                allowed = ", ".join(sorted(TRANSITIONS[row.state])) or "none (final state)"
                raise ValueError(
                    f"commission {commission_id}: cannot go from {row.state} to {state}; "
                    f"allowed: {allowed}"
                )
            now = _now()
            row.state = state
            row.detail = detail
            row.updated_at = now
            if getattr(row, f"{state}_at") is None:
                setattr(row, f"{state}_at", now)
            session.flush()
            return _record(row)

    def get(self, commission_id: str) -> CommissionRecord:
        with Session(self.engine) as session:
            return _record(self._row(session, commission_id))

    def list(self) -> list[CommissionRecord]:
        with Session(self.engine) as session:
            rows = session.scalars(select(CommissionRow).order_by(CommissionRow.submitted_at))
            return [_record(r) for r in rows]

    def cancel(self, commission_id: str, detail: str = "cancelled by request") -> CommissionRecord:
        return self.set_state(commission_id, "cancelled", detail)
