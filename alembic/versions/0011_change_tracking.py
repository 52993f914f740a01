"""change tracking: flags, deletions and moves on the server (backend/mailbox/changes.py)

Revision ID: 0011_change_tracking
Revises: 0010_message_bodies_lz4
Create Date: 2026-12-07 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0011_change_tracking"
down_revision: str | None = "0010_message_bodies_lz4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        # A string default, as in 0008: '1' is true to both PostgreSQL and SQLite.
        batch.add_column(
            sa.Column("track_changes", sa.Boolean(), nullable=False, server_default="1")
        )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("email_id", sa.String(255), nullable=True))
        batch.add_column(
            sa.Column("deleted_at", backend.models.base.UTCDateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "folder_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=1024), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("highestmodseq", sa.BigInteger(), nullable=True),
        sa.Column("uidnext", sa.BigInteger(), nullable=False),
        sa.Column("messages", sa.BigInteger(), nullable=False),
        sa.Column("full_check_at", backend.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_folder_changes_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_folder_changes")),
        sa.UniqueConstraint(
            "account_id", "folder", name=op.f("uq_folder_changes_account_id_folder")
        ),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("folder_changes")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("email_id")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("track_changes")
