"""Schema migrations of the factory's own database (``Settings.db_url``) with alembic.

Every store that owns tables there (:class:`factory.ledger.Ledger`,
:class:`factory.commission_store.CommissionStore`, :class:`factory.library.claims.ClaimTable`;
the licensing tables are on the ledger's metadata) calls :func:`upgrade_head` when it opens,
instead of ``create_all``: an empty database is brought to the newest revision, an up-to-date one
costs one query. Upgrades are serialized across processes: a PostgreSQL advisory lock, a file
lock beside a SQLite file. A schema change is a new script in ``versions/``::

    python -m infra.migrations revision "add licences.currency"   # autogenerate from the models

The first revision creates only the tables and indexes a database lacks, so a database made by
``create_all`` before migrations existed is adopted as it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from infra.atomic import file_lock

VERSION_TABLE = "taas_alembic_version"
_FOLDER = Path(__file__).resolve().parent
_LOCK_KEY = 0x7AA5_0001  # the advisory lock's key: any fixed 64-bit number, ours alone


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_FOLDER))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


_HEAD: list[str] = []


def head_revision() -> str:
    if not _HEAD:
        _HEAD.append(ScriptDirectory.from_config(alembic_config()).get_current_head())
    return _HEAD[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


@contextmanager
def _upgrade_lock(engine: Engine):
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            connection.commit()
            try:
                yield connection
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                connection.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.connect() as connection:
            yield connection
        return
    with file_lock(Path(f"{database}.migrate.lock")), engine.connect() as connection:
        yield connection


def upgrade_head(engine: Engine) -> None:
    """Brings the database at ``engine`` to the newest revision (a no-op when it is there)."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    with _upgrade_lock(engine) as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()
