"""The catalog read from the real expert library (MLflow registry on SQLite)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from factory.expert import load_expert, save_expert
from factory.ledger import Ledger
from factory.licensing import Licensing
from infra.settings import Settings
from marketplace.app import create_app
from marketplace.catalog import library_catalog
from marketplace.market import Market, MarketplaceConfig
from marketplace.sample import random_expert

BENCHMARK = {
    "table": {
        "base": {"law_qa": {"acc": 0.30}},
        "expert": {"law_qa": {"acc": 0.45}},
    },
    "tasks": ["law_qa"],
}


def provenance(visibility: str) -> dict:
    return {
        "commission_id": f"com-{visibility}",
        "dataset_sha256": "d" * 64,
        "config_hash": "c" * 64,
        "pol_scores": {"line-0": 0.12, "line-1": 0.03},
        "wise_ft_alpha": 0.7,
        "cycles": 3,
        "contributors": {"line-0": "0.8", "line-1": "0.2"},
        "licence": "usage+weight",
        "visibility": visibility,
    }


@pytest.mark.slow  # a real MLflow registry: two registrations and downloads
def test_library_experts_appear_with_provenance(tiny_base, tmp_path):
    from factory.library import ExpertLibrary

    settings = Settings(home=tmp_path / "home")
    library = ExpertLibrary(settings)
    for name, domain, seed, visibility in (
        ("law-lib", "law", 1, "public"),
        ("secret-lib", "tax", 2, "private"),
    ):
        folder = save_expert(tmp_path / name, random_expert(tiny_base, name, domain, seed))
        library.register(folder, provenance(visibility), BENCHMARK)
    catalog = library_catalog(settings)
    assert [e.name for e in catalog.entries()] == ["law-lib"]
    assert catalog.get("secret-lib") is None
    entry = catalog.get("law-lib")
    assert (entry.domain, entry.cycles, entry.champion, entry.versions) == ("law", 3, "1", ["1"])
    assert entry.contributors == {"line-0": "0.8", "line-1": "0.2"}
    assert entry.pol_validated and entry.base_model == tiny_base.name
    assert [(r.task, r.metric, r.expert) for r in entry.benchmarks] == [("law_qa", "acc", 0.45)]
    assert entry.licence == "usage+weight"
    folder = catalog.expert_folder("law-lib", "1")
    assert load_expert(folder).manifest.adapter_sha256 == entry.adapter_sha256

    config = MarketplaceConfig(secret="s" * 32, base_model_path=tiny_base.path, min_domains=1)
    market = Market(config, catalog, Licensing(Ledger(settings.db_url)))
    assert market.readiness().open
    with TestClient(create_app(market)) as client:
        page = client.get("/experts/law-lib").text
        assert "law_qa" in page and "line-0: 0.8" in page
        assert 'id="preview-banner"' not in page
        assert client.get("/experts/secret-lib").status_code == 404
