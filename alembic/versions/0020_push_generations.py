"""errors stay where they happen: content matching bounded to a folder's generation
change (folder_cursors.match_below), and a mailbox's login changes seen by watchers
(accounts.login_changed_at)

Revision ID: 0020_push_generations
Revises: 0019_message_quarantine
Create Date: 2026-12-07 08:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0020_push_generations"
down_revision: str | None = "0019_message_quarantine"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("folder_cursors") as batch:
        batch.add_column(sa.Column("match_below", sa.BigInteger(), nullable=True))
    # A folder polled completely under its UIDVALIDITY has seen everything below its
    # UIDNEXT: later arrivals are new mail. The others keep matching everything (NULL),
    # as before, until their next UIDVALIDITY change.
    op.execute("UPDATE folder_cursors SET match_below = uidnext")
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column(
                "login_changed_at", backend.models.base.UTCDateTime(timezone=True), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("login_changed_at")
    with op.batch_alter_table("folder_cursors") as batch:
        batch.drop_column("match_below")
