"""ids never reused: AUTOINCREMENT on SQLite; account_cleanups

On SQLite every table is rebuilt with AUTOINCREMENT (PostgreSQL sequences never reuse an
id). Ids deleted before this migration (the highest ones) can still come back once; none
after it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Parents before children, so each rebuilt child refers to its rebuilt parent.
TABLES = (
    "accounts",
    "folder_cursors",
    "messages",
    "attachments",
    "poll_runs",
    "webhook_deliveries",
)


def upgrade() -> None:
    op.create_table(
        "account_cleanups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("deleted_at", backend.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_cleanups")),
        sa.UniqueConstraint("account_id", name=op.f("uq_account_cleanups_account_id")),
        sqlite_autoincrement=True,
    )
    _rebuild_sqlite_tables(autoincrement=True)


def downgrade() -> None:
    _rebuild_sqlite_tables(autoincrement=False)
    op.drop_table("account_cleanups")


def _rebuild_sqlite_tables(*, autoincrement: bool) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    # A rebuild drops the old table; with foreign keys on, that drop would first cascade
    # to every child row. SQLite only switches them off outside a transaction, which is
    # the case when this migration runs on its own (upgrading a database with data).
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    if (
        bind.exec_driver_sql("PRAGMA foreign_keys").scalar()
        and bind.exec_driver_sql("SELECT 1 FROM accounts LIMIT 1").first()
    ):
        raise RuntimeError(
            "cannot rebuild the tables while foreign keys are on (the migration runs inside a "
            "transaction that already wrote): run `alembic upgrade 0002` on its own"
        )
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass
    problems = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise RuntimeError(f"foreign keys broken after the rebuild: {problems[:5]}")
    bind.exec_driver_sql("PRAGMA foreign_keys=ON")
