"""indexes for paging the admin lists at 100,000 mailboxes

Revision ID: 0007_paging_indexes
Revises: 0006_account_sync_progress
Create Date: 2026-11-29 20:10:00

Each list is read in id order, a page at a time, and its deep pages find their first id
by an index-only scan (backend/paging.py): accounts by status, the scheduled accounts,
an account's poll runs, the dead letters (all, or one account's).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_paging_indexes"
down_revision: str | None = "0006_account_sync_progress"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_index("ix_accounts_status")
        batch.create_index("ix_accounts_status_id", ["status", "id"])
        batch.create_index(
            "ix_accounts_id_schedule", ["id", "enabled", "status", "poll_interval_seconds"]
        )
    op.create_index("ix_poll_runs_account_id_id", "poll_runs", ["account_id", "id"])
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_index("ix_webhook_deliveries_status_account_id")
        batch.create_index(
            "ix_webhook_deliveries_status_account_id_id", ["status", "account_id", "id"]
        )
        batch.create_index("ix_webhook_deliveries_status_id", ["status", "id"])


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_index("ix_webhook_deliveries_status_id")
        batch.drop_index("ix_webhook_deliveries_status_account_id_id")
        batch.create_index("ix_webhook_deliveries_status_account_id", ["status", "account_id"])
    op.drop_index("ix_poll_runs_account_id_id", table_name="poll_runs")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_index("ix_accounts_id_schedule")
        batch.drop_index("ix_accounts_status_id")
        batch.create_index("ix_accounts_status", ["status"])
