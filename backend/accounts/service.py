"""Accounts: create, read, change and delete mailboxes.

Only flushes. The endpoint commits, then brings the schedule along
(`schedules.service.sync_account` / `remove_account`), so Redis never holds an entry for
an account the database does not have.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend import crypto, netpolicy, paging
from backend.accounts import state
from backend.accounts.schemas import (
    AccountConnection,
    AccountCreate,
    AccountUpdate,
    OAuth2Credentials,
    check_initial_sync,
)
from backend.admin.service import require_scheduler
from backend.config import get_settings
from backend.errors import Conflict, NotFound, ValidationError
from backend.mailbox import folders
from backend.models import (
    Account,
    AccountCleanup,
    AccountStatus,
    AuthMethod,
    FolderCursor,
    InitialSync,
    PollRun,
    utcnow,
)
from backend.schedules import service as schedules
from backend.storage import service as storage
from backend.storage.base import StorageError, account_prefix

log = logging.getLogger(__name__)

# A change to any of these means the failures so far say nothing about the next poll.
CONNECTION_FIELDS = ("imap_host", "imap_port", "imap_security", "username")
# Plain columns a PATCH copies as given.
PLAIN_FIELDS = (
    "email",
    "provider",
    *CONNECTION_FIELDS,
    "folders",
    "poll_interval_seconds",
    "priority",
    "push",
    "track_changes",
    "initial_sync",
    "initial_sync_count",
    "initial_sync_since",
)


def get_account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    return account


def list_accounts(
    session: Session,
    *,
    status: str | None,
    limit: int,
    offset: int = 0,
    after: int | None = None,
) -> paging.Page[Account]:
    """Accounts in id order, a page at a time (on the status and id index)."""
    within = None if status is None else (Account.status, status)
    return paging.page(
        session, select(Account), Account.id, limit=limit, offset=offset, after=after, within=within
    )


def list_poll_runs(
    session: Session,
    account_id: int,
    *,
    limit: int,
    offset: int = 0,
    after: int | None = None,
) -> paging.Page[PollRun]:
    """An account's poll runs, newest first."""
    get_account(session, account_id)
    return paging.page(
        session,
        select(PollRun),
        PollRun.id,
        limit=limit,
        offset=offset,
        after=after,
        newest_first=True,
        within=(PollRun.account_id, account_id),
    )


def folder_cursors(session: Session, account: Account) -> list[tuple[str, FolderCursor | None]]:
    """Each configured folder with its cursor (None before its first poll), in the
    account's order; where `folders` has special uses or `*`, the folders they were
    found to mean (those with a cursor or an error) take their place, by name."""
    cursors = {
        cursor.folder: cursor
        for cursor in session.scalars(
            select(FolderCursor).where(FolderCursor.account_id == account.id)
        )
    }
    configured = account.folders or ["INBOX"]
    names = [folder for folder in configured if not folders.is_pattern(folder)]
    if len(names) < len(configured):
        found = set(cursors) | set(account.folder_errors or {})
        names += sorted(found - set(names))
    return [(folder, cursors.get(folder)) for folder in names]


def create_account(session: Session, data: AccountCreate) -> Account:
    _ensure_unique(session, data.imap_host, data.imap_port, data.username)
    auth_method, credentials = _credentials(data.password, data.oauth2)
    account = Account(
        email=data.email,
        imap_host=data.imap_host,
        imap_port=data.imap_port,
        imap_security=data.imap_security,
        username=data.username,
        provider=data.provider,
        auth_method=auth_method,
        credentials_encrypted=crypto.encrypt_json(credentials),
        folders=list(data.folders),
        poll_interval_seconds=(
            data.poll_interval_seconds or get_settings().default_poll_interval_seconds
        ),
        priority=data.priority,
        enabled=data.enabled,
        push=data.push,
        track_changes=data.track_changes,
        status=AccountStatus.ACTIVE if data.enabled else AccountStatus.DISABLED,
        disabled_reason=None if data.enabled else "created disabled",
        initial_sync=data.initial_sync or InitialSync.ALL,
        initial_sync_count=data.initial_sync_count,
        initial_sync_since=data.initial_sync_since,
        **_webhook_url_columns(data.webhook_url),
        webhook_secret_encrypted=(
            None
            if data.webhook_secret is None
            else crypto.encrypt(data.webhook_secret.get_secret_value())
        ),
        consecutive_failures=0,
        message_count=0,
    )
    session.add(account)
    _flush(session, account)
    return account


