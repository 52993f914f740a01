"""What the watcher reads and writes in the database: the mailboxes to watch, an
account to log in with, and what it found (push_status)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from backend.config import get_settings
from backend.db import session_scope
from backend.mailbox import folders
from backend.models import Account, AccountStatus, FolderCursor, PushStatus, utcnow

# "watching" unconfirmed for this many watcher leases is shown as stale: a live watcher
# confirms every lease, so one late confirmation does not flap the status.
PUSH_STALE_LEASES = 2


@dataclass(frozen=True)
class Pushed:
    """A mailbox with push on, as the watcher needs it to plan its connections."""

    account_id: int
    host: str
    folders: tuple[str, ...]
    # A new one: the watcher connects again with the new login (watcher._new_logins).
    login_changed_at: datetime | None = None

    @property
    def connections(self) -> int:
        return len(self.folders)


def pushed_accounts() -> dict[int, Pushed]:
    """Every mailbox to watch: push on, enabled, not disabled, and not known to lack
    IDLE (a change of server or of the push flag clears that: accounts/service.py)."""
    with session_scope() as session:
        rows = session.execute(
            select(Account.id, Account.imap_host, Account.folders, Account.login_changed_at).where(
                Account.push.is_(True),
                Account.enabled.is_(True),
                Account.status != AccountStatus.DISABLED,
                Account.push_status.is_distinct_from(PushStatus.UNSUPPORTED),
            )
        )
        return {
            row.id: Pushed(
                row.id, row.imap_host, folders.watched(row.folders), row.login_changed_at
            )
            for row in rows
        }


def folder_generations(account_ids: Collection[int]) -> dict[tuple[int, str], int]:
    """The UIDVALIDITY the polls last found in each folder of these mailboxes, by
    (account, folder): a watcher's link on another one selected a folder since gone."""
    if not account_ids:
        return {}
    with session_scope() as session:
        rows = session.execute(
            select(FolderCursor.account_id, FolderCursor.folder, FolderCursor.uidvalidity).where(
                FolderCursor.account_id.in_(list(account_ids))
            )
        )
        return {(row.account_id, row.folder): row.uidvalidity for row in rows}


def load_account(account_id: int) -> Account | None:
    """The account, detached, for a login (its columns stay readable)."""
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is not None:
            session.expunge(account)
        return account


def save_statuses(statuses: Mapping[int, PushStatus]) -> None:
    """Write what the watcher found, where it changed (one transaction); "watching" is
    confirmed as it is written."""
    now = utcnow()
    with session_scope() as session:
        for account_id, status in statuses.items():
            confirmed = {"push_confirmed_at": now} if status == PushStatus.WATCHING else {}
            session.execute(
                update(Account)
                .where(Account.id == account_id, Account.push_status.is_distinct_from(status))
                .values(push_status=status, **confirmed)
            )


def folder_selected(account_id: int, folder: str) -> None:
    """A watcher has just selected this folder: if polls had found it failing (gone,
    refused), the next poll tries it instead of waiting out its backoff, so mail in a
    folder recreated meanwhile comes with the poll that IDLE sends."""
    now = utcnow()
    with session_scope() as session:
        account = session.get(Account, account_id, with_for_update=True)
        errors = None if account is None else account.folder_errors
        if not errors or folder not in errors:
            return
        if datetime.fromisoformat(errors[folder]["retry_at"]) <= now:
            return
        assert account is not None
        retry = {**errors[folder], "retry_at": now.isoformat()}
        account.folder_errors = {**errors, folder: retry}


def confirm_watching(account_ids: Collection[int]) -> None:
    """A live watcher still holds IDLE on every folder of these mailboxes (one statement,
    every WATCHER_LEASE_SECONDS)."""
    if not account_ids:
        return
    with session_scope() as session:
        session.execute(
            update(Account)
            .where(Account.id.in_(list(account_ids)), Account.push_status == PushStatus.WATCHING)
            .values(push_confirmed_at=utcnow())
        )


def shown_status(
    status: PushStatus | None, confirmed_at: datetime | None, now: datetime | None = None
) -> PushStatus | None:
    """The push_status the API shows: "watching" that no watcher has confirmed lately is
    stale (the watcher died, or none runs)."""
    if status != PushStatus.WATCHING:
        return status
    horizon = timedelta(seconds=PUSH_STALE_LEASES * get_settings().watcher_lease_seconds)
    if confirmed_at is None or confirmed_at < (now or utcnow()) - horizon:
        return PushStatus.STALE
    return status
