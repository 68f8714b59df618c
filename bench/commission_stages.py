"""Where a commission's wall time goes: runs the demo commission and prints the time per stage.

    .venv/bin/python bench/commission_stages.py [--home DIR] [--spec SPEC.yaml] [--cycles N]

Runs ``taas demo``'s commission (examples/legal_commission.yaml unless ``--spec``) in a home of
its own (a new temporary folder unless ``--home``; a home that already holds the imported base
skips the one-time GGUF import), then reads the commission's Prefect task runs back from the
local Prefect API and groups them into stages. A stage's time is the union of its task runs'
intervals, so lines running side by side count once; "other" is the commission's wall time
outside every named stage (flow start, MLflow logging, the Prefect API itself). The training
share is training's time over the commission's wall time (the goal: at least 0.5 at the
demo's budget). The side-by-side generation ``taas demo`` prints after the summary is timed on
its own. Prints one JSON line last (``{"stages": {...}, "training_share": ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Task-run name (Prefect appends "-<suffix>") -> stage. Anything else is "other tasks".
STAGES = {
    "commission-intake": "intake (data, base import)",
    "open-job": "intake (data, base import)",
    "train-line": "training",
    "distribute": "cycle plan + collect",
    "collect-candidates": "cycle plan + collect",
    "scoring-setup": "scoring + merge",
    "score-and-merge-cycle": "scoring + merge",
    "wise-ft-alpha-search": "wise-ft alpha search",
    "commit-cycle": "cycle commit",
    "compose": "router annealing",
    "benchmark": "benchmarks (lm-eval)",
    "gate-inputs": "gate (PoL of the expert)",
    "check-registered": "registration",
    "register-expert": "registration",
    "promote-expert": "registration",
}

# A subflow shows as a task run of the parent flow; its own tasks are counted instead.
SUBFLOWS = {"other tasks (cycle)"}


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (seconds)."""
    total, last_end = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= last_end:
            continue
        total += end - max(start, last_end)
        last_end = end
    return total


async def task_runs_since(started: datetime) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    runs: list = []
    async with get_client() as client:
        while True:  # the API answers at most 200 per call
            page = await client.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=started)),
                limit=200,
                offset=len(runs),
            )
            runs += page
            if len(page) < 200:
                return runs


def stage_of(task_run_name: str) -> str:
    """The stage of a task run named "<task>-<suffix>" or "<task> <what it works on>"."""
    for task in sorted(STAGES, key=len, reverse=True):
        if task_run_name == task or task_run_name.startswith((f"{task}-", f"{task} ")):
            return STAGES[task]
    first = task_run_name.split(" ", 1)[0]
    return f"other tasks ({first.rsplit('-', 1)[0] if '-' in first else first})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="TAAS_HOME (default: new temp)")
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "legal_commission.yaml")
    parser.add_argument("--cycles", type=int, default=None, help="override budget.cycles")
    parser.add_argument(
        "--since",
        default=None,
        help="run nothing: report the task runs of --home's Prefect API since this ISO time",
    )
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="taas-stages-"))).resolve()
    (home / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect makes only its last folder
    os.environ["TAAS_HOME"] = str(home)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # what the Makefile exports for `make demo`
    for name, value in (
        ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true"),
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TOKENIZERS_PARALLELISM", "false"),
        # a fresh Prefect home on busy cores can take more than the default 20 s to come up
        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
    ):  # fmt: skip
        os.environ.setdefault(name, value)
    sys.path.insert(0, str(REPO))
    from cli.progress import quiet_libraries

    quiet_libraries()  # as `taas demo` does: the stage table, not the libraries' bars

    from datetime import UTC

    from cli.demo import print_side_by_side, run_demo, side_by_side
    from flows.commission import print_summary

    print(f"home {home}; spec {args.spec}")
    summary, sample_s = {}, 0.0
    if args.since:
        started_at, commission_s = datetime.fromisoformat(args.since), None
    else:
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        try:
            summary, spec_path = run_demo(args.spec, args.cycles)
        finally:  # a failed or cancelled run still reports the stages it went through
            commission_s = time.perf_counter() - started
            print(f"started at {started_at.isoformat()}")
        print_summary(summary)
        started = time.perf_counter()
        print_side_by_side(*side_by_side(spec_path, summary["commission_id"]))
        sample_s = time.perf_counter() - started
    report(started_at, commission_s, sample_s, home)
    return 0 if summary.get("registered") else 1


def report(started_at: datetime, commission_s: float | None, sample_s: float, home: Path) -> None:
    """Prints the stage table and the JSON line (see the module doc); ``commission_s`` None:
    up to the end of the last task run."""
    intervals: dict[str, list[tuple[float, float]]] = {}
    for run in asyncio.run(task_runs_since(started_at)):
        if run.start_time is None or run.end_time is None or stage_of(run.name) in SUBFLOWS:
            continue
        span = (run.start_time.timestamp(), run.end_time.timestamp())
        intervals.setdefault(stage_of(run.name), []).append(span)
    stages = {name: union_seconds(spans) for name, spans in intervals.items()}
    all_spans = [s for spans in intervals.values() for s in spans]
    if commission_s is None:
        commission_s = max(end for _, end in all_spans) - started_at.timestamp()
    stages["other (flow, MLflow, API)"] = max(0.0, commission_s - union_seconds(all_spans))
    share = stages.get("training", 0.0) / commission_s
    print(f"\n{'stage':<34} {'seconds':>9} {'share':>7}")
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"{name:<34} {seconds:9.1f} {seconds / commission_s:7.1%}")
    print(f"{'commission (wall)':<34} {commission_s:9.1f}")
    print(f"{'side-by-side sample (taas demo)':<34} {sample_s:9.1f}")
    print(f"training share of the commission: {share:.1%} (goal: at least 50%)")
    body = {
        "stages": {k: round(v, 1) for k, v in stages.items()},
        "commission_s": round(commission_s, 1),
        "sample_s": round(sample_s, 1),
        "training_share": round(share, 3),
        "home": str(home),
    }
    print(json.dumps(body))


if __name__ == "__main__":
    raise SystemExit(main())
