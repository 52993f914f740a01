"""messages: process_failed_at (when its processing last failed)

Revision ID: 0021_message_process_failed_at
Revises: 0020_push_generations
Create Date: 2026-12-07 08:40:00

A failure of a message's processing counts towards its quarantine only when another
message was processed since its previous failed attempt
(backend/processing/progress.py): that attempt's time is kept here. Rows already there
have none, and count from their ingestion.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0021_message_process_failed_at"
down_revision: str | None = "0020_push_generations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column(
                "process_failed_at", backend.models.base.UTCDateTime(timezone=True), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("process_failed_at")
