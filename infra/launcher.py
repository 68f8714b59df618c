"""The distributed launcher: runs a training worker under torchrun or DeepSpeed as a killable job.

:func:`launch` starts ``torchrun`` (``python -m torch.distributed.run``) or the ``deepspeed``
launcher in its own process group (``start_new_session=True``), streams its merged stdout/stderr
into a log file, parses ``TAAS_METRIC`` / ``TAAS_EVENT`` / ``TAAS_OUTCOME`` lines, and on timeout or
cancellation (a ``cancel`` event, KeyboardInterrupt, asyncio's CancelledError, Prefect's
cancellation) kills the whole job: SIGTERM, then SIGKILL after a grace period, to the process
group and to every descendant (torchrun puts its ranks in sessions of their own), then verifies
that none survives.

Outcomes: ``ok``; ``final`` when the worker says the input is at fault (``bad_config``,
``non_finite_loss``, ``worker_error``: retrying would fail the same way); ``retryable`` for
everything else (a lost rank, a signal, a timeout): infrastructure failures never count against a
contributor.

Multi-node: pass ``launcher="deepspeed"`` and a DeepSpeed hostfile, one line per node::

    node-a slots=8
    node-b slots=8

The launcher host must reach the nodes by passwordless ssh (pdsh), every node needs the same
virtual environment and repository path, and the line's data, base model and checkpoint folders
must be on a shared file system (each rank writes its optimizer shard into the checkpoint). The
hostfile is validated first: host names only (no shell metacharacters), ``slots`` a positive int.

Or, with torchrun and no ssh: pass a :class:`Rendezvous` (``Settings.rdzv_endpoint`` and
``nnodes``). Each node runs one launcher group, ``torchrun --nnodes N --rdzv-backend c10d
--rdzv-endpoint host:port --rdzv-id ID``; the groups meet at the endpoint (a port on one of the
nodes, the first to arrive hosts the store) and torchrun numbers the ranks across them. Every
node runs the same command with the same id; the worker code is the same as on one node.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

# The worker's final exit codes (factory.train exits with these); any other failure is retryable.
EXIT_BAD_CONFIG = 64
EXIT_NON_FINITE = 65
EXIT_WORKER_ERROR = 66
_FINAL_CODES = {
    EXIT_BAD_CONFIG: "bad_config",
    EXIT_NON_FINITE: "non_finite_loss",
    EXIT_WORKER_ERROR: "worker_error",
}
FINAL_REASONS = tuple(_FINAL_CODES.values())
_HOST_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s+slots=([1-9][0-9]*)$")
_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*:[1-9][0-9]{0,4}$")
_RDZV_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's c10d rendezvous for a line across ``nnodes`` launcher groups (one per node)."""

    endpoint: str  # host:port every node reaches
    nnodes: int
    run_id: str  # the same on every node of the line; distinct between lines

    def __post_init__(self) -> None:
        if not _ENDPOINT.match(self.endpoint):
            raise ValueError(f"rdzv_endpoint: {self.endpoint!r}: expected host:port")
        if self.nnodes < 1:
            raise ValueError(f"nnodes: {self.nnodes}: must be >= 1")
        if not _RDZV_ID.match(self.run_id):
            raise ValueError(f"rdzv id: {self.run_id!r}: letters, digits, '.', '_', '-' only")

    def args(self) -> list[str]:
        return [
            "--nnodes", str(self.nnodes), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id,
        ]  # fmt: skip


@dataclass
class LaunchResult:
    returncode: int
    outcome: Literal["ok", "retryable", "final"]
    reason: str
    metrics: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # the worker's TAAS_OUTCOME line


def line_rendezvous(endpoint: str | None, nnodes: int, line_key: str) -> Rendezvous | None:
    """The rendezvous of a line across nodes (None without an endpoint). Its id comes from the
    line's config hash, so every node that runs the same config joins the same rendezvous."""
    if endpoint is None:
        return None
    return Rendezvous(endpoint=endpoint, nnodes=nnodes, run_id=f"line-{line_key[:16]}")


