"""Attacks on the marketplace, each refused: session revocation, login CSRF, hostile bodies and
forms, odd expert names, non-ASCII signatures, leaky URLs, torn bundles, revenue attribution,
unbounded amounts, and the demo's mixtures. In-process (TestClient) against the real app and a
SQLite ledger; the concurrent races are in test_marketplace_races.py."""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from decimal import Decimal
from urllib.parse import quote, unquote

import pytest
from fastapi.testclient import TestClient
from test_marketplace import build_market, csrf_of, presession_csrf, sign_in, sign_up

from factory.commission import parse_spec, price_amount
from factory.ledger import Ledger
from marketplace.app import create_app
from marketplace.auth import RateLimiter, check_csrf, check_link, session_buyer
from marketplace.catalog import LibraryCatalog, entry_from_tags
from marketplace.demo import ExpertHandle
from marketplace.expert_cache import ExpertCache
from marketplace.licensing import Licensing

ODD = ["pro?bono#50%", "Право"]  # domains; the experts are "<domain>-expert"


@pytest.fixture(scope="module")
def market(tiny_base, tmp_path_factory):
    return build_market(
        tiny_base,
        tmp_path_factory.mktemp("secure-market"),
        domains=["law", "tax", *ODD],
        signup_burst=1000,
    )


def key_of(html: str) -> str:
    return re.search(r'id="api-key">(taas_[^<]+)<', html).group(1)


def download_forms(html: str) -> list[tuple[str, dict[str, str]]]:
    """(action, fields) of every download form on an account page."""
    forms = re.findall(
        r'<form method="post" action="([^"]+)" class="download-form">\s*'
        r'<input type="hidden" name="expires" value="(\d+)"><input type="hidden" name="sig" '
        r'value="([^"]+)">',
        html,
    )
    return [(action, {"expires": expires, "sig": sig}) for action, expires, sig in forms]


def test_revoking_a_key_ends_the_sessions_it_opened(market):
    """A leaked key signs an attacker in; revoking it ends that session (no more keys minted
    there) while the owner stays signed in; signing out ends the owner's too."""
    with TestClient(create_app(market)) as owner, TestClient(create_app(market)) as attacker:
        key = key_of(sign_up(owner, "Leaky").text)
        buyer = market.licensing.authenticate(key)[0]
        assert "Account Leaky" in sign_in(attacker, key).text
        stolen_csrf = csrf_of(attacker.get("/account").text)
        owner_csrf = csrf_of(owner.get("/account").text)
        revoked = owner.post(f"/account/keys/{key.split('_')[1]}/revoke", data={"csrf": owner_csrf})
        assert revoked.status_code == 200 and "Account Leaky" in revoked.text  # still in
        assert 'id="signup-form"' in attacker.get("/account").text  # the attacker is out
        minted = attacker.post("/account/keys", data={"csrf": stolen_csrf})
        assert 'id="signup-form"' in minted.text and 'id="api-key"' not in minted.text
        assert [k.active for k in market.api_keys(buyer)] == [False]  # nothing was minted
        assert sign_in(attacker, key).json()["detail"]["reason"] == "revoked"
        # sign-out ends every session of the buyer, this cookie included
        old_cookie = owner.cookies["taas_session"]
        csrf = csrf_of(owner.get("/account").text)
        assert owner.post("/account/signout", data={"csrf": csrf}).status_code == 200
        owner.cookies.set("taas_session", old_cookie)
        assert 'id="signup-form"' in owner.get("/account").text
        live = market.licensing.session_version(buyer)
        cookie = old_cookie.strip('"')
        assert session_buyer(market.secret, cookie, version_of=lambda _: live - 1) == buyer
        assert session_buyer(market.secret, cookie, version_of=lambda _: live) is None


def test_sign_up_and_sign_in_need_the_pages_token_and_same_origin(market):
    with TestClient(create_app(market)) as victim, TestClient(create_app(market)) as other:
        # login CSRF: a form posted from another site has neither this browser's token nor
        # its origin; the attacker's own token does not fit the victim's pre-session cookie
        assert victim.post("/account", data={"name": "Forged"}).status_code == 403
        foreign = presession_csrf(other)
        victim.get("/account")
        answer = victim.post("/account", data={"name": "Forged", "csrf": foreign})
        assert answer.status_code == 403 and "csrf" in answer.json()["detail"]
        key = key_of(sign_up(other, "Attacker").text)
        assert victim.post("/account/signin", data={"key": key}).status_code == 403
        token = presession_csrf(victim)
        evil = {"Origin": "http://evil.example"}
        answer = victim.post("/account/signin", data={"key": key, "csrf": token}, headers=evil)
        assert answer.status_code == 403 and "origin" in answer.json()["detail"]
        assert "taas_session" not in victim.cookies
        same = {"Origin": "http://testserver"}
        answer = victim.post("/account", data={"name": "Real", "csrf": token}, headers=same)
        assert answer.status_code == 200 and "Account Real" in answer.text


