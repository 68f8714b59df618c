"""Licences, API keys, usage metering, invoices, downloads and revenue statements.

The tables (:mod:`marketplace.licence_tables`) live in the ledger database, beside the factory's
contributor ledger (:mod:`factory.ledger`); this buyer side belongs to the marketplace. Three
licence kinds exist:

- ``usage``: the buyer calls the completions API with an API key; every generated token is
  metered against the expert (and version) that routed it, billed at the expert's per-token price;
- ``weight``: a one-time fee plus a yearly maintenance fee; the buyer downloads the weight bundle;
- ``exclusive``: a premium that makes the expert private to the buyer.

Money is :class:`~decimal.Decimal`, stored as exact decimal strings, never float. API keys are
stored as ``sha256(salt || secret)`` with a per-key random salt and compared in constant time.

Revenue (usage charges and fees) of an expert version is split among the contributors of the
cycles that produced that version (:meth:`Licensing.contributor_shares`), in proportion to
their shares, by the largest remainder method at the cent (:func:`split_cents`), so a statement
sums exactly to revenue.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from factory.ledger import Ledger
from marketplace.licence_tables import (
    ApiKey,
    Buyer,
    BuyerSession,
    Charge,
    DownloadLog,
    ExpertGrantLock,
    Invoice,
    InvoiceLine,
    KeyRecord,
    Licence,
    UsageRecord,
    period_of,
    utc_now,
)

__all__ = [
    "KEY_REFUSALS", "LICENCE_KINDS", "UNALLOCATED", "ApiKey", "Buyer", "Charge", "DownloadLog",
    "Invoice", "InvoiceLine", "KeyRecord", "Licence", "Licensing", "UsageRecord", "period_of",
    "split_cents",
]  # fmt: skip

CENT = Decimal("0.01")
LICENCE_KINDS = ("usage", "weight", "exclusive")
# Why a key was refused; the API answers 401 with one of these.
KEY_REFUSALS = ("missing", "malformed", "unknown", "mismatch", "revoked")
UNALLOCATED = "unallocated"


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


def split_cents(amount: Decimal, shares: dict[str, Decimal]) -> dict[str, Decimal]:
    """Splits ``amount`` (rounded to the cent) in proportion to ``shares`` by largest remainder.

    Each party first gets floor(cents * share / total) cents; the cents left over go one each to
    the parties with the largest fractional remainders (ties broken by party name), so the parts
    are whole cents and sum exactly to the rounded amount. Parties with zero share get zero.
    """
    cents = int((amount.quantize(CENT, rounding=ROUND_HALF_UP) / CENT).to_integral_value())
    total = sum(shares.values(), Decimal(0))
    if total <= 0:
        raise ValueError("shares: at least one share must be positive")
    if any(value < 0 for value in shares.values()):
        raise ValueError("shares: every share must be >= 0")
    exact = {party: Decimal(cents) * value / total for party, value in shares.items()}
    floors = {party: int(value) for party, value in exact.items()}
    left = cents - sum(floors.values())
    order = sorted(shares, key=lambda party: (-(exact[party] - floors[party]), party))
    for party in order[:left]:
        floors[party] += 1
    return {party: Decimal(count) * CENT for party, count in floors.items()}


def _bump_sessions(session: Session, buyer_id: str) -> int:
    bump = (
        update(BuyerSession)
        .where(BuyerSession.buyer_id == buyer_id)
        .values(version=BuyerSession.version + 1)
    )
    if not session.execute(bump).rowcount:
        try:
            with session.begin_nested():
                session.execute(insert(BuyerSession).values(buyer_id=buyer_id, version=1))
        except IntegrityError:  # a concurrent first sign-out made the row
            session.execute(bump)
    return session.scalars(
        select(BuyerSession.version).where(BuyerSession.buyer_id == buyer_id)
    ).one()


def _lock_expert(session: Session, expert_name: str) -> None:
    """Takes the expert's grant lock for the rest of the transaction (created on first use)."""
    bump = (
        update(ExpertGrantLock)
        .where(ExpertGrantLock.expert_name == expert_name)
        .values(grants=ExpertGrantLock.grants + 1)
    )
    if session.execute(bump).rowcount:
        return
    try:
        with session.begin_nested():
            session.execute(insert(ExpertGrantLock).values(expert_name=expert_name, grants=1))
    except IntegrityError:  # created by a concurrent first grant: wait on its row lock
        session.execute(bump)


