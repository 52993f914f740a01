"""folder audits (the latest per folder) and account freshness

Revision ID: 0016_audits_freshness
Revises: 0015_message_decode_fallbacks
Create Date: 2026-12-07 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0016_audits_freshness"
down_revision: str | None = "0015_message_decode_fallbacks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "folder_audits",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=1024), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("deep", sa.Boolean(), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("cursor", sa.BigInteger(), nullable=True),
        sa.Column("server", sa.Integer(), nullable=False),
        sa.Column("expected", sa.Integer(), nullable=False),
        sa.Column("stored", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.Column("repaired", sa.Integer(), nullable=False),
        sa.Column("objects_checked", sa.Integer(), nullable=False),
        sa.Column("objects_missing", sa.Integer(), nullable=False),
        sa.Column("objects_repaired", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", backend.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", backend.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_folder_audits_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_folder_audits")),
        sa.UniqueConstraint(
            "account_id", "folder", name=op.f("uq_folder_audits_account_id_folder")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("stale_since", backend.models.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("audited_at", backend.models.base.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("audited_at")
        batch.drop_column("stale_since")
    op.drop_table("folder_audits")
