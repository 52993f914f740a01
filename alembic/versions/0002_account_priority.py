"""account priority (0-9, higher is more urgent)

Revision ID: 0002_account_priority
Revises: 0001
Create Date: 2026-11-29 17:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_account_priority"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="5", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("priority")
