"""A machine's line process slots (:func:`tasks.slots.held_machine_slots`), with real processes.

Each holder is a separate Python process (as two flow runs on one worker are), which takes its
slots, records when it got them and when it let go, and holds them for a while. Exclusion is
checked on those windows; a holder killed with SIGKILL gives its slot to the waiter at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.hardware import machine_slots
from tasks.slots import held_machine_slots, machine_folder
from tests.line_cluster import wait_for

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from tasks.slots import held_machine_slots
folder, slots, occupy, hold, out = sys.argv[1:]
with held_machine_slots(Path(folder), int(slots), int(occupy)):
    start = time.time()
    Path(out + ".in").write_text(str(start))
    time.sleep(float(hold))
    end = time.time()
Path(out).write_text(f"{start} {end}")
"""


def _holder(folder: Path, slots: int, occupy: int, hold: float, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(slots), str(occupy), str(hold), str(out)],
        env=env,
    )


def _window(out: Path) -> tuple[float, float]:
    start, end = out.read_text().split()
    return float(start), float(end)


def _run(folder: Path, tmp: Path, slots: int, occupies: list[int], hold: float) -> list:
    procs = []
    for index, occupy in enumerate(occupies):
        procs.append(_holder(folder, slots, occupy, hold, tmp / f"w{index}"))
        if index == 0:
            # the first one holds its slots before the others ask
            wait_for("the first holder", (tmp / "w0.in").exists, 60, 0.05)
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    return [_window(tmp / f"w{i}") for i in range(len(occupies))]


def test_one_slot_lets_one_line_train_at_a_time(tmp_path):
    first, second = _run(tmp_path / "slots", tmp_path, slots=1, occupies=[1, 1], hold=1.5)
    assert first[1] <= second[0]  # the second got the slot only when the first let go
    assert second[0] - first[1] < 1.0  # ... and soon after (it polls every 0.1 s)


def test_two_slots_let_two_one_process_lines_train_together(tmp_path):
    first, second = _run(tmp_path / "slots", tmp_path, slots=2, occupies=[1, 1], hold=3.0)
    assert second[0] < first[1]  # overlapping windows


def test_a_line_of_two_processes_takes_both_slots(tmp_path):
    first, second = _run(tmp_path / "slots", tmp_path, slots=2, occupies=[2, 1], hold=1.5)
    assert first[1] <= second[0]


def test_a_killed_holders_slot_goes_to_the_waiter_at_once(tmp_path):
    folder = tmp_path / "slots"
    victim = _holder(folder, 1, 1, 600, tmp_path / "victim")
    wait_for("the victim", (tmp_path / "victim.in").exists, 60, 0.05)
    waiter = _holder(folder, 1, 1, 0, tmp_path / "waiter")
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting: the slot is the victim's
    killed = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert waiter.wait(timeout=60) == 0
    start, _ = _window(tmp_path / "waiter")
    assert start - killed < 1.0  # no lease to expire: the kernel released the lock


def test_a_line_larger_than_the_machine_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^line_machine_slots: a line of 3 processes"):
        with held_machine_slots(tmp_path, 2, 3):
            pass


def test_machine_slots_count_visible_gpus_else_cores():
    cores = os.cpu_count() or 1
    assert machine_slots({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert machine_slots({"CUDA_VISIBLE_DEVICES": ""}) == cores
    assert machine_slots({"CUDA_VISIBLE_DEVICES": "-1"}) == cores


STARTER = """
import sys, time
print("ready", flush=True)
from flows.line_engine import import_engine
import_engine()
print(time.time(), "prefect.flow_engine" in sys.modules, flush=True)
"""


def _start_imports(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STARTER], env=env, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip


def test_a_flow_run_start_imports_while_it_holds_the_machines_start_lock(tmp_path):
    """The train-line command (flows.line_engine) imports Prefect's engine only while no other
    flow run of its machine (TAAS_HOME) does; without TAAS_HOME it takes no lock at all."""
    from infra.atomic import file_lock

    free_env = {k: v for k, v in os.environ.items() if k != "TAAS_HOME"}
    free_env["PYTHONPATH"] = str(REPO)
    with file_lock(machine_folder(tmp_path) / "start"):  # another run of the machine starting
        locked = _start_imports({**free_env, "TAAS_HOME": str(tmp_path)})
        free = _start_imports(free_env)
        for child in (locked, free):
            assert child.stdout.readline().strip() == "ready"
        out, _ = free.communicate(timeout=120)  # the same imports, with no machine folder
        assert free.returncode == 0 and out.split()[1] == "True"
        time.sleep(2)
        assert locked.poll() is None, "the start went on while its machine's lock was held"
        released = time.time()
    out, _ = locked.communicate(timeout=120)
    imported_at, engine = out.split()
    assert locked.returncode == 0 and engine == "True" and float(imported_at) >= released
