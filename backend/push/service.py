"""What the watcher reads and writes in the database: the mailboxes to watch, an
account to log in with, and what it found (push_status)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from backend.config import get_settings
from backend.db import session_scope
from backend.mailbox import cursors, folders
from backend.mailbox.imap import FolderStatus
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
        # Locked only when there is something to change: a poll's batch holds the row's
        # share lock through its writes, and the watcher's send loop must not wait on it.
        account = session.get(Account, account_id)
        if account is None or not _waiting(account, folder, now):
            return
        session.refresh(account, with_for_update=True)
        if not _waiting(account, folder, now):
            return
        errors = account.folder_errors or {}
        retry = {**errors[folder], "retry_at": now.isoformat()}
        account.folder_errors = {**errors, folder: retry}


def _waiting(account: Account, folder: str, now: datetime) -> bool:
    """Whether polls wait out a backoff before they try this folder again."""
    error = (account.folder_errors or {}).get(folder)
    return error is not None and datetime.fromisoformat(error["retry_at"]) > now


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


# -- held checks (backend/push/held.py) ---------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """A mailbox whose interval is short enough for a held session."""

    account_id: int
    host: str
    interval: int
    # A new one (a change of login): the held session is let go and opened again.
    login_changed_at: datetime | None = None


def held_accounts() -> dict[int, Checked]:
    """Every mailbox to hold a session for: polled at most every
    HELD_INTERVAL_MAX_SECONDS, active (a failing one is left to its polls and their
    backoff), push off (push watches it already)."""
    longest = get_settings().held_interval_max_seconds
    if not longest:
        return {}
    with session_scope() as session:
        rows = session.execute(
            select(
                Account.id,
                Account.imap_host,
                Account.poll_interval_seconds,
                Account.login_changed_at,
            ).where(
                Account.enabled.is_(True),
                Account.status == AccountStatus.ACTIVE,
                Account.push.is_(False),
                Account.poll_interval_seconds <= longest,
            )
        )
        return {
            row.id: Checked(row.id, row.imap_host, row.poll_interval_seconds, row.login_changed_at)
            for row in rows
        }


@dataclass(frozen=True)
class Baseline:
    """What the mailbox's last complete poll saw, folder by folder: a STATUS that says
    the same needs no poll (backend/mailbox/service.Poller.poll_folder's skip)."""

    seen: dict[str, tuple[int, int]]
    # (UIDVALIDITY, HIGHESTMODSEQ) by folder as change tracking last recorded them
    # (None: changes are not tracked).
    modseqs: dict[str, tuple[int, int | None]] | None

    def unchanged(self, statuses: Mapping[str, FolderStatus]) -> bool:
        for folder, status in statuses.items():
            if self.seen.get(folder) != (status.uidvalidity, status.uidnext):
                return False
            # Without CONDSTORE only a poll can see flag changes: a change is assumed.
            if self.modseqs is not None and (
                status.highestmodseq is None
                or self.modseqs.get(folder) != (status.uidvalidity, status.highestmodseq)
            ):
                return False
        return True


def load_baseline(account_id: int) -> Baseline:
    with session_scope() as session:
        seen = cursors.seen_uidnext(session, account_id)
        row = session.execute(
            select(Account.track_changes, Account.change_state).where(Account.id == account_id)
        ).one_or_none()
    modseqs: dict[str, tuple[int, int | None]] | None = None
    if row is not None and row.track_changes:
        state: dict[str, dict[str, Any]] = row.change_state or {}
        modseqs = {
            folder: (int(value["uidvalidity"]), value.get("highestmodseq"))
            for folder, value in state.items()
            if "uidvalidity" in value
        }
    return Baseline(seen, modseqs)


def record_checks(account_ids: Collection[int]) -> None:
    """Held checks that found nothing new count as the mailboxes' idle polls: their last
    poll and last complete poll (freshness) are now. One statement; an account that
    turned to error or was disabled meanwhile is left as its poll recorded it."""
    if not account_ids:
        return
    now = utcnow()
    with session_scope() as session:
        session.execute(
            update(Account)
            .where(Account.id.in_(list(account_ids)), Account.status == AccountStatus.ACTIVE)
            .values(last_polled_at=now, last_success_at=now)
        )
