"""backfills: a backfill asked for through the API, run by a task, with its progress

Revision ID: 0009_backfills
Revises: 0008_account_push
Create Date: 2026-11-29 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0009_backfills"
down_revision: str | None = "0008_account_push"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "backfills",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", backend.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", backend.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", backend.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_backfills_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backfills")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_backfills_account_id"), "backfills", ["account_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_backfills_account_id"), table_name="backfills")
    op.drop_table("backfills")
