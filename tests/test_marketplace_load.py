"""Load: 20 concurrent API clients on loopback; no errors, metered tokens equal served tokens.

The duration comes from ``TAAS_LOAD_SECONDS`` (default 30) and the request count is bounded by
``TAAS_LOAD_MAX_REQUESTS`` (default 600), whichever ends first.
"""

from __future__ import annotations

import os
import random
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import free_port
from test_marketplace import build_market

from marketplace.app import create_app

CLIENTS = 20


@pytest.fixture
def served(tiny_base, tmp_path):
    """The app under uvicorn in its own (forked) process, as it runs in production: the
    clients below reach it over HTTP only, and the ledger (SQLite) is read back here, so the
    server shares nothing with the test process but the database file."""
    import multiprocessing

    market = build_market(tiny_base, tmp_path, max_new_tokens=8)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(market), host="127.0.0.1", port=port, log_level="warning")
    )
    child = multiprocessing.get_context("fork").Process(target=server.run, daemon=True)
    child.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(url + "/readiness", timeout=2)
            break
        except httpx.HTTPError:
            assert time.time() < deadline and child.is_alive(), "uvicorn did not start"
            time.sleep(0.2)
    yield market, url
    child.terminate()
    child.join(timeout=30)


@pytest.mark.slow  # 30 s of sustained load by default, plus server start-up
def test_concurrent_clients_are_metered_exactly(served):
    market, url = served
    seconds = float(os.environ.get("TAAS_LOAD_SECONDS", "30"))
    budget = [int(os.environ.get("TAAS_LOAD_MAX_REQUESTS", "600"))]
    budget_lock = threading.Lock()
    experts = ["law-expert", "medicine-expert", "finance-expert"]
    buyers = []
    for i in range(CLIENTS):
        buyer = market.licensing.create_buyer(f"load-{i}")
        for name in experts:
            market.grant(buyer, market.catalog.get(name), "usage")
        buyers.append((buyer, market.licensing.issue_key(buyer)))
    served_tokens = [0] * CLIENTS
    requests = [0] * CLIENTS
    errors: list[str] = []
    stop_at = time.time() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        headers = {"Authorization": f"Bearer {buyers[index][1]}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            while time.time() < stop_at:
                with budget_lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                model = rng.choice(experts + ["mixture"])
                body = {
                    "model": model,
                    "prompt": f"class Row{rng.randint(0, 99)}:",
                    "max_tokens": rng.randint(1, 4),
                }
                try:
                    response = http.post("/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
                served_tokens[index] += response.json()["usage"]["completion_tokens"]
                requests[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    elapsed = time.time() - started
    assert errors == []
    assert sum(requests) >= CLIENTS, f"only {sum(requests)} requests in {elapsed:.1f}s"
    for index, (buyer, _) in enumerate(buyers):
        metered = sum(market.licensing.usage(buyer).values())
        assert metered == served_tokens[index], buyer
    print(
        f"\n[load] {sum(requests)} requests, {sum(served_tokens)} tokens in {elapsed:.1f}s "
        f"from {CLIENTS} clients"
    )
