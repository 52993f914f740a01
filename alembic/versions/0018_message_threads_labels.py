"""the server's thread and labels of a message, and one live message per server identity

Revision ID: 0018_message_threads_labels
Revises: 0017_change_tracking
Create Date: 2026-12-07 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_message_threads_labels"
down_revision: str | None = "0017_change_tracking"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE_WITH_ID = "email_id IS NOT NULL AND deleted_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("thread_id", sa.String(255), nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
    # Rows stored before this revision may hold one server identity twice (the same
    # Gmail message in INBOX and a label): the oldest keeps it, so the index can be built.
    op.execute(
        "UPDATE messages SET email_id = NULL WHERE email_id IS NOT NULL AND deleted_at IS NULL "
        "AND id > (SELECT min(m.id) FROM messages m WHERE m.account_id = messages.account_id "
        "AND m.email_id = messages.email_id AND m.deleted_at IS NULL)"
    )
    op.create_index(
        "ux_messages_account_email_id",
        "messages",
        ["account_id", "email_id"],
        unique=True,
        postgresql_where=sa.text(_LIVE_WITH_ID),
        sqlite_where=sa.text(_LIVE_WITH_ID),
    )


def downgrade() -> None:
    op.drop_index("ux_messages_account_email_id", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("labels")
        batch.drop_column("thread_id")
