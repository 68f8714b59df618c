"""The marketplace app in-process: pages, demo stream, completions API, licences, downloads."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from factory.ledger import Ledger
from factory.licensing import Licensing
from marketplace.app import create_app
from marketplace.auth import check_link, sign_link
from marketplace.market import Market, MarketplaceConfig
from marketplace.readiness import readiness
from marketplace.sample import record_sample_shares, sample_catalog

DOMAINS = ["law", "medicine", "finance", "tax"]


def build_market(base, folder, **overrides) -> Market:
    config = MarketplaceConfig(
        secret="test-secret-0123456789",
        base_model_path=base.path,
        min_domains=20,
        **overrides,
    )
    ledger = Ledger(f"sqlite:///{folder / 'ledger.db'}")
    catalog = sample_catalog(base, folder / "experts", DOMAINS)
    record_sample_shares(ledger, catalog)
    return Market(config, catalog, Licensing(ledger))


@pytest.fixture(scope="module")
def market(tiny_base, tmp_path_factory):
    return build_market(
        tiny_base, tmp_path_factory.mktemp("market"), demo_rate_per_minute=1.0, demo_burst=2
    )


@pytest.fixture(scope="module")
def client(market):
    with TestClient(create_app(market)) as test_client:
        yield test_client


def new_buyer(market, name="Acme", licences=()):
    buyer = market.licensing.create_buyer(name)
    key = market.licensing.issue_key(buyer)
    for expert, kind in licences:
        market.grant(buyer, market.catalog.get(expert), kind)
    return buyer, key, {"Authorization": f"Bearer {key}"}


def test_catalog_filters_and_preview_banner(client):
    page = client.get("/").text
    assert all(f"{d}-expert" in page for d in DOMAINS)
    assert 'id="preview-banner"' in page
    filtered = client.get("/", params={"domain": "law"}).text
    assert "law-expert" in filtered and "medicine-expert" not in filtered
    assert "finance-expert" in client.get("/", params={"benchmark": "finance_qa"}).text
    assert "law-expert" not in client.get("/", params={"q": "finance"}).text
    assert client.get("/api/readiness").json()["short"] == {}


def test_readiness_counts_domains_and_cycles():
    experts = [("law", True, 3), ("law", False, 9), ("med", True, 2), ("tax", False, 5)]
    ready = readiness(experts, min_domains=1, min_cycles=3)
    assert ready.open and ready.ready_domains == ["law"]
    assert ready.short == {
        "med": "2 of 3 training cycles",
        "tax": "no expert passed Proof-of-Loss validation",
    }
    assert not readiness(experts, min_domains=2, min_cycles=3).open


def test_expert_page_and_compare(client):
    page = client.get("/experts/law-expert").text
    assert "<svg" in page and 'class="bar-expert"' in page and 'class="bar-base"' in page
    assert "line-0: 0.6" in page and "champion" in page
    assert client.get("/experts/nope").status_code == 404
    assert client.get("/experts/..%2F..%2Fetc").status_code == 404
    compared = client.get("/compare", params=[("names", "law-expert"), ("names", "tax-expert")])
    assert compared.status_code == 200 and "tax_qa" in compared.text
    assert client.get("/compare", params={"names": "law-expert"}).status_code == 400


def test_demo_stream_routes_every_token_and_is_rate_limited(client, market):
    headers = {"X-Forwarded-For": "ignored"}
    lines = client.get(
        "/demo/stream", params={"expert": "law-expert", "prompt": "def parse("}, headers=headers
    ).text.splitlines()
    events = [json.loads(line) for line in lines]
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert 1 <= len(tokens) <= market.config.demo_max_new_tokens
    assert {t["expert"] for t in tokens} <= {"law-expert", "base"}
    assert "".join(t["text"] for t in tokens).strip()
    second = client.get("/demo/stream", params={"expert": "law-expert", "prompt": "x"})
    assert second.status_code == 200
    third = client.get("/demo/stream", params={"expert": "law-expert", "prompt": "x"})
    assert third.status_code == 429


def test_api_refuses_missing_invalid_and_revoked_keys(client, market):
    buyer, key, headers = new_buyer(market, licences=[("law-expert", "usage")])
    body = {"model": "law-expert", "prompt": "hello", "max_tokens": 2}
    cases = {
        "missing": {},
        "malformed": {"Authorization": "Bearer sk-abc"},
        "unknown": {"Authorization": f"Bearer taas_{'1' * 16}_xyz"},
        "mismatch": {"Authorization": f"Bearer {key[:-1]}{'A' if key[-1] != 'A' else 'B'}"},
    }
    for reason, case in cases.items():
        response = client.post("/v1/completions", json=body, headers=case)
        assert response.status_code == 401 and response.json()["detail"]["reason"] == reason
    assert client.post("/v1/completions", json=body, headers=headers).status_code == 200
    market.licensing.revoke_key(key.split("_")[1])
    response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 401 and response.json()["detail"]["reason"] == "revoked"


def test_completions_meter_exactly_and_buyers_are_isolated(client, market):
    buyer, _, headers = new_buyer(
        market, licences=[("law-expert", "usage"), ("finance-expert", "usage")]
    )
    other, _, other_headers = new_buyer(market, "Other")
    served = {}
    for i, (model, max_tokens) in enumerate(
        [("law-expert", 3), ("law-expert", 5), ("mixture", 6), ("finance-expert", 1)] * 2
    ):
        response = client.post(
            "/v1/completions",
            json={"model": model, "prompt": f"import os {i}", "max_tokens": max_tokens},
            headers=headers,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] == len(body["routes"]) <= max_tokens
        for name in body["routes"]:
            served[name] = served.get(name, 0) + 1
    usage = client.get("/v1/usage", headers=headers).json()
    assert {u["expert"]: u["tokens"] for u in usage["usage"]} == served
    assert usage["total_tokens"] == sum(served.values())
    assert client.get(f"/v1/buyers/{buyer}/usage", headers=headers).status_code == 200
    assert client.get(f"/v1/buyers/{buyer}/usage", headers=other_headers).status_code == 403
    assert client.get("/v1/usage", headers=other_headers).json()["total_tokens"] == 0
    period = time.strftime("%Y-%m", time.gmtime())
    invoice = client.get(f"/v1/invoices/{period}", headers=headers).json()
    assert set(served) - {"base"}, "no token was routed to an expert"
    prices = {n: market.catalog.get(n).price.per_token for n in served if n != "base"}
    prices["base"] = Decimal(0)
    expected = sum(
        (Decimal(tokens) * prices[name]).quantize(Decimal("0.01"))
        for name, tokens in served.items()
    )
    assert Decimal(invoice["total"]) == expected
    # unlicensed expert, over-long prompt and too many tokens are refused
    denied = client.post(
        "/v1/completions", json={"model": "medicine-expert", "prompt": "a"}, headers=headers
    )
    assert denied.status_code == 403
    long_prompt = "word " * (market.config.max_prompt_tokens + 10)
    assert (
        client.post(
            "/v1/completions", json={"model": "law-expert", "prompt": long_prompt}, headers=headers
        ).status_code
        == 400
    )
    too_many = {"model": "law-expert", "prompt": "a", "max_tokens": 10_000}
    assert client.post("/v1/completions", json=too_many, headers=headers).status_code == 400


def test_weight_download_link_is_signed_expiring_and_logged(client, market):
    buyer, _, _ = new_buyer(market, licences=[("finance-expert", "weight")])
    path = f"/download/{buyer}/finance-expert/1"
    link = sign_link(market.secret, path, int(time.time()) + 60)
    response = client.get(link)
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = tar.getnames()
    assert "finance-expert-1/adapter_model.safetensors" in names
    logged = market.licensing.downloads_of(buyer)
    assert [(d.expert_name, d.bundle_sha256) for d in logged] == [
        ("finance-expert", response.headers["X-Bundle-SHA256"])
    ]
    expired = sign_link(market.secret, path, int(time.time()) - 1)
    assert "expired" in client.get(expired).json()["detail"]
    assert "unsigned" in client.get(path).json()["detail"]
    tampered = link.replace("finance-expert", "law-expert")
    assert "bad_signature" in client.get(tampered).json()["detail"]
    assert check_link(market.secret, path, "123", "0" * 64) == "bad_signature"
    other, _, _ = new_buyer(market, "NoWeights")
    unlicensed = sign_link(
        market.secret, f"/download/{other}/finance-expert/1", int(time.time()) + 60
    )
    assert client.get(unlicensed).status_code == 403


def test_exclusive_expert_is_refused_to_everyone_else(client, market):
    owner, _, owner_headers = new_buyer(market, "Owner", licences=[("tax-expert", "exclusive")])
    other, _, other_headers = new_buyer(market, "Other", licences=[("law-expert", "usage")])
    assert "tax-expert" not in client.get("/").text
    assert client.get("/experts/tax-expert").status_code == 404
    assert (
        client.get("/demo/stream", params={"expert": "tax-expert", "prompt": "a"}).status_code
        == 404
    )
    body = {"model": "tax-expert", "prompt": "a", "max_tokens": 1}
    assert client.post("/v1/completions", json=body, headers=other_headers).status_code == 404
    mixed = {"model": "mixture:law-expert,tax-expert", "prompt": "a", "max_tokens": 1}
    assert client.post("/v1/completions", json=mixed, headers=other_headers).status_code == 404
    with pytest.raises(ValueError, match="exclusively"):
        market.grant(other, market.catalog.get("tax-expert"), "weight")
    link = sign_link(market.secret, f"/download/{other}/tax-expert/1", int(time.time()) + 60)
    assert client.get(link).status_code == 404
    # the owner still has it everywhere
    assert client.post("/v1/completions", json=body, headers=owner_headers).status_code == 200
    own_link = sign_link(market.secret, f"/download/{owner}/tax-expert/1", int(time.time()) + 60)
    assert client.get(own_link).status_code == 200
    assert "tax-expert" in {
        m["id"] for m in client.get("/v1/models", headers=owner_headers).json()["data"]
    }


def test_account_pages_sign_up_license_and_statement(client, market):
    with TestClient(create_app(market)) as browser:
        response = browser.post("/account", data={"name": "Gamma"})
        assert response.status_code == 200 and "taas_" in response.text  # key shown once
        assert "api-key" not in browser.get("/account").text
        licensed = browser.post("/experts/medicine-expert/license", data={"kind": "weight"})
        assert licensed.status_code == 200 and "/download/" in licensed.text
    statement = sign_link(market.secret, "/statements/line-0", int(time.time()) + 60)
    page = client.get(statement)
    assert page.status_code == 200 and "medicine-expert" in page.text
    assert client.get("/statements/line-0").status_code == 403


def test_concurrent_first_requests_build_one_generator(tiny_base, tmp_path):
    """Twenty requests arriving at once on a fresh server share one model, loaded once."""
    fresh = build_market(tiny_base, tmp_path)
    barrier = threading.Barrier(20)
    seen: list[int] = []

    def first_request() -> None:
        barrier.wait()
        seen.append(id(fresh.generator))

    threads = [threading.Thread(target=first_request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 20 and len(set(seen)) == 1
