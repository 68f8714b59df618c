"""A marketplace commission in team mode, end to end: a real ``taas marketplace serve`` whose
settings name the ``buyer-commission`` deployment, a real Prefect server and process worker
(tests/line_cluster.py), moto's S3, a PostgreSQL commission store and an ``mlflow server``. The
marketplace and the worker share nothing else: each has its own home; the buyer's upload and
the base reach the worker only through the object store; the worker registers into the shared
library and appends to the team's transparency log; the buyer then downloads the exclusive
expert from the marketplace and ``taas verify`` accepts it against the published log."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
import yaml

from factory.corpus import licence_paragraphs
from tests.conftest import REPO, free_port
from tests.test_marketplace import sign_up

DEPLOYMENT = "buyer-commission/buyer-commission"
TERMS = {
    "budget": {"cycles": 1, "steps_per_cycle": 12, "production_lines": 2, "processes_per_line": 2,
               "batch_size": 4, "seq_len": 64, "learning_rate": 0.01},
    "heldout": {"pol_batches": 4, "eval_blocks": 32},
    "router": {"steps": 10},
    "benchmarks": {"limit": 10},
}  # fmt: skip


def _states(browser: httpx.Client) -> list[str]:
    return re.findall(r'class="commission-state">([^<]+)<', browser.get("/account").text)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # servers, deploy, a worker and a whole tiny commission, on 2 cores
def test_team_mode_commission_runs_on_a_worker(tiny_base, tmp_path, postgres_url, capsys):
    from cli.main import main
    from infra.services import start_mlflow_server
    from tests.line_cluster import BUCKET, kill_tree, local_pool, wait_for

    key = tmp_path / "secrets" / "factory.pem"  # the team's attestation key, on every machine
    shared = {
        "TAAS_DATABASE_URL": postgres_url,
        "TAAS_OBJECT_STORE_URL": f"s3://{BUCKET}/factory",
        "TAAS_TRANSPARENCY_URL": f"s3://{BUCKET}/transparency",
        "TAAS_FACTORY_KEY_PATH": str(key),
        "TAAS_S3_ENDPOINT_URL": "{s3}",
    }
    rows = licence_paragraphs()[:300]
    data = "".join(json.dumps({"text": r}) + "\n" for r in rows).encode()
    mlflow = start_mlflow_server(
        f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlartifacts"), free_port(),
        log_path=tmp_path / "mlflow.log",
    )  # fmt: skip
    shared["TAAS_MLFLOW_TRACKING_URI"] = mlflow.url
    try:
        with local_pool(tmp_path / "pool", workers=("buyer-worker",), pool="factory",
                        deployment="buyer-commission", worker_env=shared) as pool:  # fmt: skip
            worker = pool["workers"]["buyer-worker"]
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
            # A tiny commission's terms (the defaults train 3 cycles of 2 lines x 30 steps).
            terms = tmp_path / "commission-terms.yaml"
            terms.write_text(json.dumps(TERMS))
            server = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "marketplace", "serve", "--port", str(port),
                 "--commission-terms", str(terms)],
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
                    states, token = _commission(browser, data, worker["folder"] / "worker.log")
                    bundle, log, public = _download_and_publication(browser, tmp_path)
                with httpx.Client(base_url=url, timeout=60) as stranger:
                    name = bundle.name.removesuffix("-1.tar.gz")
                    assert stranger.get(f"/experts/{name}").status_code == 404  # exclusive
            finally:
                kill_tree(server)
    finally:
        mlflow.stop()

    assert states[0] in ("starting", "submitted", "validated"), states
    assert "running" in states and states[-1] == "registered", states
    # The marketplace started no process and trained nothing: it holds the upload and a run id.
    (marker,) = (market_home / "marketplace" / "uploads").rglob("*.submitted.json")
    assert set(json.loads(marker.read_text())) == {"flow_run_id", "upload_key"}
    assert not (market_home / "commissions").exists()
    # The worker ran it from what the object store gave it: the same spec bytes, the same data.
    staged = marker.parent / token
    (inbound,) = (worker["home"] / "marketplace" / "inbound").iterdir()
    assert sorted(p.name for p in inbound.iterdir()) == ["data.jsonl", "spec.yaml"]
    assert (inbound / "spec.yaml").read_bytes() == (staged / "spec.yaml").read_bytes()
    assert (inbound / "data.jsonl").read_bytes() == data
    spec = yaml.safe_load((inbound / "spec.yaml").read_text())  # the operator's terms, in full
    assert {name: spec[name] for name in TERMS} == TERMS
    # What the buyer downloaded verifies offline against the published log and key.
    code = main(["verify", str(bundle), "--log", str(log), "--key", str(public)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1].startswith(f"verified {name}@1: "), out
    assert "entry 0 of 1 in log" in out[-1]


def _commission(browser: httpx.Client, data: bytes, worker_log) -> tuple[list[str], str]:
    """Signs up, uploads, submits (twice: the second starts nothing) and follows the account
    page until the commission ends; returns the states seen and the upload's token."""
    from tests.line_cluster import wait_for

    sign_up(browser, "Team buyer")
    csrf = re.findall(r'name="csrf" value="([0-9a-f]*)"', browser.get("/commission").text)[0]
    fields = {"domain": "licence-law", "visibility": "private", "csrf": csrf}
    page = browser.post("/commission", data=fields, files={"data": ("d.jsonl", data)})
    assert page.status_code == 200, page.text
    token = re.findall(r'action="/commission/([0-9a-f]{16})/submit"', page.text)[0]
    for _ in range(2):
        submitted = browser.post(f"/commission/{token}/submit", data={"csrf": csrf})
        assert submitted.status_code == 303, submitted.text
    states: list[str] = []

    def ended() -> bool:
        states.extend(_states(browser)[-1:])
        return bool(states) and states[-1] in ("registered", "not started", "failed")

    try:
        wait_for("the commission to end on the worker", ended, 1500, step=2)
    except AssertionError:
        raise AssertionError((states[-5:], worker_log.read_text()[-3000:])) from None
    assert states[-1] == "registered", (states[-5:], worker_log.read_text()[-3000:])
    return states, token


