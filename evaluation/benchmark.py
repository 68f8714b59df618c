"""Benchmarks with lm-evaluation-harness on local task YAMLs, base and experts in one run.

Every model of a run is scored on the same tasks, with the same ``limit`` and seeds, by
``lm_eval.simple_evaluate`` through one ``TaskManager(include_path=..., include_defaults=False)``
(offline: the tasks read local JSONL with ``dataset_path: json``). A model spec is ``None`` (the
base model), an adapter folder (loaded with ``peft=``), or an in-memory torch model (a routed
mixture), wrapped as ``HFLM(pretrained=model, tokenizer=...)``.

Metrics (lm-eval definitions, reported per task):

- ``acc``: mean over items of 1[argmax_i loglik(choice_i | context) == gold];
  ``acc_norm`` divides each choice's log-likelihood by its length in bytes first.
- ``word_perplexity`` = exp(-sum loglik / sum words), ``byte_perplexity`` =
  exp(-sum loglik / sum bytes), ``bits_per_byte`` = -sum loglik / (sum bytes * ln 2), over the
  rolling log-likelihood of whole documents (nothing masked).

An adapter that was "not applied" shows as an expert whose numbers equal the base's exactly;
:func:`run_benchmarks` raises :class:`AdapterNotAppliedError` then (or flags it when asked).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from infra.atomic import atomic_write_json, atomic_write_text

SHIPPED_TASKS_DIR = Path(__file__).parent / "tasks"
# The custom_dataset loader every task folder carries beside its YAMLs (see its module doc).
LOADER_FILE = "taas_data.py"
LOADER_FUNCTION = "taas_data.load"
GENERAL_TASKS = ("taas_general_cloze", "taas_general_perplexity")
LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"})
GENERAL_PERPLEXITY_ROWS = 32
# lm-eval's aggregations for the loglikelihood_rolling metrics (named to silence its defaults).
_ROLLING_METRICS = (
    ("word_perplexity", "weighted_perplexity"),
    ("byte_perplexity", "weighted_perplexity"),
    ("bits_per_byte", "bits_per_byte"),
)
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,80}$")


class AdapterNotAppliedError(ValueError):
    """An expert scored exactly like the base model: its adapter did not reach the forward pass."""


class BenchmarkConfig(BaseModel):
    """What a commission benchmarks: task names, where their YAMLs live, and the sample cap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(min_length=1)
    include_paths: list[Path]
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)


@dataclass
class BenchmarkResult:
    """``table[model][task][metric]`` plus, per model, lm-eval's own output (``simple_evaluate``'s
    dict without samples, serialized as ``lm_eval --output_path`` writes it), and how the run was
    made (``limit``, ``batch_size``, each model's ``dtypes``, the task ``include_paths``) so that
    :mod:`evaluation.reproduce` can write the ``lm_eval`` command that gives the same numbers."""

    table: dict[str, dict[str, dict[str, float]]]
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    dtypes: dict[str, str] = field(default_factory=dict)
    include_paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "raw": self.raw,
            "tasks": self.tasks,
            "not_applied": self.not_applied,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "dtypes": self.dtypes,
            "include_paths": self.include_paths,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkResult:
        return cls(
            table=data["table"],
            raw=data.get("raw", {}),
            tasks=list(data.get("tasks", [])),
            not_applied=list(data.get("not_applied", [])),
            limit=data.get("limit"),
            batch_size=int(data.get("batch_size", 8)),
            dtypes=dict(data.get("dtypes", {})),
            include_paths=list(data.get("include_paths", [])),
        )

    def save(self, path: Path) -> Path:
        """Writes the results JSON atomically."""
        atomic_write_json(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> BenchmarkResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- task YAMLs -------------------------------------------------------------------------------


class _Function(str):
    """A YAML ``!function`` reference (lm-eval imports it from the YAML's folder)."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _Function(node.value))
_TaskDumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as a dict; ``!function`` references are kept (and written back as such)."""
    config = yaml.load(Path(path).read_text(), Loader=_TaskLoader)  # noqa: S506 - safe subclass
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ValueError(f"{path}: not a lm-eval task YAML (no 'task' name)")
    return config


def _write_task_yaml(path: Path, config: dict[str, Any]) -> Path:
    atomic_write_text(path, yaml.dump(config, Dumper=_TaskDumper, sort_keys=False))
    return path


def copy_loader(folder: Path) -> None:
    """Puts the ``custom_dataset`` loader beside a folder's task YAMLs."""
    atomic_write_text(Path(folder) / LOADER_FILE, (SHIPPED_TASKS_DIR / LOADER_FILE).read_text())


def prepare_tasks(cache_dir: Path) -> Path:
    """Materializes the shipped general tasks under ``cache_dir`` and returns that include path.

    The shipped YAMLs name their data files relative to themselves (their loader resolves them
    from its own folder); the copies name them by absolute path, so a copy stays right even if
    its loader is replaced. ``general_text.jsonl`` is
    generated from :func:`factory.corpus.general_heldout_text`: its first
    ``GENERAL_PERPLEXITY_ROWS`` paragraphs (general prose no embedded base was pretrained on).
    """
    from factory.corpus import general_heldout_text

    out = Path(cache_dir) / "general_tasks"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHIPPED_TASKS_DIR / "general_cloze.jsonl", out / "general_cloze.jsonl")
    copy_loader(out)
    rows = general_heldout_text()[:GENERAL_PERPLEXITY_ROWS]
    atomic_write_text(
        out / "general_text.jsonl", "".join(json.dumps({"text": row}) + "\n" for row in rows)
    )
    for shipped in sorted(SHIPPED_TASKS_DIR.glob("*.yaml")):
        config = read_task_yaml(shipped)
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {
            split: str((out / name).resolve()) for split, name in files.items()
        }
        _write_task_yaml(out / shipped.name, config)
    return out


