"""A marketplace commission in team mode: a real ``taas marketplace serve`` whose settings name
the ``buyer-commission`` deployment, a real Prefect server and process worker (tests/
line_cluster.py), moto's S3 and a PostgreSQL commission store. The marketplace and the worker
share nothing else: each has its own home, and the buyer's upload and the base reach the worker
only through the object store."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from factory.corpus import licence_paragraphs
from tests.conftest import REPO, free_port
from tests.test_marketplace import sign_up

DEPLOYMENT = "buyer-commission/buyer-commission"


def _states(browser: httpx.Client) -> list[str]:
    return re.findall(r'class="commission-state">([^<]+)<', browser.get("/account").text)


@pytest.mark.slow
@pytest.mark.timeout(900)  # server, deploy, worker, a flow-run process and intake, on 2 cores
def test_team_mode_commission_runs_on_a_worker(tiny_base, tmp_path, postgres_url):
    from tests.line_cluster import BUCKET, kill_tree, local_pool, wait_for

    shared = {
        "TAAS_DATABASE_URL": postgres_url,
        "TAAS_OBJECT_STORE_URL": f"s3://{BUCKET}/factory",
        "TAAS_S3_ENDPOINT_URL": "{s3}",
    }
    rows = licence_paragraphs()[:300]
    data = "".join(json.dumps({"text": r}) + "\n" for r in rows).encode()
    with local_pool(tmp_path / "pool", workers=("buyer-worker",), pool="factory",
                    deployment="buyer-commission", worker_env=shared) as pool:  # fmt: skip
        market_home = tmp_path / "market"
        env = {
            **pool["client_env"],
            **{k: v.replace("{s3}", pool["s3"]) for k, v in shared.items()},
            "TAAS_HOME": str(market_home),
            "TAAS_BASE_MODEL_DIR": str(tiny_base.path),
            "TAAS_COMMISSION_DEPLOYMENT": DEPLOYMENT,
            "PYTHONPATH": str(REPO),
        }
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "marketplace", "serve", "--port", str(port)],
            env=env, cwd=REPO, stdout=open(tmp_path / "market.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"

            def up() -> bool:
                try:
                    return httpx.get(url + "/", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for("the marketplace", up, 180)
            with httpx.Client(base_url=url, timeout=120) as browser:
                sign_up(browser, "Team buyer")
                csrf = re.findall(r'name="csrf" value="([0-9a-f]*)"',
                                  browser.get("/commission").text)[0]  # fmt: skip
                fields = {"domain": "licence-law", "visibility": "private", "csrf": csrf}
                page = browser.post("/commission", data=fields, files={"data": ("d.jsonl", data)})
                assert page.status_code == 200, page.text
                token = re.findall(r'action="/commission/([0-9a-f]{16})/submit"', page.text)[0]
                submitted = browser.post(f"/commission/{token}/submit", data={"csrf": csrf})
                assert submitted.status_code == 303, submitted.text
                again = browser.post(f"/commission/{token}/submit", data={"csrf": csrf})
                assert again.status_code == 303  # a second submit starts nothing

                states: list[str] = []

                def moved() -> bool:
                    states.extend(_states(browser)[-1:])
                    return bool(states) and states[-1] in ("running", "not started", "failed")

                worker_log = pool["workers"]["buyer-worker"]["folder"] / "worker.log"
                try:
                    wait_for("the commission to run on the worker", moved, 480, step=1)
                except AssertionError:
                    raise AssertionError((states, worker_log.read_text()[-3000:])) from None
                assert states[0] in ("starting", "submitted", "validated"), states
                assert states[-1] == "running", (states, worker_log.read_text()[-3000:])
        finally:
            kill_tree(server)
        worker_home = pool["workers"]["buyer-worker"]["home"]

    # The marketplace started no process and ran nothing: it holds the upload and the run's id.
    (marker,) = (market_home / "marketplace" / "uploads").rglob("*.submitted.json")
    runner = json.loads(marker.read_text())
    assert set(runner) == {"flow_run_id", "upload_key"}
    assert not (market_home / "commissions").exists()
    # The worker ran it from what the object store gave it: the same spec bytes, the same data.
    staged = marker.parent / token
    (inbound,) = (worker_home / "marketplace" / "inbound").iterdir()
    assert (inbound / "spec.yaml").read_bytes() == (staged / "spec.yaml").read_bytes()
    assert (inbound / "data.jsonl").read_bytes() == data
    assert sorted(p.name for p in inbound.iterdir()) == ["data.jsonl", "spec.yaml"]
    assert list((worker_home / "commissions").iterdir())


def test_submit_without_a_reachable_deployment_is_one_line_and_starts_nothing(
    tiny_base, tmp_path, monkeypatch
):
    """A server that cannot be reached (or an unknown deployment): one line naming the setting
    (the route answers it as a 503), and no marker, so the buyer can submit again later."""
    from decimal import Decimal

    from infra.settings import get_settings
    from marketplace.commission_desk import CommissionDesk, RunnerUnavailable

    settings = get_settings(home=tmp_path / "home", commission_deployment="nowhere/none",
                            object_store_url=str(tmp_path / "objects"))  # fmt: skip
    desk = CommissionDesk(settings, tiny_base.path, price_per_step=Decimal("0.05"))
    rows = licence_paragraphs()[:300]
    body = "".join(json.dumps({"text": r}) + "\n" for r in rows).encode()
    staged = desk.stage("buyer-1", body, "d.jsonl", "licence-law", "public")

    def refuse(*args, **kwargs):
        raise ConnectionError("All connection attempts failed")

    monkeypatch.setattr("prefect.deployments.run_deployment", refuse)
    with pytest.raises(RunnerUnavailable) as refused:
        desk.submit("buyer-1", staged.token)
    assert str(refused.value) == (
        "commission_deployment: nowhere/none cannot take runs "
        "(ConnectionError: All connection attempts failed)"
    )
    assert not list(desk.uploads.rglob("*.submitted.json"))
    assert desk.commissions_of("buyer-1") == []