def test_odd_expert_names_download_with_verified_links(market):
    with TestClient(create_app(market)) as browser:
        sign_up(browser, "Odd")
        csrf = csrf_of(browser.get("/account").text)
        for domain in ODD:
            name = f"{domain}-expert"
            answer = browser.post(
                f"/experts/{quote(name, safe='')}/license", data={"kind": "weight", "csrf": csrf}
            )
            assert answer.status_code == 200, answer.text
        forms = download_forms(browser.get("/account").text)
        assert len(forms) == 2
        for action, fields in forms:
            assert "?" not in action and "#" not in action
            response = browser.post(action, data=fields)
            assert response.status_code == 200, response.text
            name = unquote(action).split("/")[3]
            disposition = response.headers["content-disposition"]
            assert disposition.isascii() and f"filename*=UTF-8''{action.split('/')[3]}" in (
                disposition
            )
            with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
                assert f"{name}-1/adapter_model.safetensors" in tar.getnames()


def test_non_ascii_signatures_are_refused_not_errors(market):
    with TestClient(create_app(market), raise_server_exceptions=False) as browser:
        sign_up(browser, "Ascii")
        html = browser.get("/account").text
        csrf = csrf_of(html)
        buyer = market.licensing.create_buyer("Holder")
        market.grant(buyer, market.catalog.get("law-expert"), "weight")
        path = f"/download/{buyer}/law-expert/1"
        for fields in ({"expires": "9999999999", "sig": "é" * 64},
                       {"expires": "١٢٣", "sig": "0" * 64}):  # fmt: skip
            answer = browser.post(path, data=fields)
            assert answer.status_code == 403, answer.text
        assert browser.post("/account/keys", data={"csrf": "ÿ" + csrf[1:]}).status_code == 403
        cookie = browser.cookies["taas_session"].strip('"')
        browser.cookies.clear()
        raw = {"cookie": ("taas_session=" + cookie[:-1] + "ÿ").encode("latin-1")}
        answer = browser.get("/account", headers=raw)
        assert answer.status_code == 200 and 'id="signup-form"' in answer.text
    assert check_link(market.secret, path, "1", "ü") == "bad_signature"
    assert check_csrf(market.secret, "a.b.c", "ü") is False
    assert session_buyer(market.secret, "b_1.99999999999.ü") is None


def test_bodies_forms_and_sign_ups_are_bounded(tiny_base, tmp_path):
    market = build_market(tiny_base, tmp_path, signup_burst=3, signup_rate_per_minute=0.01)
    with TestClient(create_app(market)) as client:
        # the key is checked before the body is parsed; too big a body is refused unread
        assert client.post("/v1/completions", content=b"{not json").status_code == 401
        huge = b'{"model": "law-expert", "prompt": "' + b"a" * (1 << 20) + b'"}'
        answer = client.post("/v1/completions", content=huge)
        assert answer.status_code == 413 and "at most 65536" in answer.json()["detail"]

        def chunks():
            for _ in range(64):
                yield b"x" * 4096

        buyer = market.licensing.create_buyer("Streamer")
        bearer = {"Authorization": f"Bearer {market.licensing.issue_key(buyer)}"}
        streamed = client.post("/v1/completions", content=chunks(), headers=bearer)
        assert streamed.status_code == 413  # no Content-Length: counted as it arrives
        fields = {f"f{i}": "v" * 1024 for i in range(1000)}
        assert client.post("/account", data=fields).status_code == 413
        # sign-ups per client address: the burst, then 429
        codes = []
        for i in range(5):
            client.cookies.clear()  # a new browser each time: only the address is the same
            codes.append(sign_up(client, f"Sybil {i}").status_code)
        assert codes == [200, 200, 200, 429, 429]
    limiter = RateLimiter(6.0, 3, max_visitors=100)
    for visitor in range(10_000):
        limiter.allow(f"10.0.{visitor // 256}.{visitor % 256}")
    assert len(limiter) == 100