def benchmark_texts() -> list[str]:
    """The texts of the shipped general benchmarks' items (each cloze item with its gold
    completion, each general perplexity row): training rows overlapping them are removed at
    intake (see :mod:`factory.data.contamination`)."""
    from factory.corpus import general_heldout_text

    texts = []
    for line in (SHIPPED_TASKS_DIR / "general_cloze.jsonl").read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            texts.append(f"{item['context']} {item['choices'][item['label']]}")
    return texts + general_heldout_text()[:GENERAL_PERPLEXITY_ROWS]


def make_perplexity_task(
    heldout_jsonl: Path, name: str, out_dir: Path, text_field: str = "text"
) -> Path:
    """Writes a ``loglikelihood_rolling`` task over the held-out rows; returns the YAML path.

    The YAML names the rows by absolute path; :func:`evaluation.reproduce.export_tasks` copies
    the rows beside it for a self-contained folder."""
    heldout_jsonl = Path(heldout_jsonl)
    if not _TASK_NAME.match(name):
        raise ValueError(f"name: {name!r} must be letters, digits and '_' (a lm-eval task name)")
    if not heldout_jsonl.is_file():
        raise ValueError(f"heldout_jsonl: no such file {heldout_jsonl}; write the held-out split")
    lines = [line for line in heldout_jsonl.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"heldout_jsonl: {heldout_jsonl} has no rows")
    for number, line in enumerate(lines, 1):
        row = json.loads(line)
        if not isinstance(row.get(text_field), str) or not row[text_field].strip():
            raise ValueError(
                f"heldout_jsonl: row {number} lacks a non-empty '{text_field}'; set text_field"
            )
    config = {
        "task": name,
        "dataset_path": "json",
        "custom_dataset": _Function(LOADER_FUNCTION),
        "dataset_kwargs": {"data_files": {"test": str(heldout_jsonl.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{" + text_field + "}}",
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in _ROLLING_METRICS
        ],
        "metadata": {"version": 1.0},
    }
    copy_loader(Path(out_dir))
    return _write_task_yaml(Path(out_dir) / f"{name}.yaml", config)


# ---- running ----------------------------------------------------------------------------------


def _clean_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` -> ``{"acc": 0.5}``."""
    metrics = {}
    for key, value in task_results.items():
        # Metric keys carry a filter suffix ("acc,none"); "alias" and "sample_len" do not.
        metric, comma, _filter = key.partition(",")
        if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        metrics[metric] = float(value)
    return metrics


def _lm_eval_json(obj: Any) -> Any:
    """JSON-safe the way ``lm_eval --output_path`` serializes its results."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable, ensure_ascii=False))


def _bars_off() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def _quiet_hflm():
    """HFLM whose progress bars follow TQDM_DISABLE (the CLI sets it without ``--verbose``):
    lm-eval passes ``disable=False`` to its own bars, which overrides the environment."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or _bars_off())

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or _bars_off())

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or _bars_off())

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # loglikelihood_rolling calls this with disable_tqdm=False written in
            return super()._loglikelihood_tokens(
                requests, disable_tqdm=disable_tqdm or _bars_off(), override_bs=override_bs
            )

    return QuietHFLM


def _make_lm(base_model_path: Path, spec: Any, batch_size: int) -> tuple[Any, str]:
    """The HFLM of a model spec and the dtype it computes in."""
    import torch

    HFLM = _quiet_hflm()  # noqa: N806 - lm-eval's class, with bars that can be turned off
    from infra.hardware import select_precision, torch_device

    # The device follows the model's: an instantiated model is evaluated where it lives; a
    # folder is loaded on CUDA (in bf16 where supported) when there is one, else on the CPU.
    if isinstance(spec, torch.nn.Module):
        param = next(spec.parameters())
        device, dtype = str(param.device), str(param.dtype).removeprefix("torch.")
    else:
        device = torch_device()
        dtype = "bfloat16" if select_precision("auto") == "bf16" else "float32"
    common = {"device": device, "dtype": dtype, "batch_size": batch_size}
    if spec is None:
        return HFLM(pretrained=str(base_model_path), **common), dtype
    if isinstance(spec, str | Path):
        folder = Path(spec)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"models: {folder} is not an adapter folder (no adapter_config.json)")
        return HFLM(pretrained=str(base_model_path), peft=str(folder), **common), dtype
    from transformers import AutoTokenizer

    if not isinstance(spec, torch.nn.Module):
        raise ValueError(f"models: spec {type(spec).__name__} must be None, a folder or a model")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    return HFLM(pretrained=spec, tokenizer=tokenizer, **common), dtype


def _same_numbers(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    for task, metrics in a.items():
        for metric, value in metrics.items():
            other = b.get(task, {}).get(metric)
            if other is None or not math.isclose(value, other, rel_tol=0.0, abs_tol=1e-12):
                return False
    return True


class _NoCustomDatasetHint(logging.Filter):
    """lm-eval warns on every run of a task with a ``custom_dataset`` loader (all of ours, see
    :func:`copy_loader`) that kwargs could go to ``--metadata``: a hint, not a problem, and one
    per task per model would bury the stage display's real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


class _NoLoadedModelHint(logging.Filter):
    """lm-eval warns twice per model that it was given a loaded model rather than a name: the
    factory does that on purpose (the mixture has no name to load it by)."""

    HINTS = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.HINTS)


logging.getLogger("lm_eval.api.task").addFilter(_NoCustomDatasetHint())
logging.getLogger("lm_eval.models.huggingface").addFilter(_NoLoadedModelHint())


@contextmanager
def _factory_git_hash() -> Iterator[None]:
    """lm-eval records ``git describe`` of the current folder as ``git_hash`` (and git prints
    "fatal: not a git repository" to the terminal outside one): the results record the
    factory's code version instead (:func:`factory.library.provenance.code_version`)."""
    import lm_eval.evaluator

    from factory.library.provenance import code_version

    own = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = code_version
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = own


def run_benchmarks(
    base_model_path: Path,
    models: dict[str, Any],
    tasks: list[str],
    include_path: Path | list[Path],
    limit: int | None = None,
    batch_size: int = 8,
    base_name: str = "base",
    raise_not_applied: bool = True,
) -> BenchmarkResult:
    """Evaluates every model on every task in this one run; see the module doc for metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    config = BenchmarkConfig(tasks=tasks, include_paths=paths, limit=limit, batch_size=batch_size)
    if not models:
        raise ValueError("models: give at least one model (None for the base)")
    manager = TaskManager(
        include_path=[str(p) for p in config.include_paths], include_defaults=False
    )
    unknown = sorted(set(config.tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; add their YAML folder to include_path")
    table: dict[str, dict[str, dict[str, float]]] = {}
    raw: dict[str, dict[str, Any]] = {}
    dtypes: dict[str, str] = {}
    for name, spec in models.items():
        lm, dtypes[name] = _make_lm(Path(base_model_path), spec, config.batch_size)
        with _factory_git_hash():
            output = simple_evaluate(
                model=lm,
                tasks=list(config.tasks),
                task_manager=manager,
                limit=config.limit,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=0,
                numpy_random_seed=1234,
                torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
        del lm
        results = output["results"]
        table[name] = {task: _clean_metrics(results[task]) for task in config.tasks}
        raw[name] = _lm_eval_json({k: v for k, v in output.items() if k != "samples"})
    not_applied = []
    if base_name in table:
        not_applied = [
            name
            for name, spec in models.items()
            if spec is not None
            and name != base_name
            and _same_numbers(table[name], table[base_name])
        ]
    if not_applied and raise_not_applied:
        raise AdapterNotAppliedError(
            f"models: {not_applied} scored exactly like '{base_name}': the adapter was not applied"
        )
    return BenchmarkResult(
        table=table,
        raw=raw,
        tasks=list(config.tasks),
        not_applied=not_applied,
        limit=config.limit,
        batch_size=config.batch_size,
        dtypes=dtypes,
        include_paths=[str(Path(p).resolve()) for p in config.include_paths],
    )


def comparison_table(result: BenchmarkResult) -> str:
    """A markdown table: one row per task/metric, one column per model (arrows: better side)."""
    models = list(result.table)
    header = "| task | metric | " + " | ".join(models) + " |"
    lines = [header, "|" + "---|" * (len(models) + 2)]
    tasks = result.tasks or sorted({t for per in result.table.values() for t in per})
    for task in tasks:
        metrics = sorted({m for per in result.table.values() for m in per.get(task, {})})
        for metric in metrics:
            arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
            cells = []
            for model in models:
                value = result.table[model].get(task, {}).get(metric)
                cells.append("-" if value is None else f"{value:.4g}")
            lines.append(f"| {task} | {metric} {arrow} | " + " | ".join(cells) + " |")
    if result.not_applied:
        lines.append("")
        lines.append(f"Adapter not applied (identical to base): {', '.join(result.not_applied)}")
    return "\n".join(lines) + "\n"
