"""Keys and tenants: api_keys, tenants (quota overrides), and a tenant on every job,
upload and webhook.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

TENANT_TABLES = ("lowerings", "uploads", "webhooks")


def _tenant() -> sa.Column[str]:
    # Rows from before keys belong to tenant 'default' (the tenant of LOWERING_AUTH=off).
    return sa.Column("tenant", sa.String(length=64), nullable=False,
                     server_default=sa.text("'default'"))


def upgrade() -> None:
    for table in TENANT_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(_tenant())
    op.create_index("ix_lowerings_tenant_seq", "lowerings", ["tenant", "seq"])
    op.create_index("ix_lowerings_tenant_status", "lowerings", ["tenant", "status"])
    op.create_index("ix_uploads_tenant_sha256", "uploads", ["tenant", "sha256"])
    op.create_index("ix_webhooks_tenant_seq", "webhooks", ["tenant", "seq"])
    op.create_table(
        "api_keys",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("key_hmac", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ux_api_keys_id", "api_keys", ["id"], unique=True)
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "tenants",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ux_tenants_name", "tenants", ["name"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_tenants_name", table_name="tenants")
    op.drop_table("tenants")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_index("ux_api_keys_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_index("ix_webhooks_tenant_seq", table_name="webhooks")
    op.drop_index("ix_uploads_tenant_sha256", table_name="uploads")
    op.drop_index("ix_lowerings_tenant_status", table_name="lowerings")
    op.drop_index("ix_lowerings_tenant_seq", table_name="lowerings")
    for table in TENANT_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
