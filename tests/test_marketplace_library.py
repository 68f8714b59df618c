"""The catalog read from the real expert library (MLflow registry on SQLite): provenance,
prices from the commission and from ``taas marketplace price``, training and champion dates."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from cli.main import main
from evaluation.benchmark import BenchmarkResult
from factory.customer import customer_id_for
from factory.expert import load_expert, save_expert
from factory.ledger import Ledger
from factory.library.promotion import GateInputs
from factory.library.provenance import RegistrationProvenance
from infra.settings import get_settings
from marketplace.app import create_app
from marketplace.catalog import library_catalog
from marketplace.licensing import Licensing, period_of
from marketplace.market import Market, MarketplaceConfig
from marketplace.sample import random_expert

BENCHMARK = BenchmarkResult(
    table={
        "base": {"law_qa": {"acc": 0.30}},
        "expert": {"law_qa": {"acc": 0.45}},
    },
    tasks=["law_qa"],
)


PASSING_GATE = GateInputs(
    candidate_heldout_loss=1.0,
    reference_heldout_loss=2.0,
    candidate_batches_sha256="b" * 64,
    reference_batches_sha256="b" * 64,
    candidate_benchmarks={},
    reference_benchmarks={},
    other_domain_losses_before={},
    other_domain_losses_after={},
)


def provenance(visibility: str, commission: str = "", **prices: str) -> RegistrationProvenance:
    return RegistrationProvenance(**{
        "commission_id": f"com-{visibility}{commission}",
        "dataset_sha256": "d" * 64,
        "config_hash": "c" * 64,
        "pol_scores": {"line-0": 0.12, "line-1": 0.03},
        "wise_ft_alpha": 0.7,
        "cycles": 3,
        "contributors": {"line-0": "0.8", "line-1": "0.2"},
        "licence": "usage+weight",
        "visibility": visibility,
        **prices,
    })  # fmt: skip


def utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset().total_seconds() == 0, text
    return moment


@pytest.mark.slow  # a real MLflow registry: three registrations, promotions and downloads
def test_library_experts_appear_with_provenance(tiny_base, tmp_path, taas_home, capsys):
    from factory.library import ExpertLibrary

    settings = get_settings()
    library = ExpertLibrary(settings)
    started = datetime.now(UTC).replace(microsecond=0)
    commission_prices = {
        "price_per_1k_tokens": "0.002",
        "weight_fee": "900",
        "maintenance_fee": "150.50",
        "exclusive_premium": "12000",
    }
    # a private (exclusive) commission's expert, registered for the buyer who commissioned it
    tax_buyer = Licensing(Ledger(settings.db_url)).create_buyer("Tax Buyer")
    for name, domain, seed, visibility, owner in (
        ("law-lib", "law", 1, "public", ""),
        ("secret-lib", "tax", 2, "private", customer_id_for(tax_buyer)),
    ):
        folder = save_expert(tmp_path / name, random_expert(tiny_base, name, domain, seed))
        prov = provenance(visibility, **commission_prices).model_copy(update={"customer_id": owner})
        library.register(folder, prov, BENCHMARK)
    catalog = library_catalog(settings)
    assert [(e.name, e.private) for e in catalog.entries()] == [
        ("law-lib", False),
        ("secret-lib", True),
    ]
    entry = catalog.get("law-lib")
    assert (entry.domain, entry.cycles, entry.champion, entry.versions) == ("law", 3, "1", ["1"])
    assert entry.contributors == {"line-0": "0.8", "line-1": "0.2"}
    assert entry.pol_validated and entry.base_model == tiny_base.name
    assert [(r.task, r.metric, r.expert) for r in entry.benchmarks] == [("law_qa", "acc", 0.45)]
    assert entry.licence == "usage+weight"
    folder = catalog.expert_folder("law-lib", "1")
    assert load_expert(folder).manifest.adapter_sha256 == entry.adapter_sha256
    # prices recorded at registration, per token = per 1k / 1000 exactly
    assert entry.price.per_token == Decimal("0.000002")
    assert (entry.price.weight_fee, entry.price.maintenance_fee) == (Decimal(900), Decimal("150.5"))
    assert entry.price.exclusive_premium == Decimal(12000)
    # the training date is recorded at registration; nothing was champion yet
    assert started <= utc(entry.last_trained) <= datetime.now(UTC)
    assert entry.champion_history == []

    # v1 promoted, then a retrained v2 (its own prices) registered and promoted
    assert library.promote("law-lib", "1", PASSING_GATE).promote
    retrained = save_expert(tmp_path / "law-v2", random_expert(tiny_base, "law-lib", "law", 3))
    v2 = library.register(
        retrained, provenance("public", "-2", price_per_1k_tokens="0.003"), BENCHMARK
    )
    assert v2.version == "2" and v2.created_at
    assert library.promote("law-lib", "2", PASSING_GATE).promote
    entry = catalog.get("law-lib")
    assert (entry.champion, entry.versions) == ("2", ["1", "2"])
    assert [version for version, _ in entry.champion_history] == ["1", "2"]
    first, second = (utc(date) for _, date in entry.champion_history)
    assert started <= first <= second <= datetime.now(UTC)
    # v2 was trained (registered) after v1's promotion and before its own
    assert first <= utc(entry.last_trained) == utc(v2.tags["trained_at"]) <= second
    assert entry.price.per_token == Decimal("0.000003")
    assert entry.price.weight_fee == Decimal(500)  # v2's commission set no weight fee: default

    # the operator reprices without retraining: registered-model tags override the version's
    assert main(["marketplace", "price", "law-lib", "--per-1k-tokens", "0.0025",
                 "--weight-fee", "1e3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert '"price_per_1k_tokens": "0.0025"' in printed and '"weight_fee": "1000"' in printed
    entry = catalog.get("law-lib")
    assert entry.price.per_token == Decimal("0.0000025")
    assert entry.price.weight_fee == Decimal(1000)
    assert entry.price.maintenance_fee == Decimal(100)  # neither v2 nor the operator set it
    assert main(["marketplace", "price", "law-lib", "--maintenance-fee=-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "taas: error: --maintenance-fee: '-1' must be a finite amount >= 0"
    ]
    assert main(["marketplace", "price", "nope-lib", "--weight-fee", "1"]) == 2
    assert "no expert 'nope-lib'" in capsys.readouterr().err
    assert catalog.get("law-lib").price.maintenance_fee == Decimal(100)
    # a price tag nobody could have meant hides the expert rather than selling at a default
    library._t.set_model_tag(library.tracking, "law-lib", "weight_fee", "lots")
    assert catalog.get("law-lib") is None
    library.set_price("law-lib", weight_fee="1000")

    config = MarketplaceConfig(secret="s" * 32, base_model_path=tiny_base.path, min_domains=1)
    market = Market(config, catalog, Licensing(Ledger(settings.db_url)))
    assert market.readiness().open
    with TestClient(create_app(market)) as client:
        page = client.get("/experts/law-lib").text
        assert "law_qa" in page and "line-0: 0.8" in page
        # the base's licence and origin, which a licensee of the expert also takes on
        assert f'<td id="base-licence">{tiny_base.licence}</td>' in page
        assert f'<td id="base-origin">{escape(tiny_base.origin)}</td>' in page
        assert 'id="preview-banner"' not in page
        assert "0.0000025 per token" in page and "1000 once + 100.00 a year" in page
        assert f'<td id="last-trained">{entry.last_trained}</td>' in page
        for version, date in entry.champion_history:
            assert f"version {version} champion since {date}" in page
        assert (
            f'<span class="last-trained">{entry.last_trained[:10]}</span>' in client.get("/").text
        )
        assert client.get("/experts/secret-lib").status_code == 404
    buyer = market.licensing.create_buyer("Acme")
    # The private expert: nobody else sees, claims or licenses it; its owner's first look
    # (here the API's lookup, before any account page) claims its exclusive licence, no fee.
    assert market.claim_commissioned(buyer, "secret-lib") is False
    assert market.claim_commissioned(buyer, "law-lib") is False  # public: nothing to claim
    assert market.visible("secret-lib", buyer) is None
    assert [e.name for e in market.visible_entries(buyer)] == ["law-lib"]
    assert market.licensing.exclusive_owner("secret-lib") is None
    assert market.visible("secret-lib", tax_buyer).private
    assert market.licensing.exclusive_owner("secret-lib") == tax_buyer
    assert market.claim_commissioned(tax_buyer, "secret-lib") is True  # a repeat: no new licence
    assert [(lic.expert_name, lic.kind) for lic in market.licensing.licences_of(tax_buyer)] == [
        ("secret-lib", "exclusive")
    ]
    assert market.visible("secret-lib", tax_buyer).private
    assert [e.name for e in market.visible_entries(tax_buyer)] == ["law-lib", "secret-lib"]
    assert [e.name for e in market.visible_entries(buyer)] == ["law-lib"]
    assert market.visible("secret-lib", None) is None and market.readiness().open
    with pytest.raises(ValueError, match="licensed exclusively"):
        market.licensing.grant(buyer, "secret-lib", "1", "usage")
    market.grant(buyer, catalog.get("law-lib"), "weight")
    lines = market.licensing.invoice(buyer, period_of(datetime.now(UTC))).lines
    assert [(line.expert_version, line.item, line.amount) for line in lines] == [
        ("2", "weight_fee", Decimal("1000.00")),
        ("2", "maintenance", Decimal("100.00")),
    ]
    # a rollback makes v1 champion again from now on
    library.rollback("law-lib")
    entry = catalog.get("law-lib")
    dates = dict(entry.champion_history)
    assert entry.champion == "1" and set(dates) == {"1", "2"}
    assert second <= utc(dates["1"]) <= datetime.now(UTC)
