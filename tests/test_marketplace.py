"""The marketplace app in-process: pages, demo stream, completions API, licences, downloads."""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import time
from decimal import Decimal
from urllib.parse import parse_qsl

import pytest
from fastapi.testclient import TestClient

from factory.ledger import Ledger
from marketplace.app import create_app
from marketplace.auth import check_link, csrf_token, session_buyer, session_cookie, sign_link
from marketplace.catalog import DEFAULT_PRICES, entry_from_tags
from marketplace.licensing import Licensing
from marketplace.market import Market, MarketplaceConfig
from marketplace.readiness import readiness
from marketplace.sample import record_sample_shares, sample_catalog

DOMAINS = ["law", "medicine", "finance", "tax"]


def build_market(base, folder, ledger_url=None, domains=DOMAINS, **overrides) -> Market:
    config = MarketplaceConfig(
        secret="test-secret-0123456789",
        base_model_path=base.path,
        min_domains=20,
        **overrides,
    )
    ledger = Ledger(ledger_url or f"sqlite:///{folder / 'ledger.db'}")
    catalog = sample_catalog(base, folder / "experts", domains)
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


def fetch(client, link: str):
    """POSTs a signed download link the way the account page's form does: the signature in
    the body, never in the URL."""
    path, _, query = link.partition("?")
    return client.post(path, data=dict(parse_qsl(query)))


def presession_csrf(browser) -> str:
    """The sign-up/sign-in form token this browser's pre-session cookie earns."""
    found = re.findall(r'name="csrf" value="([0-9a-f]*)"', browser.get("/account").text)
    assert found and len(found[0]) == 64, found
    return found[0]


def sign_up(browser, name: str):
    return browser.post("/account", data={"name": name, "csrf": presession_csrf(browser)})


def sign_in(browser, key: str):
    return browser.post("/account/signin", data={"key": key, "csrf": presession_csrf(browser)})


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
    lines = client.post(
        "/demo/stream", data={"expert": "law-expert", "prompt": "def parse("}, headers=headers
    ).text.splitlines()
    events = [json.loads(line) for line in lines]
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert 1 <= len(tokens) <= market.config.demo_max_new_tokens
    assert {t["expert"] for t in tokens} <= {"law-expert", "base"}
    assert "".join(t["text"] for t in tokens).strip()
    second = client.post("/demo/stream", data={"expert": "law-expert", "prompt": "x"})
    assert second.status_code == 200
    third = client.post("/demo/stream", data={"expert": "law-expert", "prompt": "x"})
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


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_completions_take_chat_messages_through_the_chat_template(client, market):
    _, _, headers = new_buyer(market, "Chat", licences=[("law-expert", "usage")])
    messages = [
        {"role": "system", "content": "You read software licences."},
        {"role": "user", "content": "What may I do with the code?"},
    ]
    tokenizer = market.generator.tokenizer
    before = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = CHAT_TEMPLATE  # the tiny base has none; a real chat base does
    try:
        body = {"model": "law-expert", "messages": messages, "max_tokens": 3}
        answer = client.post("/v1/completions", json=body, headers=headers)
        templated = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    finally:
        tokenizer.chat_template = before
    assert answer.status_code == 200, answer.text
    assert templated.endswith("<|assistant|>") and "<|system|>You read" in templated
    prompt_ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert answer.json()["usage"]["prompt_tokens"] == len(prompt_ids)
    refused = [
        {"model": "law-expert", "prompt": "a", "messages": messages},  # both
        {"model": "law-expert"},  # neither
        {"model": "law-expert", "messages": []},
        {"model": "law-expert", "messages": [{"role": "tool", "content": "x"}]},
    ]
    for body in refused:
        assert client.post("/v1/completions", json=body, headers=headers).status_code == 422


