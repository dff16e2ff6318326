"""Leases: the worker host running a job and until when its claim holds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: jobs from before have no lease; one left running is recovered at start.
    with op.batch_alter_table("lowerings") as batch:
        batch.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.create_index("ix_lowerings_status_lease", ["status", "lease_expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("lowerings") as batch:
        batch.drop_index("ix_lowerings_status_lease")
        batch.drop_column("lease_expires_at")
        batch.drop_column("worker")