def _webhook_url_columns(url: object | None) -> dict[str, str | None]:
    """The URL as stored: its userinfo (a receiver's basic auth) encrypted apart."""
    if url is None:
        return {"webhook_url": None, "webhook_userinfo_encrypted": None}
    redacted, userinfo = netpolicy.split_userinfo(str(url))
    return {
        "webhook_url": redacted,
        "webhook_userinfo_encrypted": None if userinfo is None else crypto.encrypt(userinfo),
    }


def unsaved_account(data: AccountConnection) -> Account:
    """An account that is never added to a session: what POST /accounts/test tries."""
    auth_method, credentials = _credentials(data.password, data.oauth2)
    return Account(
        email=data.username,
        imap_host=data.imap_host,
        imap_port=data.imap_port,
        imap_security=data.imap_security,
        username=data.username,
        auth_method=auth_method,
        credentials_encrypted=crypto.encrypt_json(credentials),
        folders=list(data.folders),
    )


def update_account(session: Session, account: Account, data: AccountUpdate) -> Account:
    given = data.model_fields_set
    changes: dict[str, Any] = {name: getattr(data, name) for name in PLAIN_FIELDS if name in given}
    if "webhook_url" in given:
        changes.update(_webhook_url_columns(data.webhook_url))
    _check_initial_sync(account, changes)

    new_server = {
        name: changes.get(name, getattr(account, name))
        for name in ("imap_host", "imap_port", "username")
    }
    if any(new_server[name] != getattr(account, name) for name in new_server):
        _ensure_unique(session, *new_server.values(), exclude_id=account.id)
        _refuse_another_mailbox(session, account, **new_server)

    connection_changed = any(
        name in changes and changes[name] != getattr(account, name) for name in CONNECTION_FIELDS
    )
    for name, value in changes.items():
        setattr(account, name, value)

    if data.password is not None or data.oauth2 is not None:
        account.auth_method, credentials = _credentials(data.password, data.oauth2)
        account.credentials_encrypted = crypto.encrypt_json(credentials)
        connection_changed = True
    if "webhook_secret" in given:
        account.webhook_secret_encrypted = (
            None
            if data.webhook_secret is None
            else crypto.encrypt(data.webhook_secret.get_secret_value())
        )

    if connection_changed:
        state.forget_failures(account)
        account.login_changed_at = utcnow()
    if connection_changed or "push" in changes:
        # What a watcher found was about this server (or an earlier try): it looks again.
        account.push_status = None
    if data.enabled is not None and data.enabled != account.enabled:
        state.set_enabled(account, data.enabled)

    _flush(session, account)
    return account


def delete_account(session: Session, account: Account) -> None:
    """Delete the rows (messages, attachments, cursors and poll runs go with the account
    through ON DELETE CASCADE) and record that its stored objects must go. After the
    commit the endpoint deletes them (`delete_objects`); whatever that leaves (storage
    down, a crash, a poll that was still running) the storage sweep deletes later. Ids
    are never reused, so a new account never meets a deleted one's leftovers."""
    session.add(AccountCleanup(account_id=account.id))
    session.delete(account)
    session.flush()


def delete_objects(account_id: int) -> None:
    """The deleted account's stored objects, now if storage answers; else the sweep."""
    try:
        removed = storage.delete_prefix(account_prefix(account_id))
    except StorageError as exc:
        log.warning(
            "deleted account %s: its stored objects go on the next storage sweep: %s",
            account_id,
            str(exc)[:300],
        )
        return
    log.info("account %s: deleted %s stored objects", account_id, removed)