def test_weight_download_link_is_signed_expiring_and_logged(client, market):
    buyer, _, _ = new_buyer(market, licences=[("finance-expert", "weight")])
    path = f"/download/{buyer}/finance-expert/1"
    link = sign_link(market.secret, path, int(time.time()) + 60)
    response = fetch(client, link)
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = tar.getnames()
    assert "finance-expert-1/adapter_model.safetensors" in names
    logged = market.licensing.downloads_of(buyer)
    assert [(d.expert_name, d.bundle_sha256) for d in logged] == [
        ("finance-expert", response.headers["X-Bundle-SHA256"])
    ]
    expired = sign_link(market.secret, path, int(time.time()) - 1)
    assert "expired" in fetch(client, expired).json()["detail"]
    assert "unsigned" in fetch(client, path).json()["detail"]
    tampered = link.replace("finance-expert", "law-expert")
    assert "bad_signature" in fetch(client, tampered).json()["detail"]
    assert check_link(market.secret, path, "123", "0" * 64) == "bad_signature"
    other, _, _ = new_buyer(market, "NoWeights")
    unlicensed = sign_link(
        market.secret, f"/download/{other}/finance-expert/1", int(time.time()) + 60
    )
    assert fetch(client, unlicensed).status_code == 403


def test_exclusive_expert_is_refused_to_everyone_else(client, market):
    owner, _, owner_headers = new_buyer(market, "Owner", licences=[("tax-expert", "exclusive")])
    other, _, other_headers = new_buyer(market, "Other", licences=[("law-expert", "usage")])
    assert "tax-expert" not in client.get("/").text
    assert client.get("/experts/tax-expert").status_code == 404
    assert (
        client.post("/demo/stream", data={"expert": "tax-expert", "prompt": "a"}).status_code == 404
    )
    body = {"model": "tax-expert", "prompt": "a", "max_tokens": 1}
    assert client.post("/v1/completions", json=body, headers=other_headers).status_code == 404
    mixed = {"model": "mixture:law-expert,tax-expert", "prompt": "a", "max_tokens": 1}
    assert client.post("/v1/completions", json=mixed, headers=other_headers).status_code == 404
    with pytest.raises(ValueError, match="exclusively"):
        market.grant(other, market.catalog.get("tax-expert"), "weight")
    link = sign_link(market.secret, f"/download/{other}/tax-expert/1", int(time.time()) + 60)
    assert fetch(client, link).status_code == 404
    # the owner still has it everywhere
    assert client.post("/v1/completions", json=body, headers=owner_headers).status_code == 200
    own_link = sign_link(market.secret, f"/download/{owner}/tax-expert/1", int(time.time()) + 60)
    assert fetch(client, own_link).status_code == 200
    assert "tax-expert" in {
        m["id"] for m in client.get("/v1/models", headers=owner_headers).json()["data"]
    }


def csrf_of(html: str) -> str:
    found = re.findall(r'name="csrf" value="([0-9a-f]*)"', html)
    assert found and len(set(found)) == 1 and len(found[0]) == 64, found
    return found[0]


def test_account_pages_sign_up_license_and_statement(client, market):
    with TestClient(create_app(market)) as browser:
        response = sign_up(browser, "Gamma")
        assert response.status_code == 200 and "taas_" in response.text  # key shown once
        assert 'id="api-key"' not in browser.get("/account").text
        csrf = csrf_of(response.text)
        forged = browser.post("/experts/medicine-expert/license", data={"kind": "weight"})
        assert forged.status_code == 403 and "csrf" in forged.json()["detail"]
        licensed = browser.post(
            "/experts/medicine-expert/license", data={"kind": "weight", "csrf": csrf}
        )
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


