"""messages: decode_fallbacks, the parsed fields whose text is a best guess

Revision ID: 0015_message_decode_fallbacks
Revises: 0014_webhook_userinfo_encrypted
Create Date: 2026-12-07 06:20:00

What the parser could not decode for certain (raw 8-bit header bytes read in a fallback
charset, a body whose charset was detected, bytes that could not be read) is named on
the message, so receivers and the API can tell a guess from a fact. Rows stored before
have none; re-parsing (backend/processing/reparse.py) fills it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_message_decode_fallbacks"
down_revision: str | None = "0014_webhook_userinfo_encrypted"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("decode_fallbacks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("decode_fallbacks")
