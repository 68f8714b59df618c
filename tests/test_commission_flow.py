"""The whole commission flow on a tiny configuration: real DeepSpeed lines (2 processes each,
gloo), real Proof-of-Loss, WiSE-FT, router annealing, lm-eval and MLflow registration.

A second run of the same spec (a crash-and-rerun stand-in) trains nothing again and registers
nothing twice.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def commission(tmp_path_factory, tiny_base):
    from factory.corpus import licence_paragraphs
    from flows.commission import run_commission
    from infra.settings import get_settings

    root = tmp_path_factory.mktemp("commission")
    rows = licence_paragraphs()[:400]
    (root / "licences.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    spec = {
        "version": 1,
        "customer": "Acme Legal",
        "domain": "legal-licences",
        "description": "licence texts",
        "data": [{"uri": "licences.jsonl", "text_field": "text"}],
        "base_model": {"name": "taas-embedded-tiny", "preset": "tiny"},
        "expert": {"rank": 4, "alpha": 8},
        "budget": {
            "cycles": 1,
            "steps_per_cycle": 12,
            "production_lines": 2,
            "processes_per_line": 2,
            "batch_size": 4,
            "learning_rate": 0.01,
            "seq_len": 64,
            "zero_stage": 2,
        },
        "heldout": {"fraction": 0.15, "min_tokens": 512},
        "router": {"steps": 10},
        "licence": {"type": "usage", "price_per_1k_tokens": "0.01"},
        "seed": 3,
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    settings = get_settings(home=root / "home", data_roots=[root], base_model_dir=tiny_base.path)
    summary = run_commission(spec_path, settings)
    return spec_path, settings, summary


def test_commission_registers_an_expert_with_provenance(commission, tiny_base):
    from factory.library import ExpertLibrary

    _, settings, summary = commission
    registered = summary["registered"]
    assert registered is not None
    version = ExpertLibrary(settings).show(registered["name"], registered["version"])
    tags = version.tags
    assert tags["commission_id"] == summary["commission_id"]
    assert tags["domain"] == "legal-licences"
    assert tags["base_model_sha256"] == tiny_base.sha256
    assert len(tags["dataset_sha256"]) == 64
    assert len(tags["adapter_sha256"]) == 64
    scores = json.loads(tags["pol_scores"])
    assert set(scores) == {"cycle-1/line-0", "cycle-1/line-1"}
    assert all(math.isfinite(s) and s >= 0 for s in scores.values())
    assert max(scores.values()) > 0
    alpha = float(tags["wise_ft_alpha"])
    assert 0 < alpha <= 1
    contributors = json.loads(tags["contributors"])
    assert set(contributors) <= {"line-0", "line-1"} and contributors
    assert sum(float(v) for v in contributors.values()) == pytest.approx(1.0, abs=1e-12)
    assert "challenger" in version.aliases or "champion" in version.aliases


def test_expert_beats_the_base_on_heldout(commission):
    _, _, summary = commission
    assert summary["heldout_loss_expert"] < summary["heldout_loss_base"]
    table = summary["benchmark"]
    assert set(table) >= {"base", "expert", "mixture"}
    heldout_task = next(t for t in table["expert"] if t.startswith("heldout_"))
    assert (
        table["expert"][heldout_task]["word_perplexity"]
        < table["base"][heldout_task]["word_perplexity"]
    )


def test_rerun_trains_nothing_and_registers_once(commission):
    from factory.library import ExpertLibrary
    from flows.commission import run_commission

    spec_path, settings, first = commission
    home = settings.home / "commissions" / first["commission_id"]
    logs = sorted(home.glob("cycles/*.lines/*/checkpoints/train.log"))
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    second = run_commission(spec_path, settings)
    assert second["registered"]["version"] == first["registered"]["version"]
    assert {p: p.stat().st_mtime_ns for p in logs} == stamps
    versions = ExpertLibrary(settings).lineage(first["registered"]["name"])
    assert len(versions) == 1
