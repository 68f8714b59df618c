"""The ``lm_eval`` CLI, run from another folder, reproduces a benchmark's recorded numbers from
the folder :func:`evaluation.reproduce.write_reproduction` writes; the shipped task folder works
from any working folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.benchmark import (
    GENERAL_TASKS,
    SHIPPED_TASKS_DIR,
    make_perplexity_task,
    prepare_tasks,
    run_benchmarks,
)
from evaluation.reproduce import COMMAND_FILE, RESULTS_FILE, lm_eval_command, write_reproduction

LM_EVAL = Path(sys.executable).parent / "lm_eval"


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    return {
        task: {
            k.partition(",")[0]: v
            for k, v in per.items()
            if "," in k and "_stderr" not in k and isinstance(v, int | float)
        }
        for task, per in results.items()
    }


def test_shipped_tasks_run_from_any_folder(tiny_base, tmp_path, monkeypatch):
    """The shipped YAMLs, used in place from an unrelated folder, score like their cached copies
    (so the shipped general_text.jsonl is the one prepare_tasks generates)."""
    cached = run_benchmarks(tiny_base.path, {"base": None}, list(GENERAL_TASKS),
                            prepare_tasks(tmp_path / "cache"), limit=4)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shipped = run_benchmarks(tiny_base.path, {"base": None}, list(GENERAL_TASKS),
                             SHIPPED_TASKS_DIR, limit=4)  # fmt: skip
    assert shipped.table == cached.table
    assert shipped.table["base"]["taas_general_perplexity"]["word_perplexity"] > 1.0


def test_lm_eval_cli_reproduces_recorded_numbers(tiny_base, tiny_expert_folder, tmp_path):
    heldout = tmp_path / "data" / "heldout.jsonl"
    heldout.parent.mkdir()
    texts = [
        "The licensee shall indemnify the licensor against every claim arising from use.",
        "Redistribution in source form must retain the above copyright notice.",
        "The licensor may terminate this agreement upon written notice to the licensee.",
    ]
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    own = make_perplexity_task(heldout, "heldout_legal", tmp_path / "bench" / "tasks")
    tasks = ["heldout_legal", *GENERAL_TASKS]
    result = run_benchmarks(tiny_base.path, {"base": None, "expert": tiny_expert_folder}, tasks,
                            [prepare_tasks(tmp_path / "cache"), own.parent], limit=5,
                            batch_size=4)  # fmt: skip
    repro = write_reproduction(result, "expert", tmp_path / "repro", str(tiny_base.path),
                               str(tiny_expert_folder))  # fmt: skip
    script = (repro / COMMAND_FILE).read_text()
    assert "--tasks heldout_legal,taas_general_cloze,taas_general_perplexity" in script
    assert "--include_path tasks --batch_size 4 --limit 5" in script
    saved = json.loads((repro / RESULTS_FILE).read_text())
    assert _metrics(saved["results"]) == result.table["expert"]
    # The data travelled with the tasks: nothing in the folder points back at the factory.
    assert sorted(p.name for p in (repro / "tasks").iterdir()) == sorted(
        [f"{t}.yaml" for t in tasks] + [f"{t}.test.jsonl" for t in tasks] + ["taas_data.py"]
    )
    assert str(tmp_path / "cache") not in "".join(
        p.read_text() for p in (repro / "tasks").glob("*.yaml")
    )

    # The CLI, from an unrelated folder, on the exported task folder.
    other = tmp_path / "other"
    other.mkdir()
    argv = lm_eval_command(result, "expert", str(tiny_base.path), str(tiny_expert_folder),
                           str(repro / "tasks"))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [str(LM_EVAL), *argv[1:], "--output_path", str(other / "out")]
    done = subprocess.run(command, cwd=other, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted((other / "out").rglob("results_*.json"))
    assert len(written) == 1
    cli = _metrics(json.loads(written[0].read_text())["results"])
    assert set(cli) == set(tasks)
    for task, metrics in result.table["expert"].items():
        for metric, value in metrics.items():
            assert cli[task][metric] == pytest.approx(value, abs=1e-4, rel=0), (task, metric)
    # The expert differs from the base on its held-out text, so the adapter was applied.
    assert cli["heldout_legal"]["word_perplexity"] != pytest.approx(
        result.table["base"]["heldout_legal"]["word_perplexity"], rel=1e-3
    )


def test_bundle_carries_general_reproduction_never_heldout(tiny_expert_folder, tmp_path):
    """The bundle takes the general tasks' command, results and task files from a reproduction
    folder; the commission's held-out task (customer text) stays out."""
    from factory.bundle import LM_EVAL_DIR, LM_EVAL_FILES, write_bundle

    source = tmp_path / "repro"
    (source / "tasks").mkdir(parents=True)
    for rel in LM_EVAL_FILES:
        (source / rel).write_text(f"{rel}\n")
    (source / "tasks" / "heldout_legal.yaml").write_text("task: heldout_legal\n")
    (source / "tasks" / "heldout_legal.test.jsonl").write_text('{"text": "customer row"}\n')
    card = tmp_path / "README.md"
    card.write_text("# card\n")
    bundle = write_bundle(tmp_path / "bundle", tiny_expert_folder, card, "# use\n", {},
                          lm_eval_dir=source)  # fmt: skip
    shipped = {str(p.relative_to(bundle / LM_EVAL_DIR)) for p in (bundle / LM_EVAL_DIR).rglob("*")
               if p.is_file()}  # fmt: skip
    assert shipped == set(LM_EVAL_FILES)
    assert "customer row" not in "".join(p.read_text() for p in (bundle / LM_EVAL_DIR).rglob("*")
                                         if p.is_file())  # fmt: skip


def test_exported_bundle_reproduces_its_general_numbers(tiny_commission, tmp_path):
    """Through the real path: the version the commission flow registered, exported as a bundle;
    its ``lm_eval/lm_eval_command.sh``, run from there with the ``lm_eval`` CLI, gives the
    numbers in the bundle's ``results.json`` (the general tasks; the held-out task stays out)."""
    from factory.library import ExpertLibrary

    settings, summary = tiny_commission["settings"], tiny_commission["summary"]
    registered = summary["registered"]
    bundle = ExpertLibrary(settings).export(
        registered["name"], registered["version"], tmp_path / "bundle"
    )
    folder = bundle / "lm_eval"
    script = (folder / COMMAND_FILE).read_text()
    assert "peft=.." in script and f"pretrained={settings.base_model_dir}" in script
    recorded = _metrics(json.loads((folder / RESULTS_FILE).read_text())["results"])
    assert set(recorded) == set(GENERAL_TASKS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{LM_EVAL.parent}:{os.environ['PATH']}"}  # fmt: skip
    command = ["sh", COMMAND_FILE, "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # lm-eval names the results folder after the model, here "..": they land beside "out"
    written = sorted(p for p in tmp_path.rglob("results_*.json") if bundle not in p.parents)
    assert len(written) == 1, (script, done.stdout[-2000:], done.stderr[-2000:])
    cli = _metrics(json.loads(written[0].read_text())["results"])
    assert set(cli) == set(recorded)
    for task, metrics in recorded.items():
        for metric, value in metrics.items():
            assert cli[task][metric] == pytest.approx(value, abs=1e-4, rel=0), (task, metric)
