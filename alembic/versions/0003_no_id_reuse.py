"""ids never reused: AUTOINCREMENT on SQLite; account_cleanups

On SQLite every table is rebuilt with AUTOINCREMENT (PostgreSQL sequences never reuse an
id). Ids deleted before this migration (the highest ones) can still come back once; none
after it.

Revision ID: 0003_no_id_reuse
Revises: 0002_account_priority
Create Date: 2026-11-29 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.models.base

revision: str = "0003_no_id_reuse"
down_revision: str | None = "0002_account_priority"
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
    # to every child row. SQLite switches them off only outside a transaction: commit
    # what the migrations before this one did (their version row included) first.
    _commit(bind)
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass
    problems = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise RuntimeError(f"foreign keys broken after the rebuild: {problems[:5]}")
    _commit(bind)
    bind.exec_driver_sql("PRAGMA foreign_keys=ON")


def _commit(bind: sa.Connection) -> None:
    if bind.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        bind.exec_driver_sql("COMMIT")
