"""webhook URLs' userinfo encrypted at rest

Revision ID: 0014_webhook_userinfo_encrypted
Revises: 0013_poll_fence_push_confirmed
Create Date: 2026-12-07 05:30:00

A webhook URL may carry basic auth for its receiver (`https://user:password@host/`): a
secret, which was stored in clear in accounts.webhook_url and webhook_deliveries.url.
The userinfo now goes, encrypted with ENCRYPTION_KEY like every other secret, into
accounts.webhook_userinfo_encrypted, and both URL columns keep `***@` in its place (a
delivery's URL is a record of where it went; each attempt reads the account's). The
downgrade puts the userinfo back into accounts.webhook_url; deliveries keep `***`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from backend import crypto, netpolicy

revision: str = "0014_webhook_userinfo_encrypted"
down_revision: str | None = "0013_poll_fence_push_confirmed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

accounts = sa.table(
    "accounts",
    sa.column("id", sa.Integer),
    sa.column("webhook_url", sa.String),
    sa.column("webhook_userinfo_encrypted", sa.Text),
)
deliveries = sa.table(
    "webhook_deliveries", sa.column("id", sa.Integer), sa.column("url", sa.String)
)
# Only URLs with an '@' carry userinfo; a URL with an '@' elsewhere (a path) is left as
# split_userinfo finds it.
_WITH_AT = "%@%"


def upgrade() -> None:
    op.add_column("accounts", sa.Column("webhook_userinfo_encrypted", sa.Text(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(accounts.c.id, accounts.c.webhook_url).where(
            accounts.c.webhook_url.like(_WITH_AT)
        )
    ).all()
    for account_id, url in rows:
        redacted, userinfo = netpolicy.split_userinfo(url)
        if userinfo is None:
            continue
        bind.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(webhook_url=redacted, webhook_userinfo_encrypted=crypto.encrypt(userinfo))
        )
    # Deliveries: one UPDATE per distinct URL (there are few receivers, many rows).
    urls = bind.execute(
        sa.select(deliveries.c.url).where(deliveries.c.url.like(_WITH_AT)).distinct()
    ).scalars()
    for url in list(urls):
        redacted, userinfo = netpolicy.split_userinfo(url)
        if userinfo is not None:
            bind.execute(deliveries.update().where(deliveries.c.url == url).values(url=redacted))


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            accounts.c.id, accounts.c.webhook_url, accounts.c.webhook_userinfo_encrypted
        ).where(accounts.c.webhook_userinfo_encrypted.is_not(None))
    ).all()
    for account_id, url, encrypted in rows:
        bind.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(webhook_url=netpolicy.with_userinfo(url, crypto.decrypt(encrypted)))
        )
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("webhook_userinfo_encrypted")
