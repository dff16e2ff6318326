"""Retention: when a job's archive was last used, and when its archive, input and log
were removed (app.jobs.retention); the list's (tenant, created_at, id) index; when an
upload's assembly began.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

STAMPS = ("last_used_at", "artifact_expired_at", "input_removed_at", "log_removed_at")


def upgrade() -> None:
    # All nullable: a job from before was last used when it finished, and has lost nothing.
    with op.batch_alter_table("lowerings") as batch:
        for name in STAMPS:
            batch.add_column(sa.Column(name, sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("artifact_expired_reason", sa.String(length=16),
                                   nullable=True))
        batch.create_index("ix_lowerings_artifact", ["artifact_sha256", "artifact_expired_at"])
        batch.create_index("ix_lowerings_input_sweep", ["input_removed_at", "finished_at"])
        batch.create_index("ix_lowerings_log_sweep", ["log_removed_at", "finished_at"])
        # The list pages by (created_at, id), not seq, whose gaps show other tenants' jobs.
        batch.create_index("ix_lowerings_tenant_created", ["tenant", "created_at", "id"])
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("assembling_since", sa.DateTime(timezone=True),
                                   nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("assembling_since")
    with op.batch_alter_table("lowerings") as batch:
        batch.drop_index("ix_lowerings_tenant_created")
        batch.drop_index("ix_lowerings_log_sweep")
        batch.drop_index("ix_lowerings_input_sweep")
        batch.drop_index("ix_lowerings_artifact")
        batch.drop_column("artifact_expired_reason")
        for name in reversed(STAMPS):
            batch.drop_column(name)
