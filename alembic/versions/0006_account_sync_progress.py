"""account sync_progress: done and total per folder of the latest sync

Revision ID: 0006_account_sync_progress
Revises: 0005_folder_cursor_uidnext
Create Date: 2026-11-29 17:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_account_sync_progress"
down_revision: str | None = "0005_folder_cursor_uidnext"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("sync_progress", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("sync_progress")
