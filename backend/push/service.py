"""What the watcher reads and writes in the database: the mailboxes to watch, an
account to log in with, and what it found (push_status)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select, update

from backend.db import session_scope
from backend.mailbox import folders
from backend.models import Account, AccountStatus, PushStatus


@dataclass(frozen=True)
class Pushed:
    """A mailbox with push on, as the watcher needs it to plan its connections."""

    account_id: int
    host: str
    folders: tuple[str, ...]

    @property
    def connections(self) -> int:
        return len(self.folders)


def pushed_accounts() -> dict[int, Pushed]:
    """Every mailbox to watch: push on, enabled, not disabled, and not known to lack
    IDLE (a change of server or of the push flag clears that: accounts/service.py)."""
    with session_scope() as session:
        rows = session.execute(
            select(Account.id, Account.imap_host, Account.folders).where(
                Account.push.is_(True),
                Account.enabled.is_(True),
                Account.status != AccountStatus.DISABLED,
                Account.push_status.is_distinct_from(PushStatus.UNSUPPORTED),
            )
        )
        return {row.id: Pushed(row.id, row.imap_host, folders.watched(row.folders)) for row in rows}


def load_account(account_id: int) -> Account | None:
    """The account, detached, for a login (its columns stay readable)."""
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is not None:
            session.expunge(account)
        return account


def save_statuses(statuses: Mapping[int, PushStatus]) -> None:
    """Write what the watcher found, where it changed (one transaction)."""
    with session_scope() as session:
        for account_id, status in statuses.items():
            session.execute(
                update(Account)
                .where(Account.id == account_id, Account.push_status.is_distinct_from(status))
                .values(push_status=status)
            )
