"""Production lines on a Prefect work pool, with the real engines on this machine.

A real ``prefect server start`` on a loopback port (its own PREFECT_HOME, its database on the
session's PostgreSQL server, as a pool of several machines would have it), the ``train-line``
deployment from prefect.yaml (``prefect deploy``), two ``prefect worker start --type process``
workers, each in its own working folder with its own TAAS_HOME and PREFECT_HOME, and moto's S3
server: the only thing the cycle (this process, with a third TAAS_HOME) shares with the workers.

1. A cycle's four lines complete, two on each worker, their candidates back in the cycle's folder;
   each worker takes two runs at once (``--limit 2``) but its machine's one process slot lets
   only one of them train at a time.
2. A line's worker is killed (SIGKILL of its whole process tree) once the line has published a
   checkpoint; the cycle notices the silent heartbeat, resubmits, and the other worker resumes
   from the newest checkpoint in the store, losing no more steps than the checkpoint interval.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from tests.line_cluster import (
    BUCKET,
    kill_tree,
    local_pool,
    pool_cycle,
    run_train_step,
    s3_creds,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_server):
    """Server, deployment, two workers and the S3 endpoint; every process tree killed after."""
    from tests.pg import new_database

    database = new_database(postgres_server)
    with local_pool(tmp_path_factory.mktemp("pool"), limit=2, database_url=database) as pool:
        yield pool


def test_four_lines_two_per_worker(cluster, tiny_base, prepared_data):
    from factory.candidate import CandidateFiles
    from infra.atomic import verify_committed

    inputs, plan, settings = pool_cycle(cluster, tiny_base, prepared_data, "four", 4, 2)
    results = run_train_step(cluster["api"], inputs, plan, settings)
    assert [r.outcome for r in results] == ["ok"] * 4, [r.reason for r in results]
    assert Counter(r.worker for r in results) == {"wA": 2, "wB": 2}
    for line, result in zip(plan.lines, results, strict=True):
        assert result.contributor_id == line.contributor_id
        assert result.tokens_seen == 2 * 4 * 64  # steps x batch x seq_len, one rank
        folder = result.candidate_path
        assert folder == inputs.work_dir("lines") / line.contributor_id / "candidate"
        assert verify_committed(folder)
        manifest = json.loads(CandidateFiles(folder).manifest.read_text())
        assert manifest["contributor_id"] == line.contributor_id
        # the worker that ran it holds its work folder; the other never saw it
        ran = cluster["workers"][result.worker]["home"] / "line-work"
        assert any(p.name == line.contributor_id for p in ran.rglob(line.contributor_id))
    # nothing of a line's own files on the cycle's side but the fetched candidates
    assert not (settings.home / "line-work").exists()
    assert not list(inputs.work_dir("lines").rglob("checkpoints"))
    # the base model went up once, as one tree, however many lines used it
    import boto3

    from infra import line_io

    s3 = boto3.client("s3", endpoint_url=cluster["s3"], **s3_creds())
    trees = [
        o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="factory/trees/")["Contents"]
    ]
    base_tree = line_io.tree_sha256(line_io.tree_manifest(tiny_base.path))
    assert f"factory/trees/{base_tree}.json" in trees
    # base, the data's train split, and per line its candidate and its one checkpoint (step 1)
    assert len(trees) == 2 + 4 + 4
    # on each machine (one process slot) one line trained at a time, the other waiting staged
    from flows.train_line import LineOutcome

    page = s3.list_objects_v2(Bucket=BUCKET, Prefix="factory/lines/expert-four/")["Contents"]
    outcomes = [LineOutcome.model_validate_json(s3.get_object(Bucket=BUCKET, Key=o["Key"])[
        "Body"].read()) for o in page if "/results/" in o["Key"]]  # fmt: skip
    assert len(outcomes) == 4
    for worker in ("wA", "wB"):
        first, second = sorted((o for o in outcomes if o.worker == worker),
                               key=lambda o: o.train_window)  # fmt: skip
        assert first.train_window[1] <= second.train_window[0], (worker, first, second)
        # ... and the second was taken while the first trained: it waited for the slot
        assert second.timings["wait_s"] > 1.0, second.timings


def test_killed_worker_line_resumes_on_the_other(cluster, tiny_base, prepared_data):
    import boto3

    steps, every = 240, 60  # TrainConfig.for_line: a checkpoint every quarter of the steps
    # 16 blocks a step: slow enough that a checkpoint interval (60 steps) is many times the
    # time a checkpoint takes to reach the store and this test to see it and kill the worker.
    inputs, plan, settings = pool_cycle(
        cluster, tiny_base, prepared_data, "kill", 1, steps, batch_size=16
    )
    s3 = boto3.client("s3", endpoint_url=cluster["s3"], **s3_creds())
    box: dict = {}

    def run() -> None:
        try:
            box["results"] = run_train_step(cluster["api"], inputs, plan, settings)
        except BaseException as exc:  # reported by the main thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def keys(prefix: str) -> list[str]:
        page = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"factory/lines/expert-kill/{prefix}")
        return [o["Key"] for o in page.get("Contents", [])]

    def checkpointed_by():
        if not [k for k in keys("") if "/checkpoints/step-" in k]:
            return None
        (beat,) = [k for k in keys("") if "/attempts/" in k]
        return json.loads(s3.get_object(Bucket=BUCKET, Key=beat)["Body"].read())["worker"]

    victim = wait_for("the line's first published checkpoint", checkpointed_by, 600, 0.2)
    kill_tree(cluster["workers"][victim]["proc"])
    thread.join(timeout=240)
    assert not thread.is_alive(), "the cycle did not finish after the worker was killed"
    assert "error" not in box, box.get("error")
    (result,) = box["results"]
    survivor = ({"wA", "wB"} - {victim}).pop()
    assert result.outcome == "ok", result.reason
    assert result.worker == survivor
    resumed = result.resumed_from_step
    assert resumed is not None and resumed % every == 0 and 0 < resumed < steps
    resume_events = [e for e in result.events if e.get("event") == "resume"]
    assert [e["step"] for e in resume_events] == [resumed]
    assert result.tokens_seen == steps * 16 * 64  # the whole line, as if never interrupted
    # the step log of the killed run: the steps it had done beyond the resumed checkpoint
    (log,) = (cluster["workers"][victim]["home"] / "line-work" / "lines" / "expert-kill").rglob(
        "train.log"
    )
    done = [json.loads(line.split(" ", 1)[1])["step"] for line in log.read_text().splitlines()
            if line.startswith("TAAS_METRIC ")]  # fmt: skip
    assert done and resumed <= done[-1] < steps
    assert done[-1] - resumed <= every, (done[-1], resumed)
