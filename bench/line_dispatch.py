"""Orchestration overhead of production lines on a work pool, against their training time.

Starts the test suite's local pool (tests/line_cluster.py: a real Prefect server on a
throw-away PostgreSQL database, ``--server-db sqlite`` for Prefect's default, the
``train-line`` deployment, ``--workers`` process workers with their own TAAS_HOME, moto's S3 as
the only thing shared), runs one cycle's train step of ``--lines`` short lines on the tiny base,
then ``--long-lines`` lines of ``--long-steps`` steps to check the extrapolation (with
``--limit 1``, so that each worker takes one)::

    python -m bench.line_dispatch --lines 8 --steps 4 --long-lines 0 --limit 2
    python -m bench.line_dispatch --lines 8 --steps 4 --long-lines 2 --long-steps 4000 --limit 1

Per line, from the Prefect server's flow-run times and the timings each line leaves in the
store (:class:`flows.train_line.LineOutcome`):

- ``train_s``: the worker's ``run_training`` wall time (torchrun start, model load, the steps,
  checkpoint saves): what the same line costs as a local subprocess, so not overhead;
- ``stage_s``: inputs fetched from the store (cache hits after a machine's first line) and the
  newest checkpoint restored; ``publish_s``: checkpoints, candidate, log and result uploaded;
- ``wait_s``: waiting for the machine's (and the pool's) slots, staged, while another line
  trains there (worker ``--limit`` above 1);
- ``engine_s``: the rest of the flow run (Prefect's engine, the pull step, imports);
- ``pickup_s``: from the run's creation, or its worker's previous run ending, to its start.

The headline is the whole cycle's: ``overhead per line = (workers * wall - sum(train_s)) / lines``,
the worker-seconds each line spends not training (upload on the cycle's side, dispatch, pickup,
downloads, uploads, waiting for the cycle to collect the result, idle workers); that overhead
is roughly constant per line, so ``ratio_60s = overhead / 60`` is what a 60 s line would pay
(goal <= 0.05). The long lines report their own measured ratio ``overhead / train_s``.

A line that starts while another trains on its machine slows that one down where the machine
has no core to spare (this one has two, both training), and the slower training counts as
``train_s``, not overhead. So after a warm-up line (the first line on a machine also builds
DeepSpeed's ops), a round of ``--workers`` lines, one per worker with nothing else starting,
gives the baseline ``alone_train_s`` (with ``--limit`` above 1 one worker may take them all:
then the bench says the baseline is void); ``overhead_vs_alone`` charges the short
round every second its lines took beyond it: ``(workers * wall - lines * alone_train_s) / lines``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepared_data(base, folder: Path) -> Path:
    """The tests' prepared data: 64-token blocks of standard-library docstrings."""
    from datasets import Dataset

    from factory.base_model import load_base
    from factory.corpus import general_text

    _, tokenizer = load_base(base.path)
    flat: list[int] = []
    for text in general_text(max_chars=60_000):
        flat.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [flat[i : i + 64] for i in range(0, len(flat) - 63, 64)][:256]
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(folder / "train"))
    return folder