def validate_hostfile(path: Path) -> dict[str, int]:
    """Returns {host: slots}; ValueError naming the line for anything else."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise ValueError(
                f"hostfile line {number}: {line!r}: expected 'host slots=N' "
                "(host: letters, digits, '.', '_', '-')"
            )
        if match.group(1) in hosts:
            raise ValueError(f"hostfile line {number}: host {match.group(1)} listed twice")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise ValueError(f"hostfile {path}: no hosts; add lines 'host slots=N'")
    return hosts


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_command(
    worker_module: str,
    worker_args: list[str],
    nprocs: int,
    launcher: str,
    hostfile: Path | None = None,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The launcher command line for ``python -m <worker_module> <worker_args>``; with a
    ``rendezvous``, this node's group of a line across nodes (``nprocs`` ranks per node)."""
    if nprocs < 1:
        raise ValueError("nprocs must be >= 1")
    port = str(free_port())
    if rendezvous is not None and launcher != "torchrun":
        raise ValueError("rdzv_endpoint: only torchrun takes one (deepspeed: use a hostfile)")
    if launcher == "torchrun":
        if hostfile is not None:
            raise ValueError("hostfile: only the deepspeed launcher takes one; set launcher")
        if rendezvous is not None:
            return [
                sys.executable, "-m", "torch.distributed.run", *rendezvous.args(),
                "--nproc-per-node", str(nprocs), "--max-restarts", "0",
                "-m", worker_module, *worker_args,
            ]  # fmt: skip
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(nprocs), "--master-addr", "127.0.0.1",
            "--master-port", port, "--max-restarts", "0", "-m", worker_module, *worker_args,
        ]  # fmt: skip
    if launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", port]
        if hostfile is not None:
            validate_hostfile(hostfile)
            command += ["--hostfile", str(hostfile)]
        else:
            # On CPU the deepspeed launcher starts one rank unless told how many.
            command += ["--num_gpus", str(nprocs)]
        return [*command, "--no_local_rank", "--module", worker_module, *worker_args]
    raise ValueError(f"launcher: {launcher!r}; use 'torchrun' or 'deepspeed'")


class Job:
    """One running launcher process group; ``kill`` takes down every process it started."""

    def __init__(self, command: list[str], env: dict[str, str] | None, log_path: Path | None):
        self.log_path = Path(log_path) if log_path else None
        from infra.hardware import accelerator_env

        # DS_ACCELERATOR=cpu only where CUDA is absent (on a GPU host DeepSpeed finds CUDA).
        full_env = {**os.environ, **accelerator_env(), **(env or {}), **owner_env()}
        self.proc = subprocess.Popen(
            command,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        self.pgid = self.proc.pid
        self._seen: set[int] = {self.proc.pid}
        self.stop = threading.Event()  # set by stop_all_jobs()

    def descendants(self) -> set[int]:
        """Every pid started by the job so far (remembered, as ranks get re-parented)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self._seen.update(c.pid for c in children)
        except psutil.NoSuchProcess:
            pass
        return set(self._seen)

    def alive(self) -> list[int]:
        living = []
        for pid in self.descendants():
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    living.append(pid)
            except psutil.NoSuchProcess:
                continue
        try:
            for proc in psutil.process_iter(["pid"]):
                if proc.pid not in living and os.getpgid(proc.pid) == self.pgid:
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        living.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
        return living

    def signal_all(self, sig: int) -> None:
        pids = self.descendants()
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue

    def kill(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; raises if any process of the job survives."""
        self.descendants()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.alive():
            self._reap()
            time.sleep(0.05)
        if self.alive():
            self.signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self._reap()
            if not self.alive():
                return
            time.sleep(0.05)
        raise RuntimeError(f"launcher: processes {self.alive()} of job {self.pgid} survived")

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=0)
        except subprocess.TimeoutExpired:
            pass


KINDS = ("TAAS_METRIC", "TAAS_EVENT", "TAAS_OUTCOME")
_DECODER = json.JSONDecoder()


def emit(kind: str, payload: dict) -> None:
    """Writes one protocol line to stdout in a single ``write``: ranks share the pipe and run
    unbuffered (``python -u`` under the DeepSpeed launcher), where ``print`` writes the text and
    its newline apart and two ranks' lines could run together."""
    line = f"{kind} {json.dumps(payload, sort_keys=True)}\n".encode()
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line)


def _parse(line: str) -> list[tuple[str, dict]]:
    """Every ``KIND {json}`` record in ``line``, in order (a launcher's prefix such as
    ``[rank0]:`` and records of other ranks run into the same line are allowed)."""
    found = []
    pattern = "|".join(KINDS)
    for match in re.finditer(rf"({pattern}) ", line):
        try:
            payload, _ = _DECODER.raw_decode(line, match.end())
        except ValueError:
            continue
        if isinstance(payload, dict):
            found.append((match.group(1), payload))
    return found


def launch(
    worker_args: list[str],
    nprocs: int,
    launcher: Literal["torchrun", "deepspeed"] = "torchrun",
    hostfile: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 3600.0,
    on_metric: Callable[[dict], None] | None = None,
    log_path: Path | None = None,
    worker_module: str = "factory.train",
    cancel: threading.Event | None = None,
    on_start: Callable[[Job], None] | None = None,
    grace_s: float = 5.0,
    rendezvous: Rendezvous | None = None,
) -> LaunchResult:
    """Runs ``python -m worker_module worker_args`` on ``nprocs`` ranks and waits for it (with a
    ``rendezvous``: this node's ``nprocs`` ranks of a job across nodes)."""
    command = build_command(worker_module, worker_args, nprocs, launcher, hostfile, rendezvous)
    if log_path is not None and rendezvous is not None:
        # The other nodes of the line start this same command: the log says what it is.
        with open(log_path, "a") as log:
            log.write(f"TAAS_COMMAND {shlex.join(command)}\n")
    job = Job(command, env, log_path)
    with _LIVE_LOCK:
        _LIVE.add(job)
    result = LaunchResult(returncode=-1, outcome="retryable", reason="")
    reader = threading.Thread(target=_pump, args=(job, result, on_metric), daemon=True)
    reader.start()
    if on_start is not None:
        on_start(job)
    deadline = time.monotonic() + timeout_s
    try:
        while job.proc.poll() is None:
            job.descendants()
            if time.monotonic() > deadline:
                job.kill(grace_s)
                result.reason = "timeout"
                break
            if job.stop.is_set() or (cancel is not None and cancel.is_set()):
                job.kill(grace_s)
                result.reason = "cancelled"
                break
            time.sleep(0.1)
        reader.join(timeout=10)
        if job.alive():
            job.kill(grace_s)  # a rank outliving its launcher is a lost worker, not a success
    except BaseException:
        # KeyboardInterrupt, CancelledError, Prefect's cancellation: never leave ranks behind.
        job.kill(grace_s)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(job)
    result.returncode = job.proc.wait()
    return _classify(result)


