"""A stand-in worker for launcher tests (run as ``python -m tests.test_launcher_worker MODE``).

Modes: ``metrics`` prints two metrics and exits 0; ``non_finite`` reports non_finite_loss and
exits 65; ``crash`` exits 1 without a report; ``worker_error`` has rank 1 report worker_error and
exit 66 while rank 0 hangs; ``hang`` starts a child in its own session and
sleeps, printing a metric so the test knows it is up; ``busy`` sleeps watching the process that
launched it (``infra.launcher.watch_owner``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

if __name__ == "__main__":
    mode = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    if mode == "metrics":
        if rank == 0:
            for step in (1, 2):
                print("TAAS_METRIC " + json.dumps({"step": step, "loss": 3.0 / step}), flush=True)
            print("TAAS_OUTCOME " + json.dumps({"outcome": "ok", "reason": ""}), flush=True)
        sys.exit(0)
    if mode == "non_finite":
        if rank == 0:
            print("TAAS_OUTCOME " + json.dumps({"outcome": "final", "reason": "non_finite_loss"}))
        sys.stdout.flush()
        sys.exit(65)
    if mode == "crash":
        sys.exit(1)
    if mode == "worker_error":  # only rank 1 fails, as when one rank hits a bad input
        if rank == 1:
            print("TAAS_OUTCOME " + json.dumps({"outcome": "final", "reason": "worker_error"}))
            sys.stdout.flush()
            sys.exit(66)
        time.sleep(600)  # rank 0 waits in a collective until torchrun stops it
    if mode == "busy":  # a rank that runs until stopped, watching its owner as factory.train does
        from infra.launcher import watch_owner

        watch_owner()
        print("TAAS_METRIC " + json.dumps({"step": 1, "rank": rank}), flush=True)
        time.sleep(600)
    if mode == "hang":
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
        )
        print("TAAS_EVENT " + json.dumps({"event": "child", "pid": child.pid}), flush=True)
        print("TAAS_METRIC " + json.dumps({"step": 1, "rank": rank}), flush=True)
        time.sleep(600)
