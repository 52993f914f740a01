"""message bodies compressed with lz4 (PostgreSQL)

Revision ID: 0010_message_bodies_lz4
Revises: 0009_backfills
Create Date: 2026-11-30 00:05:00

Bodies over about 2 kB are compressed as they are stored (TOAST). PostgreSQL's default,
pglz, took 3.7 % of the machine's CPU during a first sync, on the path of the commit that
every batch waits for; lz4 compresses several times faster for about the same size. Only rows written from now on use it (existing ones stay
readable as they are). A server built without lz4 keeps pglz.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_message_bodies_lz4"
down_revision: str | None = "0009_backfills"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BODIES = ("text_body", "html_body")


def _set(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    methods = bind.scalar(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    )
    if "lz4" not in (methods or []):
        return  # PostgreSQL before 14, or built without lz4
    for column in BODIES:
        op.execute(f"ALTER TABLE messages ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    _set("lz4")


def downgrade() -> None:
    _set("default")
