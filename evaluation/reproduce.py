"""What lets anyone outside the factory reproduce a benchmark run with the ``lm_eval`` CLI.

:func:`export_tasks` writes a self-contained task folder (each task's YAML, its JSONL beside it
and the ``custom_dataset`` loader, so data paths resolve from the folder wherever ``lm_eval``
runs); :func:`lm_eval_command` is the exact command line for one model of a
:class:`evaluation.benchmark.BenchmarkResult` (same tasks, ``limit``, ``batch_size`` and dtype);
:func:`write_reproduction` puts both, with that model's results in lm-eval's own output format
(``results.json``, what ``lm_eval --output_path`` writes), into one folder.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from evaluation.benchmark import (
    LOADER_FUNCTION,
    BenchmarkResult,
    _Function,
    _write_task_yaml,
    copy_loader,
    read_task_yaml,
)
from infra.atomic import atomic_write_json, atomic_write_text

COMMAND_FILE = "lm_eval_command.sh"
RESULTS_FILE = "results.json"
TASKS_DIR = "tasks"


def find_task_yamls(include_paths: list[Path | str]) -> dict[str, Path]:
    """``{task name: YAML path}`` over the folders (first folder wins, as in lm-eval)."""
    found: dict[str, Path] = {}
    for folder in include_paths:
        for path in sorted(Path(folder).glob("*.yaml")):
            found.setdefault(read_task_yaml(path)["task"], path)
    return found


def export_tasks(include_paths: list[Path | str], tasks: list[str], dest: Path) -> Path:
    """Writes ``tasks`` as a self-contained folder ``dest``: relative data file names only."""
    dest = Path(dest)
    yamls = find_task_yamls(include_paths)
    missing = sorted(set(tasks) - set(yamls))
    if missing:
        raise ValueError(f"tasks: {missing} have no YAML under include_paths {include_paths}")
    dest.mkdir(parents=True, exist_ok=True)
    copy_loader(dest)
    for task in tasks:
        config = read_task_yaml(yamls[task])
        files = {}
        for split, name in config["dataset_kwargs"]["data_files"].items():
            source = yamls[task].parent / name  # an absolute name stays itself
            if not source.is_file():
                raise ValueError(f"{yamls[task]}: data_files.{split} {source} is missing")
            local = f"{task}.{split}.jsonl"
            shutil.copyfile(source, dest / local)
            files[split] = local
        config["dataset_path"] = "json"
        config["custom_dataset"] = _Function(LOADER_FUNCTION)
        config["dataset_kwargs"]["data_files"] = files
        _write_task_yaml(dest / f"{task}.yaml", config)
    return dest


def lm_eval_command(
    result: BenchmarkResult,
    model: str,
    base: str,
    adapter: str | None,
    include_path: str,
    tasks: list[str] | None = None,
) -> list[str]:
    """The ``lm_eval`` argv that scores ``model`` of ``result`` as the run did."""
    if model not in result.table:
        raise ValueError(f"model: {model!r} is not in the benchmark ({sorted(result.table)})")
    args = f"pretrained={base}" + (f",peft={adapter}" if adapter else "")
    args += f",dtype={result.dtypes.get(model, 'float32')}"
    argv = ["lm_eval", "--model", "hf", "--model_args", args,
            "--tasks", ",".join(tasks or result.tasks), "--include_path", include_path,
            "--batch_size", str(result.batch_size)]  # fmt: skip
    return argv + (["--limit", str(result.limit)] if result.limit is not None else [])


def write_reproduction(
    result: BenchmarkResult,
    model: str,
    dest: Path,
    base: str,
    adapter: str | None,
    tasks: list[str] | None = None,
    include_paths: list[Path | str] | None = None,
) -> Path:
    """``dest/tasks/`` (:func:`export_tasks` from ``include_paths``, else the run's own),
    ``dest/lm_eval_command.sh`` (run from ``dest``; ``base`` and ``adapter`` as given) and
    ``dest/results.json`` (``model``'s lm-eval output, restricted to ``tasks``)."""
    dest = Path(dest)
    tasks = list(tasks or result.tasks)
    export_tasks(include_paths or result.include_paths, tasks, dest / TASKS_DIR)
    argv = lm_eval_command(result, model, base, adapter, TASKS_DIR, tasks)
    script = (
        "#!/bin/sh\n# Reproduces the registered lm-eval numbers (results.json); run it from "
        "this folder.\n" + shlex.join(argv) + ' "$@"\n'
    )
    atomic_write_text(dest / COMMAND_FILE, script)
    raw = dict(result.raw.get(model, {}))
    for key in ("results", "configs", "versions", "n-samples", "n-shot", "higher_is_better"):
        if isinstance(raw.get(key), dict):
            raw[key] = {t: v for t, v in raw[key].items() if t in tasks}
    atomic_write_json(dest / RESULTS_FILE, raw)
    return dest
