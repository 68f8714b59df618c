"""Alembic revision scripts of the factory database, applied in order by infra.migrations."""
