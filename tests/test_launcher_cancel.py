"""Cancelling a flow run takes its jobs down: a real Prefect flow in a child process runs two
tasks, each launching a 2-rank job; the process is then stopped the way Prefect's runner stops
a cancelled flow run (SIGTERM, which Prefect turns into an exception in the main thread) or the
way its escalation does (SIGKILL). Every process of both jobs must be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

FLOW = textwrap.dedent(
    """
    import sys
    import flows  # as every command and deployment does: its temporary API dies with it
    from prefect import flow, task
    from infra.launcher import jobs_stopped_on_interrupt, launch

    @task
    def line(index: int) -> str:
        return launch([sys.argv[1]], 2, env={"PYTHONPATH": sys.argv[2]}, timeout_s=600,
                      worker_module="tests.test_launcher_worker", grace_s=2).reason

    @flow
    def lines() -> list[str]:
        futures = [line.submit(i) for i in range(2)]
        with jobs_stopped_on_interrupt():
            return [f.result() for f in futures]

    lines()
    """
)


def _job_processes(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in root.children(recursive=True):
        try:
            if "test_launcher_worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def _alive(procs: list[psutil.Process]) -> list[int]:
    living = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                living.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return living


@pytest.mark.parametrize(("sig", "mode"), [(signal.SIGTERM, "hang"), (signal.SIGKILL, "busy")])
def test_stopping_the_flow_process_leaves_no_job_process(tmp_path, sig, mode):
    script = tmp_path / "flow.py"
    script.write_text(FLOW)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flow = subprocess.Popen([sys.executable, str(script), mode, str(REPO)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    root = psutil.Process(flow.pid)
    ranks = 2 * 2
    deadline = time.monotonic() + 240
    try:
        procs: list[psutil.Process] = []
        # Both jobs up: their launchers and ranks (and, in "hang", each rank's grandchild).
        while len([p for p in procs if "-m tests.test_launcher_worker" in _cmd(p)]) < ranks:
            assert time.monotonic() < deadline and flow.poll() is None, "jobs did not start"
            time.sleep(0.5)
            procs = _job_processes(root)
        time.sleep(1)
        procs = _job_processes(root)
        # the flow process's temporary Prefect API must go with it too (the watchdog)
        servers = [p for p in root.children(recursive=True) if "prefect.server.api" in _cmd(p)]
        assert servers, "the flow process started no temporary Prefect API"
        procs += servers
        flow.send_signal(sig)
        flow.wait(timeout=120)
        deadline = time.monotonic() + 60
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive(procs) == [], [(_cmd(p), p.pid) for p in procs if p.pid in _alive(procs)]
    finally:
        for proc in [root, *_job_processes(root)] if flow.poll() is None else []:
            proc.kill()


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return ""
