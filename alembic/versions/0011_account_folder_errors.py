"""account folder_errors: the folders whose last try failed, each with its own retry

Revision ID: 0011_account_folder_errors
Revises: 0010_message_bodies_lz4
Create Date: 2026-12-07 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_account_folder_errors"
down_revision: str | None = "0010_message_bodies_lz4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("folder_errors", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("folder_errors")
