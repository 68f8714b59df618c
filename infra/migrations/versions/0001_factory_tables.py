"""The factory's tables: ledger (contributors, reward shares), commissions, customers, the
registration claims and the licensing tables.

The baseline: it creates only the tables and indexes a database lacks, so a database made by
``create_all`` before migrations existed is adopted without a change.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _create_table(name: str, *elements) -> None:
    if not sa.inspect(op.get_bind()).has_table(name):
        op.create_table(name, *elements)


def _create_index(table: str, name: str, columns: list[str], **options) -> None:
    existing = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(table)}
    if name not in existing:
        op.create_index(name, table, columns, **options)


def upgrade() -> None:
    _create_table(
        "buyers",
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("buyer_id"),
    )
    _create_table(
        "contributors",
        sa.Column("contributor_id", sa.String(length=128), nullable=False),
        sa.Column("public_key_b64", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("contributor_id"),
    )
    _create_table(
        "downloads",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("expert_name", sa.String(length=128), nullable=False),
        sa.Column("expert_version", sa.String(length=32), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("client", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    _create_index("downloads", "ix_downloads_buyer_id", ["buyer_id"], unique=False)
    _create_table(
        "expert_grant_locks",
        sa.Column("expert_name", sa.String(length=128), nullable=False),
        sa.Column("grants", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("expert_name"),
    )
    _create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["buyer_id"],
            ["buyers.buyer_id"],
        ),
        sa.PrimaryKeyConstraint("key_id"),
    )
    _create_index("api_keys", "ix_api_keys_buyer_id", ["buyer_id"], unique=False)
    _create_table(
        "buyer_sessions",
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["buyer_id"],
            ["buyers.buyer_id"],
        ),
        sa.PrimaryKeyConstraint("buyer_id"),
    )
    _create_table(
        "licences",
        sa.Column("licence_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("expert_name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("price_per_token", sa.String(length=64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["buyer_id"],
            ["buyers.buyer_id"],
        ),
        sa.PrimaryKeyConstraint("licence_id"),
    )
    _create_index("licences", "ix_licences_buyer_id", ["buyer_id"], unique=False)
    _create_index("licences", "ix_licences_expert_name", ["expert_name"], unique=False)
    _create_index(
        "licences",
        "uq_licence_active",
        ["buyer_id", "expert_name", "kind"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    _create_index(
        "licences",
        "uq_licence_exclusive",
        ["expert_name"],
        unique=True,
        sqlite_where=sa.text("kind = 'exclusive' AND revoked_at IS NULL"),
        postgresql_where=sa.text("kind = 'exclusive' AND revoked_at IS NULL"),
    )
    _create_table(
        "reward_shares",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("expert_id", sa.String(length=128), nullable=False),
        sa.Column("cycle_key", sa.String(length=128), nullable=False),
        sa.Column("expert_version", sa.String(length=128), nullable=False),
        sa.Column("contributor_id", sa.String(length=128), nullable=False),
        sa.Column("share", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["contributor_id"],
            ["contributors.contributor_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("expert_id", "cycle_key", "contributor_id"),
    )
    _create_index("reward_shares", "ix_reward_shares_expert_id", ["expert_id"], unique=False)
    _create_table(
        "charges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("licence_id", sa.Integer(), nullable=False),
        sa.Column("expert_name", sa.String(length=128), nullable=False),
        sa.Column("expert_version", sa.String(length=32), nullable=False),
        sa.Column("item", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["licence_id"],
            ["licences.licence_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    _create_index("charges", "ix_charges_buyer_id", ["buyer_id"], unique=False)
    _create_index("charges", "ix_charges_period", ["period"], unique=False)
    _create_table(
        "usage_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("buyer_id", sa.String(length=64), nullable=False),
        sa.Column("expert_name", sa.String(length=128), nullable=False),
        sa.Column("expert_version", sa.String(length=32), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("price_per_token", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.key_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    _create_index("usage_records", "ix_usage_records_buyer_id", ["buyer_id"], unique=False)
    _create_index("usage_records", "ix_usage_records_key_id", ["key_id"], unique=False)
    _create_index("usage_records", "ix_usage_records_period", ["period"], unique=False)
    _create_table(
        "commissions",
        sa.Column("commission_id", sa.String(length=32), nullable=False),
        sa.Column("spec_sha256", sa.String(length=64), nullable=False),
        sa.Column("dataset_sha256", sa.String(length=64), nullable=False),
        sa.Column("customer", sa.String(length=200), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(), nullable=False),
        sa.Column("validated_at", sa.DateTime(), nullable=True),
        sa.Column("running_at", sa.DateTime(), nullable=True),
        sa.Column("registered_at", sa.DateTime(), nullable=True),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("commission_id"),
    )
    _create_index("commissions", "ix_commissions_domain", ["domain"], unique=False)
    _create_index("commissions", "ix_commissions_spec_sha256", ["spec_sha256"], unique=False)
    _create_index("commissions", "ix_commissions_state", ["state"], unique=False)
    _create_table(
        "customers",
        sa.Column("customer_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id"),
    )
    _create_table(
        "library_registration_claims",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("claimed_at", sa.Double(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("library_registration_claims")
    op.drop_table("customers")
    op.drop_table("commissions")
    op.drop_table("usage_records")
    op.drop_table("charges")
    op.drop_table("reward_shares")
    op.drop_table("licences")
    op.drop_table("buyer_sessions")
    op.drop_table("api_keys")
    op.drop_table("expert_grant_locks")
    op.drop_table("downloads")
    op.drop_table("contributors")
    op.drop_table("buyers")