def _download_and_publication(browser: httpx.Client, folder) -> tuple:
    """The account page's download (its first look claimed the exclusive expert), the
    published transparency log and the factory key, as files in ``folder``."""
    account = browser.get("/account").text
    action = re.findall(r'<form method="post" action="(/download/[^"]+)"', account)[0]
    expires = re.findall(r'name="expires" value="(\d+)"', account)[0]
    sig = re.findall(r'name="sig" value="([^"]+)"', account)[0]
    got = browser.post(action, data={"expires": expires, "sig": sig})
    assert got.status_code == 200, got.text
    bundle = folder / f"{action.split('/')[-2]}-{action.split('/')[-1]}.tar.gz"
    bundle.write_bytes(got.content)
    log, public = folder / "published-log.jsonl", folder / "factory-key.pub"
    log.write_bytes(browser.get("/transparency-log").content)
    public.write_bytes(browser.get("/transparency-log/key").content)
    return bundle, log, public


def test_submit_without_a_reachable_deployment_is_one_line_and_starts_nothing(
    tiny_base, tmp_path, monkeypatch
):
    """A server that cannot be reached (or an unknown deployment): one line naming the setting
    (the route answers it as a 503), and no marker, so the buyer can submit again later."""
    from decimal import Decimal

    from infra.settings import get_settings
    from infra.storage import StorageUnavailable
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

    # A store that refuses the upload: refused before any run is asked for.
    def unreachable(*args, **kwargs):
        raise StorageUnavailable("s3: endpoint http://127.0.0.1:9 unreachable")

    monkeypatch.setattr("infra.line_io.put_tree", unreachable)
    with pytest.raises(RunnerUnavailable) as refused:
        desk.submit("buyer-1", staged.token)
    assert str(refused.value) == (
        "object_store_url: cannot take the upload "
        "(StorageUnavailable: s3: endpoint http://127.0.0.1:9 unreachable)"
    )
    assert not list(desk.uploads.rglob("*.submitted.json"))