def test_session_cookie_expires_and_resists_tampering():
    secret, now = b"s" * 32, 1_800_000_000
    cookie = session_cookie(secret, "b_0123456789abcdef", now + 60)
    buyer, expires, mac = cookie.split(".")
    assert (buyer, expires) == ("b_0123456789abcdef", str(now + 60)) and len(mac) == 64
    assert session_buyer(secret, cookie, now=now) == buyer
    assert session_buyer(secret, cookie, now=now + 60) == buyer  # valid through its last second
    assert session_buyer(secret, cookie, now=now + 61) is None  # expired
    later = f"{buyer}.{now + 3600}.{mac}"  # a longer life is not granted by editing the expiry
    assert session_buyer(secret, later, now=now) is None
    other = f"b_fedcba9876543210.{expires}.{mac}"  # nor another buyer by editing the id
    assert session_buyer(secret, other, now=now) is None
    assert session_buyer(b"t" * 32, cookie, now=now) is None  # another server's secret
    for malformed in (None, "", buyer, f"{buyer}.{mac}", f"{buyer}.x{expires}.{mac}", "..."):
        assert session_buyer(secret, malformed, now=now) is None
    with pytest.raises(ValueError, match="buyer_id"):
        session_cookie(secret, "a.b", now)


def test_session_cookie_lifetime_follows_the_config(tiny_base, tmp_path):
    market = build_market(tiny_base, tmp_path, session_ttl_s=90)
    assert MarketplaceConfig(secret="x" * 16, base_model_path=tmp_path).session_ttl_s == 12 * 3600
    with TestClient(create_app(market)) as browser:
        before = int(time.time())
        response = sign_up(browser, "Ttl")
        header = response.headers["set-cookie"]
        assert "Max-Age=90" in header and "HttpOnly" in header and "SameSite=lax" in header
        cookie = browser.cookies["taas_session"].strip('"')
        expires = int(cookie.split(".")[1])
        assert before + 90 <= expires <= int(time.time()) + 90
        assert "Account Ttl" in browser.get("/account").text
        buyer = cookie.split(".")[0]
        # An expired session (signed correctly) is a stranger: sign-up page, no licence form.
        stale = session_cookie(market.secret, buyer, int(time.time()) - 1)
        browser.cookies.clear()
        browser.cookies.set("taas_session", stale)
        assert 'id="signup-form"' in browser.get("/account").text
        refused = browser.post("/account/keys", data={"csrf": csrf_token(market.secret, stale)})
        assert refused.status_code == 200 and 'id="signup-form"' in refused.text
        assert len(market.api_keys(buyer)) == 1  # no key was issued for the stale session


def test_an_active_api_key_signs_the_buyer_back_in(market):
    with TestClient(create_app(market)) as browser:
        signed_up = sign_up(browser, "Returning").text
        key = re.search(r'id="api-key">(taas_[^<]+)<', signed_up).group(1)
        buyer = market.licensing.authenticate(key)[0]
        browser.cookies.clear()  # the session is gone (expired, another device)
        assert 'id="signin-form"' in browser.get("/account").text
        for presented, reason in [
            ("", "missing"),
            ("taas_x", "malformed"),
            (key + "x", "mismatch"),
        ]:
            answer = sign_in(browser, presented)
            assert answer.status_code == 401 and answer.json()["detail"]["reason"] == reason
            assert "taas_session" not in browser.cookies
        back = sign_in(browser, key)
        assert back.status_code == 200 and "Account Returning" in back.text
        assert session_buyer(market.secret, browser.cookies["taas_session"].strip('"')) == buyer
        assert key not in back.text  # the key is never shown again
        market.licensing.revoke_key(key.split("_")[1])
        browser.cookies.clear()
        answer = sign_in(browser, key)
        assert answer.status_code == 401 and answer.json()["detail"]["reason"] == "revoked"


