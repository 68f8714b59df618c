"""The factory database's schema comes from alembic migrations (infra/migrations): an empty
SQLite or PostgreSQL database upgraded to head matches the models exactly (alembic's
compare_metadata finds no difference), the stores open through the migrations, concurrent opens
migrate once, and a database made by create_all before migrations is adopted."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from infra.migrations import VERSION_TABLE, current_revision, head_revision, upgrade_head
from infra.migrations.__main__ import factory_metadata

TABLES = {
    "api_keys", "buyer_sessions", "buyers", "charges", "commissions", "contributors",
    "customers", "demand_words", "downloads", "expert_grant_locks",
    "library_registration_claims", "licences", "reward_shares", "usage_records",
}  # fmt: skip


def differences(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        return compare_metadata(context, factory_metadata())


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'taas.db'}"
    return request.getfixturevalue("postgres_url")


def test_empty_database_upgraded_to_head_matches_the_models(empty_url):
    engine = create_engine(empty_url)
    assert current_revision(engine) is None and inspect(engine).get_table_names() == []
    upgrade_head(engine)
    assert current_revision(engine) == head_revision() == "0002"
    assert set(inspect(engine).get_table_names()) == TABLES | {VERSION_TABLE}
    assert differences(engine) == []
    # The partial unique indexes (one active exclusive licence per expert) are migrated too.
    indexes = {i["name"]: i for i in inspect(engine).get_indexes("licences")}
    assert indexes["uq_licence_exclusive"]["unique"]
    upgrade_head(engine)  # at head: nothing to do
    assert current_revision(engine) == "0002"
    engine.dispose()


def test_a_missing_model_change_is_a_difference(tmp_path):
    """The comparison can fail: a column the models have and the database lacks is reported."""
    engine = create_engine(f"sqlite:///{tmp_path / 'taas.db'}")
    upgrade_head(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE customers DROP COLUMN created_at")
    found = differences(engine)
    assert [(d[0], d[3].name) for d in found] == [("add_column", "created_at")]
    engine.dispose()


def test_stores_open_through_the_migrations_once_under_concurrency(postgres_url):
    from factory.commission_store import CommissionStore
    from factory.ledger import Ledger
    from factory.library.claims import ClaimTable

    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def open_store(kind: int) -> None:
        try:
            barrier.wait()
            (Ledger, CommissionStore, lambda u: ClaimTable(u, stale_s=60))[kind % 3](postgres_url)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_store, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    engine = create_engine(postgres_url)
    assert current_revision(engine) == "0002" and differences(engine) == []
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").all()
    assert rows == [("0002",)]
    engine.dispose()


def test_a_create_all_database_is_adopted(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'taas.db'}")
    for metadata in factory_metadata():
        metadata.create_all(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO customers (customer_id, name, created_at) VALUES ('c1', 'Acme', "
            "'2026-01-01 00:00:00')"
        )
    upgrade_head(engine)
    assert current_revision(engine) == "0002" and differences(engine) == []
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT name FROM customers").all() == [("Acme",)]
    engine.dispose()
