"""messages: quarantined_at (a poison message set aside) and its list's index

Revision ID: 0019_message_quarantine
Revises: 0018_message_threads_labels
Create Date: 2026-12-07 08:00:00

A message whose processing failed MAX_PROCESS_FAILURES times on its own
(backend/processing/service.py) is quarantined: listed, left by the sweep, replayed on
request. The partial index holds only those rows, so listing and counting them never
reads an account's other messages.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0019_message_quarantine"
down_revision: str | None = "0018_message_threads_labels"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# MAX_PROCESS_FAILURES when this migration was written: the messages that were
# processing dead letters already are quarantined from now on.
MAX_PROCESS_FAILURES = 10


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column(
                "quarantined_at", backend.models.base.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch.create_index(
            "ix_messages_quarantined",
            ["account_id", "id"],
            unique=False,
            postgresql_where=sa.text("quarantined_at IS NOT NULL"),
            sqlite_where=sa.text("quarantined_at IS NOT NULL"),
        )
    op.execute(
        sa.text(
            "UPDATE messages SET quarantined_at = CURRENT_TIMESTAMP "
            "WHERE processed_at IS NULL AND process_failures >= :limit"
        ).bindparams(limit=MAX_PROCESS_FAILURES)
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_quarantined")
        batch.drop_column("quarantined_at")
