"""The launcher: command lines, hostfile validation, outcome mapping, killing whole jobs."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from infra.launcher import build_command, launch, validate_hostfile
from tests.conftest import REPO

WORKER = "tests.test_launcher_worker"
ENV = {"PYTHONPATH": str(REPO)}


def test_hostfile_accepts_host_slots_lines(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# nodes\nnode-a slots=4\n\nnode-b.cluster slots=2\n")
    assert validate_hostfile(path) == {"node-a": 4, "node-b.cluster": 2}


@pytest.mark.parametrize(
    "text",
    [
        "node-a slots=4; rm -rf /",
        "node-a slots=0",
        "$(whoami) slots=1",
        "node-a",
        "",
        "a slots=1\na slots=2",
    ],
)
def test_hostfile_rejects_bad_lines(tmp_path, text):
    path = tmp_path / "hostfile"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match="hostfile"):
        validate_hostfile(path)


def test_commands_for_both_launchers(tmp_path):
    torchrun = build_command("factory.train", ["--config", "c.json"], 2, "torchrun")
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node" in torchrun and torchrun[-4:] == [
        "-m",
        "factory.train",
        "--config",
        "c.json",
    ]
    ds = build_command("factory.train", ["--config", "c.json"], 2, "deepspeed")
    assert ds[ds.index("--num_gpus") + 1] == "2" and "--no_local_rank" in ds
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\n")
    multi = build_command("factory.train", [], 2, "deepspeed", hostfile=hostfile)
    assert "--hostfile" in multi and "--num_gpus" not in multi
    with pytest.raises(ValueError, match="launcher"):
        build_command("factory.train", [], 2, "mpirun")
    with pytest.raises(ValueError, match="hostfile"):
        build_command("factory.train", [], 2, "torchrun", hostfile=hostfile)


def test_metrics_are_streamed_and_logged(tmp_path):
    seen = []
    log = tmp_path / "job.log"
    result = launch(["metrics"], 2, env=ENV, worker_module=WORKER, on_metric=seen.append,
                    log_path=log, timeout_s=120)  # fmt: skip
    assert result.outcome == "ok" and result.returncode == 0
    assert [m["step"] for m in seen] == [1, 2] and seen[1]["loss"] == 1.5
    assert "TAAS_METRIC" in log.read_text()


@pytest.mark.parametrize(
    ("mode", "outcome", "reason"),
    [
        ("non_finite", "final", "non_finite_loss"),
        ("worker_error", "final", "worker_error"),
        ("crash", "retryable", "worker_lost"),
    ],
)
def test_exit_codes_map_to_outcomes(mode, outcome, reason):
    result = launch([mode], 2, env=ENV, worker_module=WORKER, timeout_s=120)
    assert (result.outcome, result.reason) == (outcome, reason)
    assert result.returncode != 0


def _survivors(pids) -> list[int]:
    living = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.NoSuchProcess:
            continue
    return living


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_cancel_leaves_no_process_alive(launcher):
    cancel = threading.Event()
    jobs = []
    up = []

    def on_metric(metric):
        up.append(metric)
        if len(up) == 2:  # both ranks are running (each with a grandchild in its own session)
            cancel.set()

    started = time.monotonic()
    result = launch(["hang"], 2, launcher=launcher, env=ENV, worker_module=WORKER,
                    on_metric=on_metric, cancel=cancel, on_start=jobs.append, grace_s=2,
                    timeout_s=120)  # fmt: skip
    assert (result.outcome, result.reason) == ("retryable", "cancelled")
    assert time.monotonic() - started < 100
    children = [e["pid"] for e in result.events if e.get("event") == "child"]
    assert len(children) == 2
    pids = jobs[0].descendants() | set(children)
    assert len(pids) >= 5  # launcher, two ranks, two grandchildren
    assert _survivors(pids) == []


def test_timeout_kills_the_job():
    jobs = []
    result = launch(["hang"], 1, env=ENV, worker_module=WORKER, timeout_s=8,
                    on_start=jobs.append, grace_s=1)  # fmt: skip
    assert (result.outcome, result.reason) == ("retryable", "timeout")
    assert _survivors(jobs[0].descendants()) == []


def test_records_run_together_by_two_ranks_are_all_read():
    """Unbuffered ranks (``python -u``) write a print's text and its newline apart, so two ranks'
    records can share one line of the pipe; a launcher prefix comes before some."""
    from infra.launcher import _parse

    line = 'TAAS_EVENT {"event": "child", "pid": 7}TAAS_EVENT {"event": "child", "pid": 8}'
    assert _parse(line) == [("TAAS_EVENT", {"event": "child", "pid": 7}),
                            ("TAAS_EVENT", {"event": "child", "pid": 8})]  # fmt: skip
    assert _parse('[rank1]: TAAS_METRIC {"step": 2, "loss": 1.5}') == [
        ("TAAS_METRIC", {"step": 2, "loss": 1.5})
    ]
    assert _parse("TAAS_METRIC {broken") == [] and _parse("loss went down") == []
