"""A job's profile: the verified runner timed against the program run eagerly.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, no default: jobs lowered before this revision simply have no profile.
    with op.batch_alter_table("lowerings") as batch:
        batch.add_column(sa.Column("profile", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lowerings") as batch:
        batch.drop_column("profile")
