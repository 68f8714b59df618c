"""``taas marketplace statement`` and ``readiness`` against a ledger under TAAS_HOME."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest

from cli.main import main
from factory.ledger import Ledger
from infra.settings import get_settings
from marketplace.auth import check_link
from marketplace.licensing import Licensing


def test_statement_prints_shares_and_a_signed_link(taas_home, monkeypatch, capsys):
    monkeypatch.setenv("TAAS_MARKETPLACE_SECRET", "cli-secret-0123456789")
    ledger = Ledger(get_settings().db_url)
    ledger.register_contributor("alice", "a" * 44)
    ledger.register_contributor("bob", "b" * 44)
    ledger.record_shares("law", "c1", {"alice": Decimal(2), "bob": Decimal(1)}, {}, "1")
    licensing = Licensing(ledger)
    buyer = licensing.create_buyer("Acme")
    licensing.grant(
        buyer, "law", "1", "weight", fee=Decimal("100.00"), maintenance_fee=Decimal("0.01")
    )
    assert main(["marketplace", "statement", "alice", "--link-base", "http://127.0.0.1:8000"]) == 0
    out = capsys.readouterr().out
    statement = json.loads(out[: out.rindex("}") + 1])
    # 100.01 split 2:1 -> 66.673.. / 33.336..; the leftover cent goes to the larger remainder
    assert statement["total"] == "66.67"
    assert statement["lines"] == [{"expert": "law", "version": "1", "amount": "66.67"}]
    link = urlsplit(out.strip().splitlines()[-1])
    query = parse_qs(link.query)
    secret = b"cli-secret-0123456789"
    assert check_link(secret, link.path, query["expires"][0], query["sig"][0]) is None
    assert int(query["expires"][0]) > time.time()
    assert main(["marketplace", "statement", "bob"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == "33.34"


def test_readiness_reports_short_domains(taas_home, tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("TAAS_BASE_MODEL_DIR", str(tiny_base.path))
    args = ["marketplace", "readiness", "--sample", "2", "--min-domains", "2", "--min-cycles", "3"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["open"] is True and report["short"] == {}
    assert main([*args[:-4], "--min-domains", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["open"] is False
    assert main(["marketplace", "readiness", "--sample", "99"]) == 2


@pytest.mark.parametrize(
    ("flag", "value", "why"),
    [
        ("--per-1k-tokens", "abc", "is not a decimal amount"),
        ("--weight-fee", "-5", "must be a finite amount >= 0"),
        ("--maintenance-fee", "NaN", "must be a finite amount >= 0"),
        ("--exclusive-premium", "Infinity", "must be a finite amount >= 0"),
    ],
)
def test_price_refuses_bad_amounts_naming_the_flag(taas_home, capsys, flag, value, why):
    args = ["marketplace", "price", "law", "--per-1k-tokens", "0.002", f"{flag}={value}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"taas: error: {flag}: {value!r} ") and why in err[0]
    # refused before the library is opened: nothing was created under the home
    assert list(taas_home.iterdir()) == []


def test_price_needs_an_amount(taas_home, capsys):
    assert main(["marketplace", "price", "law"]) == 2
    assert "give at least one of --per-1k-tokens" in capsys.readouterr().err
