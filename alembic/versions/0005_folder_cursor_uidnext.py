"""folder_cursors.uidnext: the UIDNEXT seen by the last complete poll of a folder

Revision ID: 0005_folder_cursor_uidnext
Revises: 0004_poll_runs_finished_at
Create Date: 2026-11-29 18:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_folder_cursor_uidnext"
down_revision: str | None = "0004_poll_runs_finished_at"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("folder_cursors", sa.Column("uidnext", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("folder_cursors") as batch:
        batch.drop_column("uidnext")
