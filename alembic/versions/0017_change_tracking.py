"""change tracking: flags, deletions and moves on the server (backend/mailbox/changes.py)

Revision ID: 0017_change_tracking
Revises: 0016_audits_freshness
Create Date: 2026-12-07 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0017_change_tracking"
down_revision: str | None = "0016_audits_freshness"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        # A string default, as in 0008: '1' is true to both PostgreSQL and SQLite.
        batch.add_column(
            sa.Column("track_changes", sa.Boolean(), nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("change_state", sa.JSON(), nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("email_id", sa.String(255), nullable=True))
        batch.add_column(
            sa.Column("deleted_at", backend.models.base.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("email_id")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("change_state")
        batch.drop_column("track_changes")
