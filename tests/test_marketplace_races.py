"""Races against a served marketplace: 32 concurrent HTTP clients, SQLite and PostgreSQL.

The app runs under uvicorn in a forked process on a loopback port (as in production); the
clients are threads here released together by a barrier, and the ledger is read back from the
database afterwards. Each test holds on SQLite and on a real PostgreSQL server (``postgres_url``,
see tests/pg.py): exactly one exclusive licence however many buyers race for it, the losers told
(409) and charged nothing; a purchase repeated at once books its fee once; and the first
downloads of an expert nobody fetched yet all get the same verified bundle, fetched once.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import free_port
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_marketplace import build_market

from infra.atomic import committed_dir
from marketplace.app import create_app
from marketplace.auth import csrf_token, session_cookie, sign_link
from marketplace.catalog import LibraryCatalog
from marketplace.expert_cache import ExpertCache
from marketplace.licensing import Charge, Licence

CLIENTS = 32


def _serve(app, port: int, engine) -> None:
    # The forked server must not share the parent's pooled database connections.
    engine.dispose(close=False)
    uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", backlog=256)
    ).run()


def serve(market):
    port = free_port()
    child = multiprocessing.get_context("fork").Process(
        target=_serve,
        args=(create_app(market), port, market.licensing.engine),
        daemon=True,
    )
    child.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(url + "/api/readiness", timeout=2)
            return child, url
        except httpx.HTTPError:
            assert time.time() < deadline and child.is_alive(), "uvicorn did not start"
            time.sleep(0.2)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def served(tiny_base, tmp_path, ledger_url):
    market = build_market(tiny_base, tmp_path, ledger_url=ledger_url)
    child, url = serve(market)
    yield market, url
    child.terminate()
    child.join(timeout=30)
    market.licensing.engine.dispose()


def session_of(market, buyer_id: str) -> tuple[dict[str, str], str]:
    """A signed-in browser's cookie and CSRF token, as the sign-up page would hand them out."""
    cookie = session_cookie(market.secret, buyer_id, int(time.time()) + 600)
    return {"taas_session": cookie}, csrf_token(market.secret, cookie)


def race(url: str, requests: list[tuple[str, dict, dict]]) -> list[httpx.Response]:
    """POSTs every (path, form, cookies) at once from its own thread and client."""
    barrier = threading.Barrier(len(requests))
    answers: list[httpx.Response | None] = [None] * len(requests)

    def one(index: int) -> None:
        path, form, cookies = requests[index]
        with httpx.Client(base_url=url, cookies=cookies, timeout=120) as http:
            barrier.wait()
            answers[index] = http.post(path, data=form)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(answer is not None for answer in answers)
    return answers


def rows(market, model, **where):
    with Session(market.licensing.engine) as session:
        stmt = select(model).filter_by(**where)
        return list(session.scalars(stmt))


@pytest.mark.slow  # a served app per database, 32 clients each
def test_exclusive_licence_is_sold_once(served):
    market, url = served
    buyers = [market.licensing.create_buyer(f"racer-{i}") for i in range(CLIENTS)]
    requests = []
    for buyer in buyers:
        cookies, csrf = session_of(market, buyer)
        form = {"kind": "exclusive", "csrf": csrf}
        requests.append(("/experts/tax-expert/license", form, cookies))
    answers = race(url, requests)
    codes = [answer.status_code for answer in answers]
    # a loser is told: 409 when it lost inside the grant, 404 once the expert was private
    assert codes.count(303) == 1 and set(codes) <= {303, 404, 409}, codes
    print(f"\n[race] exclusive: 1 granted, {codes.count(409)} x 409, {codes.count(404)} x 404")
    winner = buyers[codes.index(303)]
    assert all("exclusively" in a.json()["detail"] for a in answers if a.status_code == 409)
    granted = rows(market, Licence, expert_name="tax-expert")
    assert [(lic.buyer_id, lic.kind) for lic in granted] == [(winner, "exclusive")]
    premium = market.catalog.get("tax-expert").price.exclusive_premium
    charges = rows(market, Charge, expert_name="tax-expert")
    assert [(c.buyer_id, c.item, c.amount) for c in charges] == [
        (winner, "exclusive_premium", str(premium))
    ]
    # everybody else was told and charged nothing
    for buyer in buyers:
        if buyer != winner:
            assert market.licensing.licences_of(buyer) == []
            assert rows(market, Charge, buyer_id=buyer) == []


