"""The demand board's table: domain words buyers asked for that no expert covered.

Created only where it is missing, so a database whose demand board made the table itself
(``DemandWord.__table__.create``) before this revision is adopted without a change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("demand_words"):
        op.create_table(
            "demand_words",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("word", sa.String(length=24), nullable=False),
            sa.Column("source", sa.String(length=16), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    existing = {i["name"] for i in sa.inspect(bind).get_indexes("demand_words")}
    if "ix_demand_words_word" not in existing:
        op.create_index("ix_demand_words_word", "demand_words", ["word"])


def downgrade() -> None:
    op.drop_index("ix_demand_words_word", table_name="demand_words")
    op.drop_table("demand_words")
