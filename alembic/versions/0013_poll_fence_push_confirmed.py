"""accounts: the polls' fencing token, and when a watcher last confirmed push_status

Revision ID: 0013_poll_fence_push_confirmed
Revises: 0012_message_process_failures
Create Date: 2026-12-07 05:30:00

poll_fence: each poll that takes a mailbox's lease takes the next value, and a batch
commits only while the row still carries its own (backend/mailbox/lock.py), so a poll
that slept past its lease cannot write once another has started. push_confirmed_at: a
live watcher confirms push_status every WATCHER_LEASE_SECONDS; the API shows a status no
watcher has confirmed within two leases as stale.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_poll_fence_push_confirmed"
down_revision: str | None = "0012_message_process_failures"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("poll_fence", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column(
        "accounts", sa.Column("push_confirmed_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("accounts", "push_confirmed_at")
    op.drop_column("accounts", "poll_fence")