class Licensing:
    """Buyers, keys, licences, metering and statements over the ledger's database."""

    def __init__(
        self,
        ledger: Ledger,
        commission_of: Callable[[str, str], str | None] | None = None,
        parent_of: Callable[[str, str], tuple[str, str, Decimal] | None] | None = None,
    ):
        """``commission_of(expert_name, version)`` names the commission that produced a
        registered version (its ``commission_id`` tag), or None when unknown;
        ``parent_of(expert_name, version)`` its warm start's (parent name, parent version,
        parent share) from its ``parent_*`` tags, or None for a version trained from the base."""
        self.ledger = ledger
        self.commission_of = commission_of
        self.parent_of = parent_of
        self.engine = ledger.engine
        # The licensing tables come with the ledger's database: Ledger() upgrades it to the
        # newest migration (infra/migrations), which creates them.
        for index in Licence.__table__.indexes:  # tables made before the indexes existed
            index.create(self.engine, checkfirst=True)

    # buyers and keys -------------------------------------------------------------------------
    def create_buyer(self, name: str) -> str:
        if not name.strip() or len(name) > 128:
            raise ValueError("name: give a buyer name of 1 to 128 characters")
        buyer_id = "b_" + secrets.token_hex(8)
        with Session(self.engine) as session, session.begin():
            session.add(Buyer(buyer_id=buyer_id, name=name.strip()))
        return buyer_id

    def buyer_name(self, buyer_id: str) -> str | None:
        with Session(self.engine) as session:
            row = session.get(Buyer, buyer_id)
            return row.name if row else None

    def session_version(self, buyer_id: str) -> int | None:
        """The buyer's current session version (0 before any was ended); None: no buyer."""
        with Session(self.engine) as session:
            if session.get(Buyer, buyer_id) is None:
                return None
            row = session.get(BuyerSession, buyer_id)
            return row.version if row else 0

    def end_sessions(self, buyer_id: str) -> int:
        """Ends every session of the buyer; returns the new session version."""
        with Session(self.engine) as session, session.begin():
            return _bump_sessions(session, buyer_id)

    def issue_key(self, buyer_id: str) -> str:
        """Returns a new API key ``taas_<key_id>_<secret>``; only its salted hash is stored."""
        if self.buyer_name(buyer_id) is None:
            raise ValueError(f"buyer_id: no buyer {buyer_id}")
        key_id, secret, salt = (
            secrets.token_hex(8),
            secrets.token_urlsafe(24),
            secrets.token_hex(16),
        )
        with Session(self.engine) as session, session.begin():
            session.add(
                ApiKey(
                    key_id=key_id,
                    buyer_id=buyer_id,
                    salt=salt,
                    secret_sha256=hash_secret(salt, secret),
                )
            )
        return f"taas_{key_id}_{secret}"

    def revoke_key(self, key_id: str) -> None:
        """Revokes a key and ends every session of its buyer (one signed in with a leaked key
        included)."""
        with Session(self.engine) as session, session.begin():
            row = session.get(ApiKey, key_id)
            if row is None:
                raise ValueError(f"key_id: no key {key_id}")
            row.revoked_at = row.revoked_at or utc_now()
            _bump_sessions(session, row.buyer_id)

    def authenticate(self, presented: str | None) -> tuple[str, str] | str:
        """Returns (buyer_id, key_id) for a valid key, else a reason from ``KEY_REFUSALS``."""
        if not presented:
            return "missing"
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != "taas" or len(parts[1]) != 16 or not parts[2]:
            return "malformed"
        with Session(self.engine) as session:
            row = session.get(ApiKey, parts[1])
            if row is None:
                return "unknown"
            if not hmac.compare_digest(hash_secret(row.salt, parts[2]), row.secret_sha256):
                return "mismatch"
            if row.revoked_at is not None:
                return "revoked"
            return row.buyer_id, row.key_id

    def keys_of(self, buyer_id: str) -> list[KeyRecord]:
        """Every key of a buyer, oldest first (never the secret)."""
        with Session(self.engine) as session:
            stmt = (
                select(ApiKey)
                .where(ApiKey.buyer_id == buyer_id)
                .order_by(ApiKey.created_at, ApiKey.key_id)
            )
            return [KeyRecord(k.key_id, k.created_at, k.revoked_at) for k in session.scalars(stmt)]

    # licences ---------------------------------------------------------------------------------
    def grant(
        self,
        buyer_id: str,
        expert_name: str,
        expert_version: str,
        kind: str,
        price_per_token: Decimal = Decimal(0),
        fee: Decimal = Decimal(0),
        maintenance_fee: Decimal = Decimal(0),
        at: datetime | None = None,
    ) -> int:
        """Grants a licence and books its fees; returns the licence id.

        ``weight`` books ``fee`` (one time) and the first year's ``maintenance_fee``;
        ``exclusive`` books ``fee`` as the premium and is refused while another buyer holds an
        active licence on the expert. A buyer who already holds an active licence of this kind
        gets that licence's id back and is charged nothing more (a repeated click, a retried
        request). Grants on one expert are serialized by its :class:`ExpertGrantLock` row, and
        the unique indexes on :class:`Licence` refuse what the lock would have; a refused buyer
        is told (ValueError) and charged nothing: the whole transaction rolls back.
        """
        if kind not in LICENCE_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(LICENCE_KINDS)}, not {kind!r}")
        if self.buyer_name(buyer_id) is None:
            raise ValueError(f"buyer_id: no buyer {buyer_id}")
        at = at or utc_now()
        fees = {
            "weight": [("weight_fee", fee), ("maintenance", maintenance_fee)],
            "exclusive": [("exclusive_premium", fee)],
        }
        try:
            with Session(self.engine) as session, session.begin():
                _lock_expert(session, expert_name)
                active = session.scalars(
                    select(Licence).where(
                        Licence.expert_name == expert_name, Licence.revoked_at.is_(None)
                    )
                ).all()
                mine = [lic for lic in active if lic.buyer_id == buyer_id and lic.kind == kind]
                if mine:
                    return mine[0].licence_id
                owner = next((lic.buyer_id for lic in active if lic.kind == "exclusive"), None)
                if owner is not None and owner != buyer_id:
                    raise ValueError(f"expert_name: {expert_name} is licensed exclusively")
                if kind == "exclusive" and any(lic.buyer_id != buyer_id for lic in active):
                    raise ValueError(f"kind: {expert_name} has other licensees; exclusive refused")
                licence = Licence(
                    buyer_id=buyer_id,
                    expert_name=expert_name,
                    kind=kind,
                    price_per_token=str(price_per_token),
                    created_at=at,
                )
                session.add(licence)
                session.flush()
                for item, amount in fees.get(kind, []):
                    if amount > 0:
                        session.add(
                            Charge(
                                buyer_id=buyer_id,
                                licence_id=licence.licence_id,
                                expert_name=expert_name,
                                expert_version=expert_version,
                                item=item,
                                amount=str(amount),
                                period=period_of(at),
                                created_at=at,
                            )
                        )
                return licence.licence_id
        except IntegrityError:
            # Only reachable if something bypassed the lock; the constraint still decides.
            raise ValueError(
                f"expert_name: {expert_name} was licensed by someone else meanwhile; nothing "
                "was charged"
            ) from None

    def renew_maintenance(
        self, licence_id: int, expert_version: str, amount: Decimal, at: datetime | None = None
    ) -> None:
        """Books one more year of maintenance on a weight licence."""
        at = at or utc_now()
        with Session(self.engine) as session, session.begin():
            licence = session.get(Licence, licence_id)
            if licence is None or licence.kind != "weight":
                raise ValueError(f"licence_id: {licence_id} is not a weight licence")
            session.add(
                Charge(
                    buyer_id=licence.buyer_id,
                    licence_id=licence_id,
                    expert_name=licence.expert_name,
                    expert_version=expert_version,
                    item="maintenance",
                    amount=str(amount),
                    period=period_of(at),
                    created_at=at,
                )
            )

    def licences_of(self, buyer_id: str) -> list[Licence]:
        with Session(self.engine) as session:
            stmt = select(Licence).where(Licence.buyer_id == buyer_id, Licence.revoked_at.is_(None))
            return list(session.scalars(stmt))

    def holds(self, buyer_id: str, expert_name: str, kinds: tuple[str, ...]) -> bool:
        return any(
            lic.expert_name == expert_name and lic.kind in kinds
            for lic in self.licences_of(buyer_id)
        )

    def exclusive_owner(self, expert_name: str) -> str | None:
        with Session(self.engine) as session:
            stmt = select(Licence.buyer_id).where(
                Licence.expert_name == expert_name,
                Licence.kind == "exclusive",
                Licence.revoked_at.is_(None),
            )
            return session.scalars(stmt).first()

    def exclusive_experts(self) -> dict[str, str]:
        """expert name -> buyer id for every active exclusive licence."""
        with Session(self.engine) as session:
            stmt = select(Licence).where(Licence.kind == "exclusive", Licence.revoked_at.is_(None))
            return {lic.expert_name: lic.buyer_id for lic in session.scalars(stmt)}

    # metering ---------------------------------------------------------------------------------
    def meter(
        self,
        key_id: str,
        buyer_id: str,
        routed: dict[tuple[str, str], int],
        prices: dict[str, Decimal],
        at: datetime | None = None,
    ) -> None:
        """Records one call's tokens per (expert, version) in one transaction."""
        at = at or utc_now()
        with Session(self.engine) as session, session.begin():
            for (expert_name, version), tokens in sorted(routed.items()):
                if tokens <= 0:
                    continue
                session.add(
                    UsageRecord(
                        key_id=key_id,
                        buyer_id=buyer_id,
                        expert_name=expert_name,
                        expert_version=version,
                        tokens=tokens,
                        price_per_token=str(prices[expert_name]),
                        period=period_of(at),
                        created_at=at,
                    )
                )

    def usage(self, buyer_id: str, period: str | None = None) -> dict[tuple[str, str], int]:
        """Tokens per (expert, version) metered for a buyer, over one period or all time."""
        with Session(self.engine) as session:
            stmt = select(UsageRecord).where(UsageRecord.buyer_id == buyer_id)
            if period:
                stmt = stmt.where(UsageRecord.period == period)
            totals: dict[tuple[str, str], int] = {}
            for row in session.scalars(stmt):
                key = (row.expert_name, row.expert_version)
                totals[key] = totals.get(key, 0) + row.tokens
            return totals

    def invoice(self, buyer_id: str, period: str) -> Invoice:
        """Usage lines (tokens x price, rounded to the cent half-up) and fees booked in a period."""
        lines: list[InvoiceLine] = []
        with Session(self.engine) as session:
            usage = session.scalars(
                select(UsageRecord).where(
                    UsageRecord.buyer_id == buyer_id, UsageRecord.period == period
                )
            )
            grouped: dict[tuple[str, str, str], int] = {}
            for row in usage:
                key = (row.expert_name, row.expert_version, row.price_per_token)
                grouped[key] = grouped.get(key, 0) + row.tokens
            for (name, version, price), tokens in sorted(grouped.items()):
                amount = (tokens * Decimal(price)).quantize(CENT, rounding=ROUND_HALF_UP)
                lines.append(InvoiceLine(name, version, "usage", tokens, Decimal(price), amount))
            charges = session.scalars(
                select(Charge).where(Charge.buyer_id == buyer_id, Charge.period == period)
            )
            for charge in charges:
                amount = Decimal(charge.amount).quantize(CENT, rounding=ROUND_HALF_UP)
                lines.append(
                    InvoiceLine(
                        charge.expert_name, charge.expert_version, charge.item, 0, amount, amount
                    )
                )
        return Invoice(buyer_id=buyer_id, period=period, lines=lines)

    # downloads --------------------------------------------------------------------------------
    def log_download(
        self, buyer_id: str, expert_name: str, version: str, bundle_sha256: str, client: str
    ) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(
                DownloadLog(
                    buyer_id=buyer_id,
                    expert_name=expert_name,
                    expert_version=version,
                    bundle_sha256=bundle_sha256,
                    client=client[:128],
                )
            )

    def downloads_of(self, buyer_id: str) -> list[DownloadLog]:
        with Session(self.engine) as session:
            stmt = select(DownloadLog).where(DownloadLog.buyer_id == buyer_id)
            return list(session.scalars(stmt))

    # revenue ----------------------------------------------------------------------------------
    def revenue(self, period: str | None = None) -> dict[tuple[str, str], Decimal]:
        """Billed revenue per (expert, version): every buyer's invoice lines, cents exact."""
        with Session(self.engine) as session:
            buyers = list(session.scalars(select(Buyer.buyer_id)))
            periods = (
                [period]
                if period
                else sorted(
                    set(session.scalars(select(UsageRecord.period)))
                    | set(session.scalars(select(Charge.period)))
                )
            )
        totals: dict[tuple[str, str], Decimal] = {}
        for buyer_id in buyers:
            for each in periods:
                for line in self.invoice(buyer_id, each).lines:
                    key = (line.expert_name, line.expert_version)
                    totals[key] = totals.get(key, Decimal("0.00")) + line.amount
        return totals

    def contributor_shares(
        self, expert_name: str, version: str, depth: int = 0
    ) -> dict[str, Decimal]:
        """Contributors' shares of an expert version, summed per contributor over the cycles
        that produced it: the cycles of the commission that registered the version (cycle keys
        ``<commission_id>/cycle-<n>``; the cycles record the adapter sha256 they merged, never
        the registry's version number), and any cycle recorded under the version itself.
        Cycles of other versions never count; a version none name is unallocated.

        A warm-started version (``parent_of``) gives its parent's contributors the parent share
        s: each side is normalized to 1 and the result is (1 - s) * own + s * parent's (the
        parent's own shares, recursively, so grandparents keep theirs); an own side with no
        shares leaves its (1 - s) unallocated."""
        own = self._own_shares(expert_name, version)
        parent = self.parent_of(expert_name, version) if self.parent_of and depth < 8 else None
        inherited = self.contributor_shares(*parent[:2], depth + 1) if parent else {}
        if not inherited:
            return own
        share = parent[2]
        mixed: dict[str, Decimal] = {}
        for side, weight in ((own or {UNALLOCATED: Decimal(1)}, 1 - share), (inherited, share)):
            total = sum(side.values(), Decimal(0))
            for who, value in side.items():
                mixed[who] = mixed.get(who, Decimal(0)) + weight * value / total
        return {who: value for who, value in mixed.items() if value > 0}

    def _own_shares(self, expert_name: str, version: str) -> dict[str, Decimal]:
        commission = self.commission_of(expert_name, version) if self.commission_of else None
        chosen = [
            row
            for row in self.ledger.shares_for(expert_name)
            if row.expert_version == version
            or (commission and row.cycle_key.startswith(commission + "/"))
        ]
        shares: dict[str, Decimal] = {}
        for row in chosen:
            shares[row.contributor_id] = shares.get(row.contributor_id, Decimal(0)) + Decimal(
                row.share
            )
        return {who: value for who, value in shares.items() if value > 0}

    def statements(self, period: str | None = None) -> dict[str, dict[tuple[str, str], Decimal]]:
        """contributor -> (expert, version) -> amount; an expert version with no recorded shares
        goes to ``UNALLOCATED``. For each version the parts sum exactly to its revenue."""
        result: dict[str, dict[tuple[str, str], Decimal]] = {}
        for (name, version), amount in sorted(self.revenue(period).items()):
            if amount == 0:
                continue
            shares = self.contributor_shares(name, version) or {UNALLOCATED: Decimal(1)}
            for who, part in split_cents(amount, shares).items():
                result.setdefault(who, {})[(name, version)] = part
        return result

    def statement(self, contributor_id: str, period: str | None = None) -> dict:
        lines = self.statements(period).get(contributor_id, {})
        return {
            "contributor": contributor_id,
            "period": period or "all",
            "lines": [
                {"expert": name, "version": version, "amount": str(amount)}
                for (name, version), amount in sorted(lines.items())
            ],
            "total": str(sum(lines.values(), Decimal("0.00"))),
        }
