"""Resumable uploads: programs sent in parts, gated once, reused by id or sha256.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("part_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("structure_sha256", sa.String(length=64), nullable=True),
        sa.Column("multipart_id", sa.String(length=1024), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ux_uploads_id", "uploads", ["id"], unique=True)
    op.create_index("ix_uploads_sha256", "uploads", ["sha256", "status"])
    op.create_index("ix_uploads_status_expires", "uploads", ["status", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_uploads_status_expires", table_name="uploads")
    op.drop_index("ix_uploads_sha256", table_name="uploads")
    op.drop_index("ux_uploads_id", table_name="uploads")
    op.drop_table("uploads")
