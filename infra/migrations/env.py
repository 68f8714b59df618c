"""Alembic environment for the factory's own tables (ledger, commissions, customers,
registration claims, licensing); run through :func:`infra.migrations.upgrade_head`.

The migration scripts are plain ``op`` calls, so upgrading needs no model imports; comparing
the models with the database (autogenerate, the migration test) passes them in as
``config.attributes["target_metadata"]``. The version table is ``taas_alembic_version``, so the
factory's database may be the one MLflow's own alembic history lives in.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from infra.migrations import VERSION_TABLE

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=config.attributes.get("target_metadata"),
        version_table=VERSION_TABLE,
        # SQLite alters tables by copying them (batch mode); PostgreSQL alters in place.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()
