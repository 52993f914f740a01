"""messages: process_failures and process_error (a message whose processing keeps failing)

Revision ID: 0012_message_process_failures
Revises: 0011_account_folder_errors
Create Date: 2026-12-07 05:20:00

A message whose processing fails on its own (its batch's others processed) counts the
failure and keeps the reason; at MAX_PROCESS_FAILURES (backend/processing/service.py)
the sweep leaves it, so a few bad messages never take the sweep's every turn.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_message_process_failures"
down_revision: str | None = "0011_account_folder_errors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        # A constant default: PostgreSQL 11+ adds it without rewriting the table.
        batch.add_column(
            sa.Column("process_failures", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("process_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("process_error")
        batch.drop_column("process_failures")
