"""account push: the push flag and what the watcher found (push_status)

Revision ID: 0008_account_push
Revises: 0007_paging_indexes
Create Date: 2026-11-29 20:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_account_push"
down_revision: str | None = "0007_paging_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        # A string default: an expression (sa.false()) makes SQLite's batch rebuild the
        # table, and dropping the old one cascades to the messages. '0' is false to both.
        batch.add_column(sa.Column("push", sa.Boolean(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("push_status", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("push_status")
        batch.drop_column("push")
