"""Compiled-code reuse: a job's code key and the job whose compiled files it took.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, no default: jobs lowered before this revision neither reuse nor donate.
    with op.batch_alter_table("lowerings") as batch:
        batch.add_column(sa.Column("code_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("code_reused_from", sa.String(length=32), nullable=True))
        batch.create_index("ix_lowerings_code_key", ["code_key", "status"])


def downgrade() -> None:
    with op.batch_alter_table("lowerings") as batch:
        batch.drop_index("ix_lowerings_code_key")
        batch.drop_column("code_reused_from")
        batch.drop_column("code_key")