_LIVE: set[Job] = set()
_LIVE_LOCK = threading.Lock()


def stop_all_jobs(wait_s: float = 60.0) -> None:
    """Cancels every job this process is running (in any thread) and waits until their
    :func:`launch` calls have killed them and returned, up to ``wait_s``."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for job in live:
        job.stop.set()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with _LIVE_LOCK:
            if not _LIVE & set(live):
                return
        time.sleep(0.1)


@contextmanager
def jobs_stopped_on_interrupt(wait_s: float = 60.0) -> Iterator[None]:
    """For a thread that waits on jobs launched by other threads (a flow waiting on its Prefect
    task futures). A cancelled flow run is stopped by a SIGTERM that Prefect turns into an
    exception in the main thread; the task threads never see it, and the interpreter would wait
    for them (their jobs run to the end) before exiting. Any exception here stops every job
    first, then propagates."""
    try:
        yield
    except BaseException:
        stop_all_jobs(wait_s)
        raise


def owner_env() -> dict[str, str]:
    """Tells the ranks which process launched them (see :func:`watch_owner`)."""
    me = psutil.Process()
    return {
        "TAAS_OWNER_PID": str(me.pid),
        "TAAS_OWNER_CREATED": repr(me.create_time()),
        "TAAS_OWNER_HOST": socket.gethostname(),
    }


def watch_owner(exit_code: int = 1, period_s: float = 1.0) -> None:
    """Called by a worker rank: exits the rank when the process that launched the job is gone.

    If the launching process is SIGKILLed (a Prefect runner escalating a cancellation, the OOM
    killer), nothing runs its clean-up: torchrun or the deepspeed launcher, started in sessions
    of their own, would keep training for nobody. A rank that sees its owner gone exits, and the
    launchers stop the rest of the job when one rank fails. Ranks on other hosts (multi-node)
    cannot see the owner and do not watch; their launcher's ssh session ends instead.
    """
    pid, created = os.environ.get("TAAS_OWNER_PID"), os.environ.get("TAAS_OWNER_CREATED")
    if not pid or not created or os.environ.get("TAAS_OWNER_HOST") != socket.gethostname():
        return

    def owner_alive() -> bool:
        try:  # the create time guards against a recycled pid
            return psutil.Process(int(pid)).create_time() == float(created)
        except (psutil.NoSuchProcess, ValueError):
            return False

    def watch() -> None:
        while owner_alive():
            time.sleep(period_s)
        try:  # the owner held the read end of the log pipe: this write may fail
            emit("TAAS_EVENT", {"event": "owner_gone", "owner_pid": int(pid)})
        finally:
            os._exit(exit_code)

    threading.Thread(target=watch, name="taas-owner-watch", daemon=True).start()


def _pump(job: Job, result: LaunchResult, on_metric) -> None:
    log = open(job.log_path, "a", buffering=1) if job.log_path else None
    try:
        for line in job.proc.stdout:
            if log is not None:
                log.write(line)
            for kind, payload in _parse(line.rstrip("\n")):
                if kind == "TAAS_METRIC":
                    result.metrics.append(payload)
                    if on_metric is not None:
                        on_metric(payload)
                elif kind == "TAAS_EVENT":
                    result.events.append(payload)
                else:
                    result.report = payload
    finally:
        if log is not None:
            log.close()


def _classify(result: LaunchResult) -> LaunchResult:
    reported = result.report.get("reason", "")
    if result.reason in ("timeout", "cancelled"):
        result.outcome = "retryable"
    elif result.returncode == 0 and result.report.get("outcome") == "ok":
        result.outcome, result.reason = "ok", ""
    elif reported in FINAL_REASONS or result.returncode in _FINAL_CODES:
        # torchrun exits 1 whatever the rank's code was, so the worker's own report decides.
        result.outcome = "final"
        result.reason = reported or _FINAL_CODES[result.returncode]
    else:
        result.outcome = "retryable"
        result.reason = "signal" if result.returncode < 0 else "worker_lost"
    return result
