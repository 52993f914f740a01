"""attachments: an attachment may be kept only inside its raw message

Revision ID: 0023_inline_attachments
Revises: 0022_account_provider
Create Date: 2026-12-07 08:10:00

Attachments of at most ATTACHMENT_INLINE_MAX_BYTES are no longer stored as objects of
their own: their rows have no storage backend and key, and the API decodes them from
the raw message. Rows stored before keep their objects.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023_inline_attachments"
down_revision: str | None = "0022_account_provider"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("attachments") as batch:
        batch.alter_column("storage_backend", existing_type=sa.String(16), nullable=True)
        batch.alter_column("storage_key", existing_type=sa.String(1024), nullable=True)


def downgrade() -> None:
    # Inline attachments have no object to point at: they go (the raw message keeps
    # them, and a re-sync of the mailbox would store them as objects again).
    op.execute("DELETE FROM attachments WHERE storage_key IS NULL")
    with op.batch_alter_table("attachments") as batch:
        batch.alter_column("storage_backend", existing_type=sa.String(16), nullable=False)
        batch.alter_column("storage_key", existing_type=sa.String(1024), nullable=False)