def test_pages_send_security_headers_and_keep_secrets_out_of_urls(tiny_base, tmp_path):
    market = build_market(tiny_base, tmp_path, secure_cookies=True)
    with TestClient(create_app(market), base_url="https://testserver") as browser:
        response = sign_up(browser, "Headers")
        assert "Secure" in response.headers["set-cookie"]
        for page in ("/", "/account", "/demo"):
            headers = browser.get(page).headers
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert headers["strict-transport-security"].startswith("max-age=")
        assert browser.get("/account").headers["cache-control"] == "no-store"
        csrf = csrf_of(browser.get("/account").text)
        browser.post("/experts/law-expert/license", data={"kind": "weight", "csrf": csrf})
        account = browser.get("/account").text
        assert "sig=" not in account and len(download_forms(account)) == 1
        assert browser.get("/demo/stream?expert=law-expert&prompt=secret").status_code == 405
        action, fields = download_forms(account)[0]
        query = f"?expires={fields['expires']}&sig={fields['sig']}"
        assert browser.get(action + query).status_code == 405
        assert 'fetch("/demo/stream", {method: "POST"' in browser.get("/demo").text


def test_a_torn_folder_is_never_bundled_and_is_fetched_again(tiny_base, tmp_path):
    """The cache remembers a verified folder by its marker (no re-hash per request); a file
    changed underneath is caught while bundling: 503, nothing logged, fetched again after."""
    import shutil

    from infra.atomic import committed_dir

    market = build_market(tiny_base, tmp_path)
    source = market.catalog.expert_folder("law-expert", "1")
    fetched: list[str] = []

    def fetch(name: str, version: str, dest) -> None:
        fetched.append(name)
        with committed_dir(dest) as tmp:
            for item in source.iterdir():
                if item.name != "COMMITTED.json":
                    shutil.copy2(item, tmp / item.name)

    cache = ExpertCache(tmp_path / "cache", fetch)
    market.catalog = LibraryCatalog(
        lambda: ["law-expert"],
        lambda name: (["1"], "1", {"domain": "law"}, ""),
        lambda name, version: cache.folder(name, version),
    )
    market.catalog.forget = cache.forget  # what library_catalog wires
    buyer = market.licensing.create_buyer("Torn")
    market.grant(buyer, market.catalog.get("law-expert"), "weight")
    folder = cache.folder("law-expert", "1")
    assert [cache.folder("law-expert", "1") for _ in range(50)] == [folder] * 50
    assert fetched == ["law-expert"]
    adapter = folder / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # same size, marker untouched: only a hash would notice
    adapter.write_bytes(bytes(data))
    from marketplace.auth import sign_link

    with TestClient(create_app(market)) as client:
        link = sign_link(market.secret, f"/download/{buyer}/law-expert/1", int(time.time()) + 60)
        path, _, query = link.partition("?")
        form = dict(part.split("=") for part in query.split("&"))
        torn = client.post(path, data=form)
        assert torn.status_code == 503 and "differs from its marker" in torn.json()["detail"]
        assert market.licensing.downloads_of(buyer) == []
        again = client.post(path, data=form)
        assert again.status_code == 200 and fetched == ["law-expert", "law-expert"]
        assert [d.bundle_sha256 for d in market.licensing.downloads_of(buyer)] == [
            again.headers["X-Bundle-SHA256"]
        ]