def test_buyer_revokes_own_keys_and_issues_new_ones(client, market):
    with TestClient(create_app(market)) as browser, TestClient(create_app(market)) as intruder:
        first_key = sign_up(browser, "Keys").text
        first_key = re.search(r'id="api-key">(taas_[^<]+)<', first_key).group(1)
        other = sign_up(intruder, "Intruder")
        other_key = re.search(r'id="api-key">(taas_[^<]+)<', other.text).group(1)
        buyer = market.licensing.authenticate(first_key)[0]
        market.grant(buyer, market.catalog.get("law-expert"), "usage")
        account = browser.get("/account").text
        csrf = csrf_of(account)
        first_id = first_key.split("_")[1]
        assert f"taas_{first_id}_" in account and first_key not in account  # prefix only
        assert re.search(
            rf'data-key-id="{first_id}">.*?<td class="key-status">active', account, re.S
        )

        issued = browser.post("/account/keys", data={"csrf": csrf})
        second_key = re.search(r'id="api-key">(taas_[^<]+)<', issued.text).group(1)
        assert second_key != first_key
        assert [k.key_id for k in market.api_keys(buyer)] == [first_id, second_key.split("_")[1]]

        body = {"model": "law-expert", "prompt": "hello", "max_tokens": 1}
        call = {"Authorization": f"Bearer {first_key}"}
        assert client.post("/v1/completions", json=body, headers=call).status_code == 200
        # another buyer's key, an unknown key: both 404, and nothing changes
        other_id = other_key.split("_")[1]
        for key_id in (other_id, "0" * 16):
            answer = browser.post(f"/account/keys/{key_id}/revoke", data={"csrf": csrf})
            assert answer.status_code == 404 and answer.json()["detail"] == "no such key"
        assert market.licensing.authenticate(other_key)[0] != buyer  # still valid
        # a cross-site form has the cookie but not the token
        for forged in ({}, {"csrf": "0" * 64}, {"csrf": csrf_of(intruder.get("/account").text)}):
            answer = browser.post(f"/account/keys/{first_id}/revoke", data=forged)
            assert answer.status_code == 403
        assert client.post("/v1/completions", json=body, headers=call).status_code == 200

        revoked = browser.post(f"/account/keys/{first_id}/revoke", data={"csrf": csrf})
        assert revoked.status_code == 200 and revoked.url.path == "/account"  # after 303
        assert re.search(rf'data-key-id="{first_id}">.*?key-status">revoked', revoked.text, re.S)
        answer = client.post("/v1/completions", json=body, headers=call)
        assert answer.status_code == 401 and answer.json()["detail"]["reason"] == "revoked"
        fresh = {"Authorization": f"Bearer {second_key}"}
        assert client.post("/v1/completions", json=body, headers=fresh).status_code == 200
        assert [k.active for k in market.api_keys(buyer)] == [False, True]


def test_catalog_prices_and_dates_from_tags():
    tags = {
        "price_per_1k_tokens": "0.002",
        "weight_fee": "900",
        "maintenance_fee": "150.50",
        "exclusive_premium": "12000",
        "trained_at": "2026-03-04T05:06:07+00:00",
        "champion_history": json.dumps([["1", "2026-03-04T06:00:00+00:00"]]),
    }
    entry = entry_from_tags("x", ["1"], "1", tags)
    assert entry.price.per_token == Decimal("0.000002")
    assert str(entry.price.per_token) == "0.000002"  # exact, no float on the way
    assert (entry.price.weight_fee, entry.price.maintenance_fee) == (
        Decimal("900"),
        Decimal("150.50"),
    )
    assert entry.price.exclusive_premium == Decimal("12000")
    assert entry.last_trained == "2026-03-04T05:06:07+00:00"
    assert entry.champion_history == [("1", "2026-03-04T06:00:00+00:00")]
    default = entry_from_tags("x", ["1"], "1", {})
    assert default.price.per_token == Decimal(DEFAULT_PRICES["price_per_1k_tokens"]) / 1000
    assert default.price.per_token == Decimal("0.0001") and default.last_trained == ""
    for bad in ("abc", "-1", "NaN", "Infinity"):
        with pytest.raises(ValueError, match="weight_fee"):
            entry_from_tags("x", ["1"], "1", {"weight_fee": bad})


def test_pages_show_training_and_champion_dates(client):
    page = client.get("/").text
    assert '<span class="last-trained">2026-01-01</span>' in page  # law-expert, seed 0
    expert = client.get("/experts/medicine-expert").text
    assert '<td id="last-trained">2026-01-02</td>' in expert
    assert "version 1 champion since 2026-01-02" in expert
