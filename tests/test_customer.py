"""Expert identity: one customer's commission can never write into another customer's expert.

Before, the registered name was slug(domain)-slug(customer): "Acme, Inc." and "ACME INC" shared
one registered model, and every non-Latin name slugged to "x".
"""

from __future__ import annotations

import pytest

from factory.commission import parse_spec
from factory.commission_store import CommissionStore
from factory.customer import OWNER_TAG, customer_id_for, expert_id_for, normalize_customer


@pytest.mark.parametrize(
    "a,b",
    [("Acme, Inc.", "ACME INC"), ("Акме", "Бета"), ("株式会社アクメ", "株式会社ベータ"),
     ("acme", "Acme"), ("O'Brien & Co", "OBrien Co")],
)  # fmt: skip
def test_distinct_customers_get_distinct_experts(a, b):
    assert customer_id_for(a) != customer_id_for(b)
    assert expert_id_for("legal", a) != expert_id_for("legal", b)


def test_the_id_is_stable_and_readable():
    assert customer_id_for("Acme  Inc") == customer_id_for(" Acme Inc ")  # whitespace only
    composed, decomposed = "Caf\u00e9", "Cafe\u0301"
    assert normalize_customer(decomposed) == composed
    assert customer_id_for(composed) == customer_id_for(decomposed)
    cid = customer_id_for("Acme, Inc.")
    assert cid == "u-" + __import__("hashlib").sha256(b"Acme, Inc.").hexdigest()[:16]
    assert expert_id_for("legal", "Acme, Inc.") == f"legal-acme-inc-{cid[2:14]}"
    assert expert_id_for("legal", "Акме").startswith("legal-x-")
    long = expert_id_for("a" * 63, "b" * 200)
    assert len(long) <= 109 and long.count("-") == 2


def test_the_store_records_each_customer_once(tmp_path):
    store = CommissionStore(f"sqlite:///{tmp_path / 'taas.db'}")
    for seed, customer in enumerate(["Acme, Inc.", "ACME INC", "Acme, Inc."]):
        body = {"version": 1, "customer": customer, "domain": "legal", "seed": seed,
                "data": [{"uri": "/data/a.jsonl"}]}  # fmt: skip
        record = store.submit(parse_spec(body), f"{seed:064x}", "d" * 64)
        assert record.customer_id == customer_id_for(customer)
    assert store.customers() == {
        customer_id_for("Acme, Inc."): "Acme, Inc.",
        customer_id_for("ACME INC"): "ACME INC",
    }


def test_registration_refuses_another_customers_expert(taas_home, tiny_expert_folder):
    from factory.library import ExpertLibrary
    from factory.library.provenance import RegistrationProvenance
    from infra import tracking
    from infra.settings import get_settings

    settings = get_settings()
    library = ExpertLibrary(settings)

    def prov(commission: str, customer: str) -> RegistrationProvenance:
        return RegistrationProvenance(
            commission_id=commission, dataset_sha256="d", config_hash="c",
            customer_id=customer_id_for(customer),
        )  # fmt: skip

    first = library.register(tiny_expert_folder, prov("c-first", "Acme, Inc."))
    assert first.version == "1"
    # The same name, another customer (as a colliding slug once produced): refused, no version.
    with pytest.raises(ValueError, match="belongs to another customer"):
        library.register(tiny_expert_folder, prov("c-second", "ACME INC"))
    t = tracking.configure(settings)
    assert [v.version for v in library.list()] == ["1"]
    owner = tracking.registered_model_tags(t, "expert-legal")[OWNER_TAG]
    assert owner == customer_id_for("Acme, Inc.")
    # The owner's own next commission adds a version.
    assert library.register(tiny_expert_folder, prov("c-third", "Acme, Inc.")).version == "2"
