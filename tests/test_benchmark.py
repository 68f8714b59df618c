"""lm-eval benchmarks: shipped tasks load, base and expert differ in one run, a no-op adapter
is caught, results JSON round-trips, the comparison table renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluation.benchmark import (
    GENERAL_TASKS,
    SHIPPED_TASKS_DIR,
    AdapterNotAppliedError,
    BenchmarkResult,
    comparison_table,
    make_perplexity_task,
    prepare_tasks,
    read_task_yaml,
    run_benchmarks,
)


def test_shipped_tasks_are_valid(tmp_path):
    from lm_eval.tasks import TaskManager

    cloze = [json.loads(line) for line in (SHIPPED_TASKS_DIR / "general_cloze.jsonl").open()]
    assert len(cloze) == 40
    assert all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in cloze)
    # Gold positions rotate, so always answering one position scores exactly 25%.
    assert sorted({row["label"] for row in cloze}) == [0, 1, 2, 3]
    assert max(sum(row["label"] == k for row in cloze) for k in range(4)) == 10
    include = prepare_tasks(tmp_path)
    for path in include.glob("*.yaml"):
        config = read_task_yaml(path)  # keeps the loader's !function tag
        for data in config["dataset_kwargs"]["data_files"].values():
            assert Path(data).is_absolute() and Path(data).is_file()
    manager = TaskManager(include_path=[str(include)], include_defaults=False)
    assert set(GENERAL_TASKS) <= set(manager.all_tasks)


def test_make_perplexity_task_rejects_bad_input(tmp_path):
    rows = tmp_path / "heldout.jsonl"
    rows.write_text(json.dumps({"text": "a held-out row"}) + "\n")
    with pytest.raises(ValueError, match="name"):
        make_perplexity_task(rows, "bad-name", tmp_path)
    with pytest.raises(ValueError, match="heldout_jsonl"):
        make_perplexity_task(tmp_path / "missing.jsonl", "ok_name", tmp_path)
    rows.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="text_field"):
        make_perplexity_task(rows, "ok_name", tmp_path)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    include = prepare_tasks(root)
    heldout = root / "legal_heldout.jsonl"
    texts = [
        "The licensee shall indemnify the licensor against every claim arising from use.",
        "This licence is granted without warranty of any kind, express or implied.",
        "Redistribution in source form must retain the above copyright notice.",
        "The licensor may terminate this agreement upon written notice to the licensee.",
    ]
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    make_perplexity_task(heldout, "legal_heldout_ppl", include)
    return include


def test_base_and_expert_in_one_run_differ(tiny_base, tiny_expert_folder, task_dir, tmp_path):
    tasks = ["taas_general_cloze", "legal_heldout_ppl"]
    result = run_benchmarks(
        tiny_base.path,
        {"base": None, "expert": tiny_expert_folder},
        tasks,
        task_dir,
        limit=12,
        batch_size=8,
    )
    assert set(result.table) == {"base", "expert"}
    base, expert = result.table["base"], result.table["expert"]
    assert set(base["taas_general_cloze"]) == {"acc", "acc_norm"}
    assert 0.0 <= base["taas_general_cloze"]["acc"] <= 1.0
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(base["legal_heldout_ppl"][metric])
        assert base["legal_heldout_ppl"][metric] > 0
    # The expert was trained on licence prose: its held-out perplexity is lower than the base's.
    assert (
        expert["legal_heldout_ppl"]["word_perplexity"]
        < base["legal_heldout_ppl"]["word_perplexity"]
    )
    # byte_perplexity is exp(bits_per_byte * ln 2) by definition.
    bpb = base["legal_heldout_ppl"]["bits_per_byte"]
    assert base["legal_heldout_ppl"]["byte_perplexity"] == pytest.approx(2**bpb, rel=1e-6)
    assert result.not_applied == []
    assert result.raw["expert"]["n-samples"]["taas_general_cloze"]["effective"] == 12

    saved = result.save(tmp_path / "results.json")
    again = BenchmarkResult.load(saved)
    assert again.table == result.table
    markdown = comparison_table(result)
    assert markdown.splitlines()[0] == "| task | metric | base | expert |"
    assert "| legal_heldout_ppl | word_perplexity ↓ |" in markdown


def test_adapter_not_applied_is_detected(tiny_base, tiny_expert_folder, task_dir, tmp_path):
    """An adapter whose B matrices are zero changes nothing: flagged, and raised by default."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    noop = tmp_path / "noop"
    shutil.copytree(tiny_expert_folder, noop)
    adapter = load_file(str(noop / "adapter_model.safetensors"))
    zeroed = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in adapter.items()}
    save_file(zeroed, str(noop / "adapter_model.safetensors"))
    models = {"base": None, "noop": noop}
    flagged = run_benchmarks(
        tiny_base.path, models, ["legal_heldout_ppl"], task_dir, limit=2, raise_not_applied=False
    )
    assert flagged.not_applied == ["noop"]
    assert "Adapter not applied" in comparison_table(flagged)
    with pytest.raises(AdapterNotAppliedError, match="noop"):
        run_benchmarks(tiny_base.path, models, ["legal_heldout_ppl"], task_dir, limit=2)


def test_in_memory_model_and_unknown_task(tiny_base, tiny_expert_folder, task_dir):
    from peft import PeftModel

    from factory.base_model import load_base

    model, _ = load_base(tiny_base.path)
    merged = PeftModel.from_pretrained(model, str(tiny_expert_folder)).merge_and_unload()
    result = run_benchmarks(
        tiny_base.path,
        {"merged": merged, "expert": tiny_expert_folder},
        ["legal_heldout_ppl"],
        task_dir,
        limit=4,
    )
    # A merged LoRA computes the same function as the unmerged adapter (float32 rounding only).
    assert result.table["merged"]["legal_heldout_ppl"]["word_perplexity"] == pytest.approx(
        result.table["expert"]["legal_heldout_ppl"]["word_perplexity"], rel=1e-4
    )
    with pytest.raises(ValueError, match="tasks"):
        run_benchmarks(tiny_base.path, {"base": None}, ["no_such_task"], task_dir)


def test_no_progress_bars_when_the_cli_turns_them_off(tiny_base, task_dir, monkeypatch, capfd):
    """lm-eval passes disable=False to its own bars, overriding TQDM_DISABLE; the factory's
    HFLM honours it, so `taas demo` prints its stages and not lm-eval's bars."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capfd.readouterr()
    run_benchmarks(tiny_base.path, {"base": None}, ["legal_heldout_ppl"], task_dir, limit=2)
    quiet = capfd.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "0")
    run_benchmarks(tiny_base.path, {"base": None}, ["legal_heldout_ppl"], task_dir, limit=2)
    loud = capfd.readouterr().err
    assert "Running loglikelihood requests" in loud  # the check can see a bar
    # (transformers' "Loading weights" bar follows HF_HUB_DISABLE_PROGRESS_BARS, read when
    # huggingface_hub is imported: the CLI sets it first)
    assert "Running loglikelihood requests" not in quiet