def flow_runs(api: str, ids: list[str]) -> dict[str, dict]:
    """{flow run id: {worker-independent created/start/end times}} from the server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = {}
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for run_id in ids:
            run = client.read_flow_run(run_id)
            out[run_id] = {
                "created": run.created.timestamp(),
                "start": run.start_time.timestamp(),
                "end": run.end_time.timestamp(),
            }
    return out


def round_of(pool: dict, base, data: Path, name: str, lines: int, steps: int) -> dict:
    import boto3

    from flows.train_line import LineOutcome
    from tests.line_cluster import BUCKET, pool_cycle, run_train_step, s3_creds

    inputs, plan, settings = pool_cycle(pool, base, data, name, lines, steps, 60)
    started = time.perf_counter()
    results = run_train_step(pool["api"], inputs, plan, settings)
    wall = time.perf_counter() - started
    bad = [r for r in results if r.outcome != "ok"]
    if bad:
        raise SystemExit(f"{name}: lines failed: {[(r.contributor_id, r.reason) for r in bad]}")
    s3 = boto3.client("s3", endpoint_url=pool["s3"], **s3_creds())
    prefix = f"factory/lines/expert-{name}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    outcomes = [
        LineOutcome.model_validate_json(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())
        for k in keys
        if "/results/" in k
    ]
    times = flow_runs(pool["api"], [o.flow_run_id for o in outcomes])
    rows, previous_end = [], {}
    first_created = min(t["created"] for t in times.values())
    for o in sorted(outcomes, key=lambda o: times[o.flow_run_id]["start"]):
        t = times[o.flow_run_id]
        before = previous_end.get(o.worker, 0.0)  # a run taken while the last one ran: created
        ready = max(t["created"], before) if before <= t["start"] else t["created"]
        previous_end[o.worker] = max(before, t["end"])
        spent = sum(o.timings[k] for k in ("stage_s", "wait_s", "train_s", "publish_s"))
        rows.append(
            {
                "line": o.result.contributor_id,
                "worker": o.worker,
                "pickup_s": t["start"] - ready,
                "engine_s": (t["end"] - t["start"]) - spent,
                **o.timings,
                # the training window from the round's first flow run (one clock on this machine)
                "train_from_s": o.train_window[0] - first_created,
                "train_to_s": o.train_window[1] - first_created,
            }
        )
    workers = len(pool["workers"])
    train_total = sum(r["train_s"] for r in rows)
    overhead = (workers * wall - train_total) / lines
    return {"name": name, "lines": lines, "steps": steps, "wall_s": wall, "rows": rows,
            "overhead_per_line_s": overhead,
            "mean_train_s": train_total / lines}  # fmt: skip


def summary(result: dict) -> str:
    rows = result["rows"]
    parts = ", ".join(
        f"{key} {statistics.mean(r[key] for r in rows):.2f}"
        for key in ("pickup_s", "engine_s", "stage_s", "wait_s", "publish_s", "train_s")
    )
    return (f"{result['name']}: {result['lines']} lines x {result['steps']} steps, wall "
            f"{result['wall_s']:.1f} s, mean per line: {parts}; overhead per line "
            f"{result['overhead_per_line_s']:.2f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2,
                        help="flow runs a worker takes at once (1: no line starts while "
                             "another trains on its machine)")  # fmt: skip
    parser.add_argument("--long-lines", type=int, default=2)
    parser.add_argument("--long-steps", type=int, default=600)
    parser.add_argument(
        "--server-db",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="the Prefect server's database (sqlite: its default)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    # A SIGTERM (a timeout, a cancelled job) unwinds like Ctrl-C, so the pool's processes die.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(REPO))
    from cli.progress import quiet_libraries

    quiet_libraries()  # the bench's figures, not the libraries' bars and the cycle's log
    from factory.base_model import ensure_base_model
    from tests.conftest import CACHE, free_port  # CACHE: the tests' offline model cache
    from tests.line_cluster import local_pool
    from tests.pg import new_database, start_postgres

    base = ensure_base_model(CACHE, "tiny", log=lambda *_: None)
    root = Path(tempfile.mkdtemp(prefix="taas-line-bench-"))
    data = prepared_data(base, root / "data")
    names = tuple(f"w{i}" for i in range(args.workers))
    with ExitStack() as stack:
        url = None
        if args.server_db == "postgres":
            database = start_postgres(free_port())
            stack.callback(database.stop)
            url = new_database(database)
        pool = stack.enter_context(
            local_pool(root / "pool", names, limit=args.limit, database_url=url)
        )
        print(summary(round_of(pool, base, data, "warm-up", 1, args.steps)), flush=True)
        alone = round_of(pool, base, data, "alone", args.workers, args.steps)
        print(summary(alone), flush=True)
        short = round_of(pool, base, data, "short", args.lines, args.steps)
        print(summary(short), flush=True)
        long = None
        if args.long_lines:
            long = round_of(pool, base, data, "long", args.long_lines, args.long_steps)
            print(summary(long), flush=True)
    ratio_60 = short["overhead_per_line_s"] / 60.0
    print(f"ratio_60s {ratio_60:.4f} (overhead per line {short['overhead_per_line_s']:.2f} s "
          f"/ 60 s; goal <= 0.05)")  # fmt: skip
    vs_alone = (args.workers * short["wall_s"] - args.lines * alone["mean_train_s"]) / args.lines
    if len({row["worker"] for row in alone["rows"]}) < args.workers:
        print("overhead_vs_alone: void, the alone round's lines shared a worker")
    print(f"overhead_vs_alone {vs_alone:.2f} s per line (alone_train_s "
          f"{alone['mean_train_s']:.2f}), ratio_60s {vs_alone / 60:.4f}")  # fmt: skip
    if long is not None and len({row["worker"] for row in long["rows"]}) < args.workers:
        print("long lines: void, they shared a worker (use --limit 1 or more long lines)")
    elif long is not None:
        measured = long["overhead_per_line_s"] / long["mean_train_s"]
        print(f"long lines: train {long['mean_train_s']:.1f} s, overhead "
              f"{long['overhead_per_line_s']:.2f} s, measured ratio {measured:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"alone": alone, "short": short, "long": long,
                                         "ratio_60s": ratio_60, "overhead_vs_alone_s": vs_alone},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
