"""A command that runs a flow leaves no process of its own alive, however it ends.

Before: Prefect's temporary API server (``uvicorn ... prefect.server.api.server:create_app``)
outlived any process that ended without running its atexit hook (SIGTERM, SIGKILL), living on
with parent 1. Each case runs a real flow in a child process that imports the flows package (as
every command and deployment does), ends it, and checks through /proc that its server is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, time
import flows  # installs the server watchdog, as every command does
from prefect import flow

@flow
def tiny() -> int:
    return 1

assert tiny() == 1
from prefect.server.api.server import SubprocessASGIServer
pids = [s.server_process.pid for s in SubprocessASGIServer._instances.values() if s.server_process]
print("server", *pids, flush=True)
if sys.argv[1] == "wait":
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("ending", ["exit", "SIGTERM", "SIGKILL"])
def test_no_prefect_server_outlives_its_command(ending, tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "exit" if ending == "exit" else "wait"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    server = None
    try:
        line = ""
        while not line.startswith("server"):
            line = child.stdout.readline()
            assert line, "the flow process ended before reporting its server"
        (server,) = [int(pid) for pid in line.split()[1:]]
        assert _alive(server)
        cmdline = Path(f"/proc/{server}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"prefect.server.api.server:create_app" in cmdline
        if ending != "exit":
            child.send_signal(getattr(signal, ending))
        child.wait(timeout=60)
        # SIGTERM lets uvicorn stop gracefully within the watchdog's grace period.
        assert _gone_within(server, 20), f"server {server} outlived its command ({ending})"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGKILL)  # a failed check leaves no orphan of its own
