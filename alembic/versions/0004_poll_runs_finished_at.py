"""index poll_runs.finished_at (polls completed per second)

Revision ID: 0004_poll_runs_finished_at
Revises: 0003_no_id_reuse
Create Date: 2026-11-29 17:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_poll_runs_finished_at"
down_revision: str | None = "0003_no_id_reuse"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_poll_runs_finished_at", "poll_runs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_poll_runs_finished_at", table_name="poll_runs")
