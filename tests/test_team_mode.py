"""Team mode on real servers, as the README's team settings describe it: `mlflow server` with its
backend store on PostgreSQL and its artifacts on S3 (moto's server), the factory's ledger,
commission store and registration claims on a database of the same PostgreSQL server
(TAAS_DATABASE_URL), migrated by alembic. An expert registered through the server is loaded back
by alias as an MLflow model and answers a prompt."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import TINY_COMMISSION, free_port
from sqlalchemy import create_engine, text
from test_library import BENCHMARK, gate, provenance
from test_mlflow_model import PROMPT, reference_text

from factory.library import CHAMPION, ExpertLibrary
from infra.migrations import head_revision
from infra.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def team_servers(postgres_server, s3_endpoint, tmp_path):
    """(mlflow server URL, factory database URL, S3 endpoint, bucket): an `mlflow server` on a
    PostgreSQL database with proxied S3 artifacts, and another database for the factory."""
    import boto3
    import pg

    from infra.services import start_mlflow_server

    bucket = "taas-team-artifacts"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    mlflow_db = pg.new_database(postgres_server)
    factory_db = pg.new_database(postgres_server)
    assert mlflow_db.startswith("postgresql+psycopg://")  # the driver mlflow's store is given
    handle = start_mlflow_server(
        mlflow_db,
        f"s3://{bucket}/mlflow",
        free_port(),
        env={"MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        log_path=tmp_path / "mlflow-server.log",
    )
    try:
        yield handle.url, mlflow_db, factory_db, s3_endpoint, bucket
    finally:
        handle.stop()


def test_register_through_mlflow_server_on_postgres_and_s3_and_load_by_alias(
    team_servers, tiny_base, tiny_expert_folder, tmp_path, monkeypatch
):
    import boto3
    import mlflow

    from factory.commission import CommissionSpec
    from factory.commission_store import CommissionStore
    from factory.ledger import Ledger

    server_url, mlflow_db, factory_db, s3_endpoint, bucket = team_servers
    # The client needs no S3 settings: the server proxies the artifacts.
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    settings = Settings(
        home=tmp_path / "home", mlflow_tracking_uri=server_url, database_url=factory_db
    )
    library = ExpertLibrary(settings)
    version = library.register(
        tiny_expert_folder, provenance(base_model_path=tiny_base.path), BENCHMARK
    )
    assert (version.name, version.version) == ("expert-legal", "1")
    assert library.promote(version.name, version.version, gate()).promote
    # Registering the same result again through the server is the same version.
    assert library.register(tiny_expert_folder, provenance(), BENCHMARK).version == "1"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    model = mlflow.pyfunc.load_model("models:/expert-legal@champion")
    answer = model.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"max_new_tokens": 8})
    assert answer["text"].tolist() == [reference_text(tiny_base.path, tiny_expert_folder,
                                                      PROMPT, 8)]  # fmt: skip
    assert library.show("expert-legal", CHAMPION).version == "1"

    # The model's files are on S3, the registry rows in PostgreSQL.
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint)
        .list_objects_v2(Bucket=bucket)
        .get("Contents", [])
    ]
    assert any(k.endswith("/artifacts/model/MLmodel") for k in keys)
    assert any(k.endswith("/artifacts/expert/adapter_model.safetensors") for k in keys)
    engine = create_engine(mlflow_db)
    with engine.connect() as connection:
        aliases = connection.execute(
            text("SELECT alias, version FROM registered_model_aliases WHERE name = :n"),
            {"n": "expert-legal"},
        ).all()
    engine.dispose()
    assert aliases == [("champion", 1)]

    # The factory's own stores on the other database: migrated to head, and in use.
    ledger = Ledger(factory_db)
    ledger.register_contributor("line-0", "k" * 44)
    store = CommissionStore(factory_db)
    record = store.submit(CommissionSpec.model_validate(TINY_COMMISSION), "a" * 64, "b" * 64)
    assert store.get(record.commission_id).state == "submitted"
    engine = create_engine(factory_db)
    with engine.connect() as connection:
        revision = connection.execute(text("SELECT version_num FROM taas_alembic_version")).all()
        claims = connection.execute(text("SELECT version FROM library_registration_claims")).all()
        contributors = connection.execute(text("SELECT contributor_id FROM contributors")).all()
    engine.dispose()
    assert revision == [(head_revision(),)]  # every migration ran, not only the first
    assert claims == [("1",)]
    assert contributors == [("line-0",)]
