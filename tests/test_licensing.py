"""Licensing ledger: keys, licences, exact metering, invoices and revenue statements."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import text

from factory.ledger import Ledger
from marketplace.licensing import KEY_REFUSALS, UNALLOCATED, Licensing, split_cents

JAN = datetime(2026, 1, 15, tzinfo=UTC)
FEB = datetime(2026, 2, 3, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")  # tests/pg.py: a real PostgreSQL server


@pytest.fixture
def licensing(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.register_contributor("alice", "a" * 44)
    ledger.register_contributor("bob", "b" * 44)
    ledger.register_contributor("carol", "c" * 44)
    # law-expert version 1: two cycles; shares summed per contributor -> alice 1.0, bob 0.5,
    # carol 0.5 (proportions 1/2, 1/4, 1/4).
    ledger.record_shares(
        "law-expert", "c1", {"alice": Decimal("0.5"), "bob": Decimal("0.5")}, {}, expert_version="1"
    )
    ledger.record_shares(
        "law-expert",
        "c2",
        {"alice": Decimal("0.5"), "carol": Decimal("0.5")},
        {},
        expert_version="1",
    )
    # med-expert: thirds, so cents do not divide evenly
    thirds = {"alice": Decimal(1), "bob": Decimal(1), "carol": Decimal(1)}
    ledger.record_shares("med-expert", "c1", thirds, {}, expert_version="2")
    return Licensing(ledger)


def test_split_cents_largest_remainder():
    assert split_cents(Decimal("1.00"), {"a": Decimal(1), "b": Decimal(1), "c": Decimal(1)}) == {
        "a": Decimal("0.34"),
        "b": Decimal("0.33"),
        "c": Decimal("0.33"),
    }
    parts = split_cents(
        Decimal("10.00"), {"x": Decimal("0.7"), "y": Decimal("0.2"), "z": Decimal("0.1")}
    )
    assert parts == {"x": Decimal("7.00"), "y": Decimal("2.00"), "z": Decimal("1.00")}
    assert split_cents(Decimal("0.05"), {"x": Decimal(1), "y": Decimal(0)})["y"] == 0
    rng = random.Random(0)
    for _ in range(200):
        amount = Decimal(rng.randint(0, 10**7)) / 100
        shares = {f"p{i}": Decimal(rng.randint(0, 1000)) / 7 for i in range(rng.randint(1, 9))}
        shares["p0"] += 1
        parts = split_cents(amount, shares)
        assert sum(parts.values()) == amount
        assert all(p == p.quantize(Decimal("0.01")) and p >= 0 for p in parts.values())
    with pytest.raises(ValueError, match="shares"):
        split_cents(Decimal(1), {"a": Decimal(0)})


def test_key_refusal_reasons(licensing):
    buyer = licensing.create_buyer("Acme")
    key = licensing.issue_key(buyer)
    key_id = key.split("_")[1]
    assert licensing.authenticate(key) == (buyer, key_id)
    wrong = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    seen = {
        "missing": licensing.authenticate(None),
        "malformed": licensing.authenticate("sk-not-ours"),
        "unknown": licensing.authenticate(f"taas_{'0' * 16}_secret"),
        "mismatch": licensing.authenticate(wrong),
    }
    licensing.revoke_key(key_id)
    seen["revoked"] = licensing.authenticate(key)
    assert seen == {reason: reason for reason in KEY_REFUSALS}
    with pytest.raises(ValueError, match="buyer_id"):
        licensing.issue_key("b_nobody")
    with pytest.raises(ValueError, match="name"):
        licensing.create_buyer("  ")


def test_secret_is_stored_hashed(licensing, ledger_url, tmp_path):
    buyer = licensing.create_buyer("Acme")
    key = licensing.issue_key(buyer)
    secret = key.split("_", 2)[2]
    with licensing.engine.connect() as connection:
        stored = [str(row) for row in connection.execute(text("SELECT * FROM api_keys"))]
    assert len(stored) == 1 and secret not in stored[0] and key.split("_")[1] in stored[0]
    if ledger_url.startswith("sqlite"):
        assert secret.encode() not in (tmp_path / "ledger.db").read_bytes()


def test_metering_is_exact_and_invoices_price_it(licensing):
    buyer = licensing.create_buyer("Acme")
    key_id = licensing.issue_key(buyer).split("_")[1]
    price = {"law-expert": Decimal("0.0003"), "med-expert": Decimal("0.0007")}
    rng = random.Random(1)
    calls = [(rng.randint(1, 64), rng.randint(0, 64)) for _ in range(57)]
    for law, med in calls:
        routed = {("law-expert", "1"): law, ("med-expert", "2"): med}
        licensing.meter(key_id, buyer, routed, price, at=JAN)
    licensing.meter(key_id, buyer, {("law-expert", "1"): 5}, price, at=FEB)
    law_total, med_total = sum(c[0] for c in calls), sum(c[1] for c in calls)
    assert licensing.usage(buyer, "2026-01") == {
        ("law-expert", "1"): law_total,
        ("med-expert", "2"): med_total,
    }
    assert licensing.usage(buyer)[("law-expert", "1")] == law_total + 5
    invoice = licensing.invoice(buyer, "2026-01")
    amounts = {line.expert_name: line.amount for line in invoice.lines}
    assert amounts["law-expert"] == (law_total * Decimal("0.0003")).quantize(Decimal("0.01"))
    assert amounts["med-expert"] == (med_total * Decimal("0.0007")).quantize(Decimal("0.01"))
    assert invoice.total == amounts["law-expert"] + amounts["med-expert"]


def test_fees_exclusivity_and_statements_reconcile(licensing):
    acme, beta = licensing.create_buyer("Acme"), licensing.create_buyer("Beta")
    key_id = licensing.issue_key(acme).split("_")[1]
    licensing.grant(
        acme,
        "law-expert",
        "1",
        "weight",
        fee=Decimal("1000.01"),
        maintenance_fee=Decimal("99.99"),
        at=JAN,
    )
    licensing.grant(beta, "med-expert", "2", "exclusive", fee=Decimal("5000.00"), at=JAN)
    assert licensing.exclusive_owner("med-expert") == beta
    assert licensing.exclusive_experts() == {"med-expert": beta}
    with pytest.raises(ValueError, match="exclusively"):
        licensing.grant(acme, "med-expert", "2", "usage", price_per_token=Decimal("0.1"))
    with pytest.raises(ValueError, match="other licensees"):
        licensing.grant(beta, "law-expert", "1", "exclusive", fee=Decimal(1))
    with pytest.raises(ValueError, match="kind"):
        licensing.grant(acme, "law-expert", "1", "rental")
    licensing.meter(
        key_id,
        acme,
        {("law-expert", "1"): 333, ("orphan-expert", "1"): 10},
        {"law-expert": Decimal("0.001"), "orphan-expert": Decimal("0.5")},
        at=JAN,
    )
    revenue = licensing.revenue("2026-01")
    # 1000.01 + 99.99 + 0.333 -> 0.33 (usage line rounded at the cent)
    assert revenue[("law-expert", "1")] == Decimal("1100.33")
    assert revenue[("med-expert", "2")] == Decimal("5000.00")
    assert revenue[("orphan-expert", "1")] == Decimal("5.00")
    statements = licensing.statements("2026-01")
    for key, amount in revenue.items():
        assert sum(lines.get(key, 0) for lines in statements.values()) == amount
    # law: 1/2, 1/4, 1/4 of 1100.33 -> 550.165, 275.0825 x2 -> 550.17 / 275.08 / 275.08
    assert statements["alice"][("law-expert", "1")] == Decimal("550.17")
    assert statements["bob"][("law-expert", "1")] == Decimal("275.08")
    assert statements["carol"][("law-expert", "1")] == Decimal("275.08")
    assert statements["alice"][("med-expert", "2")] == Decimal("1666.67")
    assert statements[UNALLOCATED][("orphan-expert", "1")] == Decimal("5.00")
    alice = licensing.statement("alice", "2026-01")
    assert alice["total"] == "2216.84"
    assert licensing.statement("alice", "2026-02")["total"] == "0.00"


def test_weight_licence_maintenance_is_booked_yearly(licensing):
    acme = licensing.create_buyer("Acme")
    licence = licensing.grant(
        acme,
        "law-expert",
        "1",
        "weight",
        fee=Decimal("500.00"),
        maintenance_fee=Decimal("80.00"),
        at=JAN,
    )
    licensing.renew_maintenance(
        licence, "1", Decimal("80.00"), at=datetime(2027, 1, 15, tzinfo=UTC)
    )
    assert [(line.item, line.amount) for line in licensing.invoice(acme, "2026-01").lines] == [
        ("weight_fee", Decimal("500.00")),
        ("maintenance", Decimal("80.00")),
    ]
    assert licensing.invoice(acme, "2027-01").total == Decimal("80.00")
    assert sum(licensing.revenue().values()) == Decimal("660.00")
    usage = licensing.grant(acme, "med-expert", "2", "usage", price_per_token=Decimal("0.001"))
    with pytest.raises(ValueError, match="licence_id"):
        licensing.renew_maintenance(usage, "2", Decimal("1"))
