"""The expert library on both stores (embedded SQLite, and mlflow server with S3 artifacts):
registration with provenance, exactly-once, the promotion gate, rollback, export, download."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from conftest import build_tiny_expert

from evaluation.benchmark import BenchmarkResult
from factory.expert import load_expert
from factory.library import CHALLENGER, CHAMPION, ExpertLibrary
from factory.library.promotion import GATE_REASONS, GateInputs, promotion_gate
from factory.library.provenance import RegistrationProvenance
from infra.settings import Settings

BENCHMARK = BenchmarkResult(
    table={
        "base": {"taas_general_cloze": {"acc": 0.5}, "legal_ppl": {"word_perplexity": 80.0}},
        "expert": {"taas_general_cloze": {"acc": 0.55}, "legal_ppl": {"word_perplexity": 40.0}},
    },
    tasks=["taas_general_cloze", "legal_ppl"],
)


def provenance(commission: str = "com-1", **extra) -> RegistrationProvenance:
    return RegistrationProvenance(**{
        "commission_id": commission,
        "dataset_sha256": "d" * 64,
        "config_hash": "c" * 64,
        "pol_scores": {"line-0": 0.12, "line-1": 0.03},
        "wise_ft_alpha": 0.7,
        "cycles": 2,
        "contributors": {"line-0": "0.8", "line-1": "0.2"},
        "licence": "apache-2.0",
        "visibility": "public",
        **extra,
    })  # fmt: skip


def gate(**overrides) -> GateInputs:
    values = {
        "candidate_heldout_loss": 2.0,
        "reference_heldout_loss": 2.5,
        "candidate_batches_sha256": "b" * 64,
        "reference_batches_sha256": "b" * 64,
        "candidate_benchmarks": {"cloze/acc": 0.55, "general/word_perplexity": 100.0},
        "reference_benchmarks": {"cloze/acc": 0.55, "general/word_perplexity": 100.0},
        "other_domain_losses_before": {"medical": 3.0},
        "other_domain_losses_after": {"medical": 3.03},
        "benchmark_tolerance": 0.02,
        "domain_tolerance": 0.02,
    }
    return GateInputs(**{**values, **overrides})


# ---- the pure gate ----------------------------------------------------------------------------


def test_gate_accepts_gain_within_tolerances():
    decision = promotion_gate(gate())
    assert decision.promote and decision.reasons == []
    assert decision.pol_gain == pytest.approx(0.5)
    assert decision.domain_regressions["medical"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"reference_batches_sha256": "x" * 64}, "heldout_batches_differ"),
        ({"candidate_heldout_loss": 2.5}, "no_pol_gain"),  # equal loss: gain 0 is not > 0
        ({"candidate_benchmarks": {"cloze/acc": 0.55}}, "benchmark_missing"),
        # acc 0.55 -> 0.53 is a 3.6% relative drop, beyond 2%.
        (
            {"candidate_benchmarks": {"cloze/acc": 0.53, "general/word_perplexity": 100.0}},
            "benchmark_regression",
        ),
        # Perplexity is lower-is-better: 100 -> 103 is a 3% regression.
        (
            {"candidate_benchmarks": {"cloze/acc": 0.55, "general/word_perplexity": 103.0}},
            "benchmark_regression",
        ),
        ({"other_domain_losses_after": {"medical": 3.1}}, "domain_regression"),
        ({"other_domain_losses_after": {}}, "domain_regression"),
    ],
)
def test_gate_rejects_each_reason(overrides, reason):
    decision = promotion_gate(gate(**overrides))
    assert not decision.promote
    assert decision.reasons == [reason]
    assert reason in GATE_REASONS


def test_gate_tolerance_boundaries_and_bad_numbers():
    # Perplexity falling is an improvement, never a regression.
    better = {"cloze/acc": 0.56, "general/word_perplexity": 90.0}
    decision = promotion_gate(gate(candidate_benchmarks=better))
    assert decision.promote
    assert decision.benchmark_regressions["general/word_perplexity"] == pytest.approx(-0.1)
    # A 1% accuracy drop is inside a 2% tolerance.
    assert promotion_gate(
        gate(candidate_benchmarks={"cloze/acc": 0.5445, "general/word_perplexity": 100.0})
    ).promote
    with pytest.raises(ValueError, match="finite"):
        promotion_gate(gate(candidate_heldout_loss=math.nan))
    with pytest.raises(ValueError, match="extra"):
        GateInputs(**{**gate().model_dump(), "unknown": 1})


# ---- the library on both stores ---------------------------------------------------------------


@pytest.fixture(params=["embedded", "server"])
def library(request, tmp_path):
    if request.param == "embedded":
        settings = Settings(home=tmp_path / "home")
    else:
        url = request.getfixturevalue("mlflow_server")
        settings = Settings(
            home=tmp_path / "home", mlflow_tracking_uri=url, mlflow_experiment=tmp_path.name
        )
    return ExpertLibrary(settings)


@pytest.fixture(scope="module")
def second_expert(tiny_base, tmp_path_factory):
    """Another result for the same expert: trained from a different seed."""
    folder = tmp_path_factory.mktemp("experts2") / "expert-legal"
    return build_tiny_expert(tiny_base, folder, seed=1)


def test_register_promote_rollback_export(
    library, tiny_base, tiny_expert_folder, second_expert, tmp_path
):
    plot = tmp_path / "loss.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    v1 = library.register(tiny_expert_folder, provenance(), BENCHMARK, [plot])
    manifest = load_expert(tiny_expert_folder).manifest
    assert (v1.name, v1.version, v1.aliases) == ("expert-legal", "1", [CHALLENGER])
    assert v1.tags["adapter_sha256"] == manifest.adapter_sha256
    assert v1.tags["base_model_sha256"] == tiny_base.sha256
    assert json.loads(v1.tags["contributors"]) == {"line-0": "0.8", "line-1": "0.2"}
    assert json.loads(v1.tags["pol_scores"])["line-0"] == pytest.approx(0.12)
    assert v1.tags["wise_ft_alpha"] == "0.7" and v1.tags["cycles"] == "2"
    assert len(v1.tags["code_version"]) >= 5
    assert v1.scores["legal_ppl"]["word_perplexity"] == 40.0
    # Same commission + adapter: the same version, not a new one.
    assert library.register(tiny_expert_folder, provenance(), BENCHMARK).version == "1"

    assert library.promote("expert-legal", "1", gate()).promote
    assert library.show("expert-legal").version == "1"
    assert library.show("expert-legal").aliases == [CHAMPION]

    v2 = library.register(
        second_expert,
        provenance("com-2", parent_adapter_sha256=manifest.adapter_sha256, cycles=3),
        None,
    )
    assert (v2.version, v2.aliases) == ("2", [CHALLENGER])
    refused = library.promote("expert-legal", "2", gate(candidate_heldout_loss=2.6))
    assert refused.reasons == ["no_pol_gain"] and refused.previous_champion == "1"
    assert library.show("expert-legal", CHAMPION).version == "1"
    accepted = library.promote("expert-legal", "2", gate())
    assert accepted.promote and accepted.previous_champion == "1"
    assert library.show("expert-legal").version == "2"
    assert json.loads(library.show("expert-legal", "2").tags["gate_decision"])["promote"]

    restored = library.rollback("expert-legal")
    assert restored.version == "1" and CHAMPION in restored.aliases
    with pytest.raises(ValueError, match="no previous champion"):
        library.rollback("expert-legal")
    lineage = library.lineage("expert-legal")
    assert [row["version"] for row in lineage] == ["1", "2"]
    assert lineage[1]["parent_adapter_sha256"] == manifest.adapter_sha256
    assert lineage[1]["cycles"] == "3" and lineage[1]["rolled_back"]
    compared = library.compare("expert-legal@1", "expert-legal@2")
    assert compared["provenance"]["commission_id"] == ("com-1", "com-2")
    assert compared["benchmarks"]["legal_ppl/word_perplexity"] == (40.0, None)
    assert [v.name for v in library.list(domain="legal")] == ["expert-legal"]
    assert library.list(domain="medical") == []

    bundle = library.export("expert-legal", CHAMPION, tmp_path / "bundle")
    names = {p.name for p in bundle.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "router.safetensors"} <= names
    assert {"expert.json", "README.md", "INTEGRATION.md", "COMMITTED.json"} <= names
    assert load_expert(bundle).manifest.adapter_sha256 == manifest.adapter_sha256
    card = (bundle / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == tiny_base.name and front["license"] == "apache-2.0"
    metrics = front["model-index"][0]["results"]
    assert {r["task"]["name"] for r in metrics} == {"taas_general_cloze", "legal_ppl"}
    assert "PeftModel.from_pretrained" in (bundle / "INTEGRATION.md").read_text()

    folder = library.resolve_expert_folder("expert-legal@2")
    assert load_expert(folder).manifest.adapter_sha256 == v2.tags["adapter_sha256"]
    assert library.resolve_expert_folder("expert-legal@2") == folder  # cached
    with pytest.raises(ValueError, match="alias"):
        library.show("expert-legal", "nonexistent")


def test_exported_bundle_loads_with_peft(tiny_base, tiny_expert_folder, tmp_path):
    import torch
    from peft import PeftModel

    from factory.base_model import load_base

    library = ExpertLibrary(Settings(home=tmp_path / "home"))
    library.register(tiny_expert_folder, provenance(), BENCHMARK)
    bundle = library.export("expert-legal", None, tmp_path / "bundle")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base, _ = load_base(tiny_base.path)
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(bundle))
        after = model(ids).logits
        reference = PeftModel.from_pretrained(
            load_base(tiny_base.path)[0], str(tiny_expert_folder)
        )(ids).logits
    assert torch.equal(after, reference)
    assert (after - before).abs().max().item() > 1e-4


def test_eight_concurrent_registrations_make_one_version(tiny_expert_folder, tmp_path):
    settings = Settings(home=tmp_path / "home")
    ExpertLibrary(settings)  # creates the stores once, as a deployed factory has them
    barrier = threading.Barrier(8)

    def register_once(_: int) -> str:
        library = ExpertLibrary(settings)
        barrier.wait()
        return library.register(tiny_expert_folder, provenance(), BENCHMARK).version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(register_once, range(8)))
    assert versions == ["1"] * 8
    library = ExpertLibrary(settings)
    assert [row["version"] for row in library.lineage("expert-legal")] == ["1"]


def test_concurrent_downloads_over_one_folder_each_get_it_whole(tiny_expert_folder, tmp_path):
    """Six threads re-download the same version over the same folder while readers load it:
    every download returns a folder that verifies, and no reader ever finds it missing or torn
    (the folder is replaced by renames, never removed in place)."""
    settings = Settings(home=tmp_path / "home")
    library = ExpertLibrary(settings)
    library.register(tiny_expert_folder, provenance(), BENCHMARK)
    dest = library.download("expert-legal", "1", tmp_path / "shared")
    want = load_expert(tiny_expert_folder).manifest.adapter_sha256
    barrier = threading.Barrier(6)
    done = threading.Event()

    def download_again(_: int) -> str:
        barrier.wait()
        got = ExpertLibrary(settings).download("expert-legal", "1", dest, overwrite=True)
        return load_expert(got).manifest.adapter_sha256

    reads: list[str] = []

    def read_while_replaced() -> None:
        while not done.is_set():
            reads.append(load_expert(dest).manifest.adapter_sha256)

    reader = threading.Thread(target=read_while_replaced)
    reader.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(download_again, range(6)))
    finally:
        done.set()
        reader.join()
    assert got == [want] * 6
    assert reads and set(reads) == {want}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared")] == []  # no scratch


def test_register_rejects_bad_input(tiny_expert_folder, tmp_path):
    library = ExpertLibrary(Settings(home=tmp_path / "home"))
    with pytest.raises(ValueError, match="commission_id"):
        RegistrationProvenance.model_validate({"dataset_sha256": "d", "config_hash": "c"})
    with pytest.raises(TypeError, match="provenance: pass a"):
        library.register(tiny_expert_folder, {"commission_id": "c", "dataset_sha256": "d"})
    with pytest.raises(TypeError, match="benchmark: pass an"):
        library.register(tiny_expert_folder, provenance(), {"table": {}})
    with pytest.raises(ValueError, match="plots"):
        library.register(tiny_expert_folder, provenance(), None, [tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="not a committed expert folder"):
        library.register(tmp_path, provenance())
    with pytest.raises(ValueError, match="no expert"):
        library.show("expert-unknown")