def queue_poll(session: Session, account_id: int, *, force: bool = False) -> str:
    """Poll the account now, outside its schedule; returns the task id. An account backing
    off after failed polls is polled only with `force` (a 409 says until when)."""
    account = get_account(session, account_id)
    if not account.enabled:
        raise Conflict(
            f"account {account_id} is disabled ({account.disabled_reason or 'no reason'}); "
            "enable it first (PATCH enabled=true)"
        )
    if not force and state.backing_off(account, utcnow()):
        raise Conflict(
            f"account {account_id} is backing off until "
            f"{account.backoff_until.isoformat() if account.backoff_until else '?'} after "
            f"{account.consecutive_failures} failed polls (last error: "
            f"{account.last_error or 'none recorded'}); its scheduled polls wait until then. "
            "Poll it anyway with POST /accounts/{id}/poll?force=true"
        )
    require_scheduler()
    return schedules.enqueue_poll(account_id, force=force)


def _credentials(
    password: SecretStr | None, oauth2: OAuth2Credentials | None
) -> tuple[AuthMethod, dict[str, Any]]:
    if oauth2 is not None:
        return AuthMethod.OAUTH2, oauth2.stored()
    assert password is not None
    return AuthMethod.PASSWORD, {"password": password.get_secret_value()}


def _check_initial_sync(account: Account, changes: dict[str, Any]) -> None:
    """The initial-sync fields must fit together once the change is applied."""
    policy = changes.get("initial_sync", account.initial_sync)
    count = changes.get("initial_sync_count", account.initial_sync_count)
    since = changes.get("initial_sync_since", account.initial_sync_since)
    # Switching policy drops the other policy's parameter unless it was sent explicitly.
    if policy != "newest" and "initial_sync_count" not in changes:
        changes["initial_sync_count"] = count = None
    if policy != "since" and "initial_sync_since" not in changes:
        changes["initial_sync_since"] = since = None
    try:
        check_initial_sync(policy, count, since)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


def _ensure_unique(
    session: Session, host: str, port: int, username: str, *, exclude_id: int | None = None
) -> None:
    query = select(Account.id).where(
        Account.imap_host == host, Account.imap_port == port, Account.username == username
    )
    if exclude_id is not None:
        query = query.where(Account.id != exclude_id)
    existing = session.scalar(query.limit(1))
    if existing is not None:
        raise Conflict(_duplicate_message(host, port, username, existing))


def _refuse_another_mailbox(
    session: Session, account: Account, *, imap_host: str, imap_port: int, username: str
) -> None:
    """An account that has taken mail stays with its mailbox. Its cursors (last UID per
    folder) and messages belong to that mailbox: polling another with them would report
    success and skip the other's mail for good, and the old messages would pass as the
    new mailbox's. Before any mail was taken (a typo fixed), the change is fine. A host
    differing only in case is the same server."""
    same_host = imap_host.lower() == account.imap_host.lower()
    if same_host and (imap_port, username) == (account.imap_port, account.username):
        return
    has_cursor = session.scalar(
        select(FolderCursor.id).where(FolderCursor.account_id == account.id).limit(1)
    )
    if has_cursor is None and not account.message_count:
        return
    raise Conflict(
        f"account {account.id} already holds mail of {account.username!r} on "
        f"{account.imap_host}:{account.imap_port}; pointing it at {username!r} on "
        f"{imap_host}:{imap_port} would mix two mailboxes. To poll that mailbox, create a "
        "new account for it (POST /accounts), and delete this one if it is no longer wanted"
    )


def _duplicate_message(host: str, port: int, username: str, existing: int | None) -> str:
    which = f"account {existing}" if existing is not None else "another account"
    return f"{which} already polls {username!r} on {host}:{port}"


def _flush(session: Session, account: Account) -> None:
    # The unique constraint still decides when two requests race past the check above.
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(
            _duplicate_message(account.imap_host, account.imap_port, account.username, None)
        ) from exc