def test_a_version_earns_only_for_its_own_cycles(tmp_path):
    """Cycles record the adapter digest they merged and a ``<commission>/cycle-<n>`` key; the
    registry calls the versions "1" and "2". Version 2's revenue goes to version 2's
    contributors only, not to every cycle ever recorded under the name."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    for who in ("alice", "bob", "carol"):
        ledger.register_contributor(who, who[0] * 44)
    half = Decimal("0.5")
    ledger.record_shares("law", "com-a/cycle-1", {"alice": half, "bob": half}, {}, "a" * 64)
    ledger.record_shares("law", "com-a/cycle-2", {"alice": Decimal(1)}, {}, "b" * 64)
    ledger.record_shares("law", "com-b/cycle-1", {"carol": Decimal(1)}, {}, "c" * 64)
    commissions = {("law", "1"): "com-a", ("law", "2"): "com-b"}
    licensing = Licensing(ledger, lambda name, version: commissions.get((name, version)))
    buyer = licensing.create_buyer("Acme")
    licensing.grant(buyer, "law", "2", "weight", fee=Decimal("90.00"))
    assert licensing.contributor_shares("law", "2") == {"carol": Decimal(1)}
    assert licensing.contributor_shares("law", "1") == {"alice": Decimal("1.5"), "bob": half}
    assert licensing.statements() == {"carol": {("law", "2"): Decimal("90.00")}}
    assert licensing.contributor_shares("law", "3") == {}  # unknown version: unallocated


def test_amounts_are_bounded_where_they_enter():
    for bad in ("1e26", "1e999999999", "1e-999999999", "1000000000000000"):
        with pytest.raises(ValueError, match="weight_fee"):
            price_amount("weight_fee", bad)
        with pytest.raises(ValueError, match="exclusive_premium"):
            entry_from_tags("x", ["1"], "1", {"exclusive_premium": bad})
    spec = {
        "version": 1, "customer": "Acme", "domain": "law", "description": "d",
        "data": [{"uri": "x.jsonl", "text_field": "text"}],
        "base_model": {"name": "t", "preset": "tiny"}, "expert": {"rank": 4, "alpha": 8},
        "licence": {"type": "weight", "weight_fee": "1e999999999"},
    }  # fmt: skip
    with pytest.raises(ValueError, match="weight_fee"):
        parse_spec(spec)
    # the largest amount still bills and splits to the cent
    ledger = Ledger("sqlite://")
    ledger.register_contributor("alice", "a" * 44)
    ledger.register_contributor("bob", "b" * 44)
    ledger.record_shares("x", "c/cycle-1", {"alice": Decimal(2), "bob": Decimal(1)}, {}, "1")
    licensing = Licensing(ledger)
    fee = Decimal(price_amount("weight_fee", "999999999999999.99"))
    licensing.grant(licensing.create_buyer("Rich"), "x", "1", "weight", fee=fee)
    parts = licensing.statements()
    assert parts["alice"][("x", "1")] + parts["bob"][("x", "1")] == fee
    assert parts["alice"][("x", "1")] == Decimal("666666666666666.66")


def test_catalog_page_lists_the_registry_once(market):
    """One listing and one description per expert per listing: not one listing per entry."""
    calls = {"names": 0, "describe": 0}
    names = [f"e{i:02d}" for i in range(20)]

    def listing() -> list[str]:
        calls["names"] += 1
        return names

    def describe(name: str):
        calls["describe"] += 1
        return ["1"], "1", {"domain": name}, ""

    catalog = LibraryCatalog(listing, describe, lambda name, version: None)
    assert len(catalog.entries()) == 20
    assert calls == {"names": 1, "describe": 20}


def test_mixtures_are_built_once_per_set_and_kept_by_use(market, monkeypatch):
    """Many requests for one new set of experts compose it once; cycling through more sets
    than the cache holds keeps the cache bounded and drops the least recently used one."""
    import marketplace.demo

    MAX_MIXTURES = 6  # four experts make 15 sets; a smaller cache so they overflow it
    monkeypatch.setattr(marketplace.demo, "MAX_MIXTURES", MAX_MIXTURES)
    generator = market.generator
    names = [entry.name for entry in market.catalog.entries()]
    handles = {
        name: ExpertHandle(name, "1", market.catalog.expert_folder(name, "1")) for name in names
    }
    built = generator.builds
    barrier = threading.Barrier(16)

    def ask() -> None:
        barrier.wait()
        generator._mixture([handles["law-expert"], handles["tax-expert"]])

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert generator.builds == built + 1
    tokens = list(generator.stream([handles["law-expert"], handles["tax-expert"]], "x = ", 4))
    assert tokens and generator.builds == built + 1  # decoding steps build nothing
    sets = [[handles[a], handles[b]] for a in names for b in names if a < b]
    sets += [[handles[n]] for n in names] + [[handles[n] for n in names]]
    sets += [[handles[a], handles[b], handles[c]] for a in names for b in names for c in names
             if a < b < c]  # fmt: skip
    assert len(sets) > MAX_MIXTURES
    favourite = sets[0]
    for each in sets:
        generator._mixture(each)
        generator._mixture(favourite)  # used all along: never dropped
    before = generator.builds
    generator._mixture(favourite)
    assert generator.builds == before and len(generator._mixtures) == MAX_MIXTURES


def test_a_new_mixture_reads_its_experts_without_stopping_decoding(market, monkeypatch):
    """Composing a set of experts nobody asked for before reads and checks their files outside
    the decoding lock (other requests keep decoding meanwhile); only composing holds it."""
    import marketplace.demo

    generator = market.generator
    names = [entry.name for entry in market.catalog.entries()]
    handles = [ExpertHandle(n, "1", market.catalog.expert_folder(n, "1")) for n in names[:3]]
    held_while_reading: list[bool] = []
    real_load = marketplace.demo.load_expert

    def load(folder):
        held_while_reading.append(generator._lock.locked())
        return real_load(folder)

    monkeypatch.setattr(marketplace.demo, "load_expert", load)
    generator._mixtures.clear()
    generator._mixture(handles)
    assert held_while_reading == [False, False, False]
    tokens = list(generator.stream(handles, "x = ", 3))
    assert len(tokens) == 3 and len(held_while_reading) == 3  # cached: nothing read again