@pytest.mark.slow
def test_exclusive_against_other_licensees_never_both(served):
    """Half the racers want the expert exclusively, half a usage licence: either one exclusive
    and nobody else, or usage licences and no exclusive: never both."""
    market, url = served
    buyers = [market.licensing.create_buyer(f"mixed-{i}") for i in range(CLIENTS)]
    requests = []
    for index, buyer in enumerate(buyers):
        cookies, csrf = session_of(market, buyer)
        kind = "exclusive" if index % 2 else "usage"
        requests.append(("/experts/law-expert/license", {"kind": kind, "csrf": csrf}, cookies))
    answers = race(url, requests)
    assert {a.status_code for a in answers} <= {303, 404, 409}  # 404: private by then
    granted = rows(market, Licence, expert_name="law-expert")
    exclusive = [lic for lic in granted if lic.kind == "exclusive"]
    assert len(granted) == sum(a.status_code == 303 for a in answers) >= 1
    if exclusive:
        assert len(granted) == 1
    charged = {c.buyer_id for c in rows(market, Charge, expert_name="law-expert")}
    assert charged == {lic.buyer_id for lic in exclusive}


@pytest.mark.slow
def test_repeated_purchase_books_the_fee_once(served):
    market, url = served
    buyer = market.licensing.create_buyer("clicker")
    cookies, csrf = session_of(market, buyer)
    form = {"kind": "weight", "csrf": csrf}
    answers = race(url, [("/experts/finance-expert/license", form, cookies)] * CLIENTS)
    assert [a.status_code for a in answers] == [303] * CLIENTS
    assert len(rows(market, Licence, buyer_id=buyer)) == 1
    price = market.catalog.get("finance-expert").price
    charges = rows(market, Charge, buyer_id=buyer)
    assert sorted((c.item, c.amount) for c in charges) == [
        ("maintenance", str(price.maintenance_fee)),
        ("weight_fee", str(price.weight_fee)),
    ]


def _slow_copy(source: Path, log: Path):
    """A fetch like the library's download: writes a committed folder next to the destination
    and renames it into place; slow, so concurrent first requests overlap."""

    def fetch(name: str, version: str, dest: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{name}@{version}\n")
        with committed_dir(dest) as tmp:
            for item in sorted(source.iterdir()):
                if item.name != "COMMITTED.json":
                    time.sleep(0.1)
                    shutil.copy2(item, tmp / item.name)

    return fetch


@pytest.mark.slow
def test_first_downloads_share_one_verified_fetch(tiny_base, tmp_path):
    market = build_market(tiny_base, tmp_path)
    static = market.catalog
    log = tmp_path / "fetches.log"
    cache = ExpertCache(tmp_path / "cold", _slow_copy(static.expert_folder("law-expert", "1"), log))
    # a library-backed catalog whose expert folders start cold
    market.catalog = LibraryCatalog(
        lambda: ["law-expert"],
        lambda name: (["1"], "1", {"domain": "law"}, ""),
        lambda name, version: cache.folder(name, version),
    )
    buyers = [market.licensing.create_buyer(f"dl-{i}") for i in range(CLIENTS)]
    for buyer in buyers:
        market.grant(buyer, market.catalog.get("law-expert"), "weight")
    child, url = serve(market)
    try:
        requests = []
        for buyer in buyers:
            link = sign_link(
                market.secret, f"/download/{buyer}/law-expert/1", int(time.time()) + 600
            )
            path, _, query = link.partition("?")
            expires, sig = (part.split("=")[1] for part in query.split("&"))
            requests.append((path, {"expires": expires, "sig": sig}, {}))
        answers = race(url, requests)
    finally:
        child.terminate()
        child.join(timeout=30)
    assert [a.status_code for a in answers] == [200] * CLIENTS, [a.text[:200] for a in answers]
    digests = {a.headers["X-Bundle-SHA256"] for a in answers}
    assert len(digests) == 1
    assert {hashlib.sha256(a.content).hexdigest() for a in answers} == digests
    assert log.read_text().splitlines() == ["law-expert@1"]  # one fetch for 32 first requests
    logged = [d for buyer in buyers for d in market.licensing.downloads_of(buyer)]
    assert len(logged) == CLIENTS and {d.bundle_sha256 for d in logged} == digests
