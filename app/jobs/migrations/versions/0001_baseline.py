"""Baseline: the job table exactly as release 0.1 made it with ``metadata.create_all``.

A database that release made (tables, no alembic_version) is stamped at this revision
by app.jobs.migrate rather than created again. Never edit this file: a schema change is
a new revision.

Revision ID: 0001
Revises: None
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "lowerings",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=True),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("backend_id", sa.String(length=128), nullable=False),
        sa.Column("device", sa.String(length=16), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("verify", sa.Boolean(), nullable=False),
        sa.Column("rtol", sa.Float(), nullable=False),
        sa.Column("atol", sa.Float(), nullable=False),
        sa.Column("input_sha256", sa.String(length=64), nullable=False),
        sa.Column("input_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=True),
        sa.Column("artifact_size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("verification", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("toolchain", sa.JSON(), nullable=True),
        sa.Column("worker_pid", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("resources", sa.JSON(), nullable=True),
        sa.Column("cache_key", sa.String(length=64), nullable=True),
        sa.Column("cache_hit", sa.Boolean(), nullable=False),
        sa.Column("parent_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        # Unnamed, as create_all left it (PostgreSQL calls it lowerings_id_key).
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_lowerings_status_seq", "lowerings", ["status", "seq"])
    op.create_index("ix_lowerings_model_seq", "lowerings", ["model_name", "seq"])
    op.create_index("ix_lowerings_cache_key", "lowerings", ["cache_key", "status"])
    op.create_index("ix_lowerings_parent", "lowerings", ["parent_id"])


def downgrade() -> None:
    op.drop_table("lowerings")
