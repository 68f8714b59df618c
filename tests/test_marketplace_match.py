"""The marketplace's "Find an expert for my data" page, the demand board it feeds, and the
commission pages (upload, estimate, submit, state on the account page), on two tiny experts."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from factory.base_model import base_model_sha256
from factory.corpus import licence_paragraphs
from factory.expert import save_expert
from factory.ledger import Ledger
from marketplace.app import create_app
from marketplace.catalog import StaticCatalog, entry_from_tags
from marketplace.licensing import Licensing
from marketplace.market import Market, MarketplaceConfig
from tests.test_marketplace import presession_csrf, sign_up
from tests.test_mixture_experts import digits_text, experts_for, licence_text, train_expert


def csrf_of(html: str) -> str:
    return re.findall(r'name="csrf" value="([0-9a-f]*)"', html)[0]


def ranked(html: str) -> list[str]:
    return re.findall(r'class="card expert-card match-row" data-name="([^"]+)"', html)


@pytest.fixture(scope="module")
def market(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("match-market")
    digits, licence = experts_for(tiny_base)
    # A stronger licence expert that one buyer holds exclusively.
    secret = train_expert(str(tiny_base.path), tiny_base.sha256, "licence", steps=80)
    secret = replace(
        secret, manifest=secret.manifest.model_copy(update={"expert_id": "secret-expert"})
    )
    entries, folders = [], {}
    for expert in (digits, licence, secret):
        name = expert.manifest.expert_id
        folders[(name, "1")] = save_expert(folder / name, expert)
        tags = {"domain": expert.manifest.domain, "base_model": tiny_base.name,
                "base_model_sha256": tiny_base.sha256, "cycles": "1"}  # fmt: skip
        entries.append(entry_from_tags(name, ["1"], "1", tags))
    config = MarketplaceConfig(secret="test-secret-0123456789", base_model_path=tiny_base.path)
    ledger = Ledger(f"sqlite:///{folder / 'ledger.db'}")
    return Market(config, StaticCatalog(entries, folders), Licensing(ledger))


def test_match_ranks_own_expert_and_never_shows_anothers_exclusive(market, tiny_base):
    assert base_model_sha256(tiny_base.path) == tiny_base.sha256  # the matcher's filter
    owner = market.licensing.create_buyer("Owner")
    market.grant(owner, market.catalog.get("secret-expert"), "exclusive")
    digits = "\n\n".join(digits_text(240, seed=99))  # arithmetic no expert saw
    licences = "\n\n".join(licence_text()[-6:])
    with TestClient(create_app(market)) as visitor, TestClient(create_app(market)) as buyer:
        form = visitor.get("/match")
        assert form.status_code == 200 and "Find an expert for my data" in form.text
        page = visitor.post("/match", data={"text": digits, "csrf": presession_csrf(visitor)})
        assert page.status_code == 200, page.text
        assert ranked(page.text) == ["digits-expert", "licence-expert"]
        assert 'id="best-match">digits-expert<' in page.text
        sign_up(buyer, "Other buyer")
        csrf = csrf_of(buyer.get("/match").text)
        upload = ("sample.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in
                                          licences.split("\n\n")).encode())  # fmt: skip
        page = buyer.post("/match", data={"csrf": csrf}, files={"sample": upload})
        assert page.status_code == 200, page.text
        assert ranked(page.text)[0] == "licence-expert"
        assert "secret-expert" not in page.text
        assert "refine with my data" in page.text and 'class="license-form"' in page.text
        # forms without this session's token are refused
        assert buyer.post("/match", data={"text": digits}).status_code == 403
    with TestClient(create_app(market)) as holder:
        from marketplace.auth import session_cookie

        cookie = session_cookie(market.secret, owner, int(time.time()) + 600, 0)
        holder.cookies.set("taas_session", cookie)
        page = holder.post("/match", data={"text": licences, "csrf": csrf_of(
            holder.get("/match").text)})  # fmt: skip
        assert page.status_code == 200, page.text[:300]
        assert ranked(page.text)[0] == "secret-expert"  # its owner sees it, ranked first


def test_match_refuses_oversize_and_malformed_samples(market):
    with TestClient(create_app(market)) as browser:
        csrf = presession_csrf(browser)
        big = ("big.txt", b"word " * (1024 * 1024 // 5 + 10))
        refused = browser.post("/match", data={"csrf": csrf}, files={"sample": big})
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith("sample: big.txt is 1048")
        huge = ("huge.txt", b"x" * (market.config.max_upload_bytes + 1))
        refused = browser.post("/match", data={"csrf": csrf}, files={"sample": huge})
        assert refused.status_code == 413
        bad = ("s.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n')
        refused = browser.post("/match", data={"csrf": csrf}, files={"sample": bad})
        assert refused.status_code == 400
        assert (
            refused.json()["detail"] == "sample: s.jsonl line 2 has no string field 'text'; add one"
        )


def test_unanswered_searches_and_matches_go_to_the_demand_board(tiny_base, tmp_path):
    config = MarketplaceConfig(secret="test-secret-0123456789", base_model_path=tiny_base.path)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    empty = Market(config, StaticCatalog([], {}), Licensing(ledger))
    text = ("Maritime salvage claims: the salvor's award under maritime law depends on the "
            "salvage value. Salvage of a vessel in peril. ") * 6  # fmt: skip
    with TestClient(create_app(empty)) as browser:
        page = browser.post("/match", data={"text": text, "csrf": presession_csrf(browser)})
        assert page.status_code == 200 and "demand board" in page.text
        assert browser.get("/", params={"q": "Salvage tugboats"}).status_code == 200
        board = browser.get("/readiness").text
    shown = re.findall(r"<li>(\w+) <span class=\"muted\">\((\d+)\)", board)
    # one row per request that asked: "salvage" by both, the rest once, ties alphabetical
    assert shown[0] == ("salvage", "2")
    # the match's 8 most frequent content words, the search's two ("value", "vessel" were
    # rarer in the sample and are not kept)
    assert dict(shown) == {"salvage": "2", "award": "1", "claims": "1", "depends": "1",
                           "law": "1", "maritime": "1", "peril": "1", "salvor": "1",
                           "tugboats": "1"}  # fmt: skip
    stored = (tmp_path / "ledger.db").read_bytes()
    assert b"salvage" in stored and b"vessel" not in stored and b"Maritime salvage" not in stored


@pytest.mark.slow  # the local runner: a background `taas commission submit` reaching "running"
def test_commission_upload_estimate_submit_and_state(market, tmp_path, taas_home):
    rows = licence_paragraphs()[:300]
    good = "".join(json.dumps({"text": r}) + "\n" for r in rows).encode()
    with TestClient(create_app(market)) as browser:
        assert browser.get("/commission", follow_redirects=False).status_code == 303
        sign_up(browser, "Commissioner")
        csrf = csrf_of(browser.get("/commission").text)
        fields = {"domain": "licence-law", "visibility": "private", "csrf": csrf}
        broken = ("d.jsonl", b'{"text": "ok"}\n{broken\n')
        refused = browser.post("/commission", data=fields, files={"data": broken})
        assert refused.status_code == 400
        detail = refused.json()["detail"]
        assert (
            detail
            == "data.0: cannot read d.jsonl as jsonl (JSON parse error); fix the file or set format"
        )
        refused = browser.post("/commission", data=fields, files={"data": ("d.exe", good)})
        assert refused.json()["detail"].startswith("data: d.exe: name a file ending in .jsonl")
        huge = ("d.jsonl", b"x" * (market.config.max_upload_bytes + 1))
        assert browser.post("/commission", data=fields, files={"data": huge}).status_code == 413
        assert not list((taas_home / "marketplace" / "uploads").rglob("*.jsonl"))  # nothing kept
        page = browser.post("/commission", data=fields, files={"data": ("d.jsonl", good)})
        assert page.status_code == 200, page.text
        # default budget: 3 cycles x 30 steps x 2 lines = 180 line-steps at 0.05
        assert "180 line-steps" in page.text and 'id="commission-cost">9.00<' in page.text
        token = re.findall(r'action="/commission/([0-9a-f]{16})/submit"', page.text)[0]
        started = browser.post(f"/commission/{token}/submit", data={"csrf": csrf})
        assert started.status_code == 200 and "commission-state" in started.text
        marker = next((taas_home / "marketplace" / "uploads").rglob("*.submitted.json"))
        pid = json.loads(marker.read_text())["pid"]
        try:
            states = []
            deadline = time.time() + 240
            while time.time() < deadline:
                account = browser.get("/account").text
                states += re.findall(r'class="commission-state">([^<]+)<', account)
                if states[-1] in ("running", "failed", "not started"):
                    break
                time.sleep(1)
            # the store's states as the background commission moves through intake
            assert states[0] in ("starting", "validated") and states[-1] == "running", states
        finally:
            os.killpg(pid, signal.SIGKILL)
        spec = next(Path(marker.parent).rglob("spec.yaml")).read_text()
        assert "visibility: exclusive" in spec and "warm_start: auto" in spec
