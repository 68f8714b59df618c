"""The same commission end to end on a user's own base in each form a spec can name it: a
single-file Llama folder, a sharded Qwen2 folder with its index, and a GGUF file.

Each runs the real flow (DeepSpeed lines, PoL, merge, WiSE-FT, router annealing, lm-eval,
registration) on a tiny random model built in tests/base_models.py, with a smaller budget than
the shared tiny commission so that the three together stay a few minutes.
"""

from __future__ import annotations

import json

import pytest
import yaml

from factory.base_model import base_model_sha256
from factory.corpus import licence_paragraphs
from factory.library import ExpertLibrary
from flows.commission import run_commission
from infra.settings import get_settings
from tests.base_models import llama_folder, qwen2_sharded_folder, write_gguf
from tests.conftest import TINY_COMMISSION
from tests.test_prefect_ui import line_task_runs


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("own-bases")
    llama = llama_folder(tiny_base, root / "llama")
    return {
        "llama": {"path": str(llama), "name": "acme-llama"},
        "qwen2-sharded": {"path": str(qwen2_sharded_folder(tiny_base, root / "qwen"))},
        "gguf": {"gguf": str(write_gguf(llama, root / "tiny-llama.gguf"))},
    }


def _spec(kind: str, base: dict) -> dict:
    return {
        **TINY_COMMISSION,
        # a customer of its own: its expert id (and Prefect artifact keys) are its own
        "customer": f"Own Base {kind}",
        "base_model": base,
        "budget": {
            **TINY_COMMISSION["budget"],
            "steps_per_cycle": 8,
            "processes_per_line": 1,
            "learning_rate": 0.02,
        },  # fmt: skip
        "heldout": {"fraction": 0.15, "min_tokens": 512, "pol_batches": 4, "eval_blocks": 32},
        "wise_ft": {"alpha_grid": [0.5, 1.0]},
        "router": {"steps": 4},
        "benchmarks": {"limit": 8},
    }


@pytest.mark.parametrize("kind", ["llama", "qwen2-sharded", "gguf"])
def test_commission_on_a_users_own_base(kind, bases, tmp_path):
    root = tmp_path
    rows = licence_paragraphs()[:300]
    (root / "licences.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(kind, bases[kind])))
    settings = get_settings(home=root / "home", data_roots=[root], base_model_dir=None)

    summary = run_commission(spec_path, settings)

    assert summary["heldout_loss_expert"] < summary["heldout_loss_base"]
    [scores] = summary["pol"].values()
    assert set(scores) == {"line-0", "line-1"} and max(scores.values()) > 0
    assert summary["registered"] is not None
    assert {"base", "expert", "mixture"} <= set(summary["benchmark"])
    registered = summary["registered"]
    version = ExpertLibrary(settings).show(registered["name"], registered["version"])
    if kind == "gguf":  # imported once into a plain safetensors folder under the home
        [imported] = (settings.home / "base").glob("gguf-*")
        folder, name = imported, "tiny-llama-gguf"
    else:
        folder, name = bases[kind]["path"], bases[kind].get("name", "qwen")
    assert version.tags["base_model_sha256"] == base_model_sha256(folder)
    assert version.tags["base_model"] == name
    # The Prefect UI shows each line as a task run named for expert, cycle and line.
    runs = line_task_runs(summary["expert_id"], 1, ["line-0", "line-1"])
    assert [r.name for r in runs] == [
        f"train-line {summary['expert_id']} cycle 1 line-{i}" for i in (0, 1)
    ]
