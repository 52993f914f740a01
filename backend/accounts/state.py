"""An account's state between polls: its status, its failures and backoff, and the
account events a change of status sends.

    active    -- a poll fails ------------------------> error     "account.error"
    error     -- a poll succeeds ---------------------> active    "account.recovered"
    any       -- MAX_CONSECUTIVE_FAILURES in a row ---> disabled  "account.disabled"
    error     -- new credentials or server (API) -----> active    (no event)
    disabled  -- enabled through the API -------------> active    (no event)

A failed poll that does not disable the account sets a backoff: the next poll waits the
poll interval, doubled for each further failure in a row (BACKOFF_MAX_SECONDS at most).

A throttled poll (the provider shedding load, ErrorKind.THROTTLED) is not a failure of the
mailbox: the status, the failures in a row and the events stay as they were; the error is
shown and the next poll waits what the server asked for, or THROTTLE_BACKOFF_SECONDS.

A folder that fails (gone, refused) while others of the mailbox are polled is not a
failed poll: it is kept in `folder_errors` with failures and a backoff of its own, and
tried again when that runs out; the other folders, and the account's status, go on.

Every function changes the given account (or its row) on the caller's session and
never commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from backend.config import get_settings
from backend.mailbox.imap import ImapError, ImapThrottled
from backend.models import Account, AccountStatus, ErrorKind, EventType

# A scheduled poll may run this much before backoff_until and still count as due:
# beat ticks about once a second, and backoff is measured from the failed poll's start.
BACKOFF_SLACK = timedelta(seconds=2)


def wants_polls(account: Account) -> bool:
    """Whether the account is polled at all (one with status "error" is, after its
    backoff): an account that is not has no schedule entry either."""
    return account.enabled and account.status != AccountStatus.DISABLED


def skip_reason(account: Account, now: datetime, *, force: bool = False) -> str | None:
    """Why a poll starting now must not run, or None when it may. `force` (a poll asked
    for by hand with force=true) runs through a backoff, never for a disabled account."""
    if not wants_polls(account):
        return "account is disabled"
    if not force and backing_off(account, now):
        assert account.backoff_until is not None
        return f"backing off until {account.backoff_until.isoformat()}"
    return None


def backing_off(account: Account, now: datetime) -> bool:
    """Whether the account's failures still hold its scheduled polls back."""
    return account.backoff_until is not None and account.backoff_until - BACKOFF_SLACK > now


def backoff_delay(account: Account, failures: int) -> timedelta:
    """The poll interval, doubled for every further consecutive failure, capped."""
    cap = get_settings().backoff_max_seconds
    seconds = account.poll_interval_seconds * 2 ** min(failures - 1, 32)
    return timedelta(seconds=min(seconds, cap))


def throttle_delay(error: ImapError) -> timedelta:
    """The server's suggested wait (capped), or the setting's when it named none."""
    settings = get_settings()
    asked = error.retry_after if isinstance(error, ImapThrottled) else None
    seconds = settings.throttle_backoff_seconds if asked is None else asked
    return timedelta(seconds=min(seconds, settings.throttle_backoff_max_seconds))


def folder_due(account: Account, folder: str, now: datetime) -> bool:
    """Whether a folder that failed before is to be tried again by a poll starting now."""
    failed = (account.folder_errors or {}).get(folder)
    return failed is None or datetime.fromisoformat(failed["retry_at"]) - BACKOFF_SLACK <= now


def record_folders(
    account: Account,
    started_at: datetime,
    *,
    polled: Sequence[str],
    tried: Sequence[str],
    failed: Mapping[str, ImapError],
) -> None:
    """The folders' errors after a poll that was to go through `polled` and tried
    `tried` (the due ones): a failure adds one with its backoff, a success or a folder no
    longer polled drops it, a folder left waiting keeps it."""
    before = account.folder_errors or {}
    errors: dict[str, dict[str, Any]] = {}
    for folder in polled:
        if folder in failed:
            previous = before.get(folder, {})
            failures = int(previous.get("failures", 0)) + 1
            errors[folder] = {
                "error": failed[folder].message,
                "failures": failures,
                "since": previous.get("since", started_at.isoformat()),
                "retry_at": (started_at + backoff_delay(account, failures)).isoformat(),
            }
        elif folder in before and folder not in tried:
            errors[folder] = before[folder]
    account.folder_errors = errors or None


def clear_backoff(account: Account) -> None:
    """Poll at the next tick instead of waiting out the backoff a failure set."""
    account.backoff_until = None


def forget_failures(account: Account) -> None:
    """New credentials or server: the failures so far say nothing about the next poll."""
    account.consecutive_failures = 0
    clear_backoff(account)
    if account.status == AccountStatus.ERROR:
        account.status = AccountStatus.ACTIVE


def set_enabled(account: Account, enabled: bool) -> None:
    """Enabled or disabled through the API."""
    account.enabled = enabled
    if enabled:
        # Re-enabling starts afresh: whatever disabled it is taken as dealt with.
        account.status = AccountStatus.ACTIVE
        account.disabled_reason = None
        account.consecutive_failures = 0
        clear_backoff(account)
    else:
        account.status = AccountStatus.DISABLED
        account.disabled_reason = "disabled through the API"


def record_poll(
    session: Session,
    account_id: int,
    *,
    started_at: datetime,
    now: datetime,
    error: ImapError | None,
) -> EventType | None:
    """The account's state after a poll that started at `started_at` and failed with
    `error` (None: succeeded). Returns the account event when its status changed."""
    account = session.get(Account, account_id, with_for_update=True)
    if account is None:  # deleted while we polled
        return None
    account.last_polled_at = now
    event: EventType | None = None
    if error is None:
        if account.status == AccountStatus.ERROR:
            event = EventType.ACCOUNT_RECOVERED
        if account.status != AccountStatus.DISABLED:
            account.status = AccountStatus.ACTIVE
        account.last_success_at = now
        account.consecutive_failures = 0
        account.backoff_until = None
        account.last_error = None
        account.last_error_kind = None
        return event
    account.last_error = error.message
    account.last_error_kind = error.kind
    if error.kind == ErrorKind.THROTTLED:
        account.backoff_until = started_at + throttle_delay(error)
        return None
    failures = account.consecutive_failures + 1
    account.consecutive_failures = failures
    if failures >= get_settings().max_consecutive_failures:
        if account.status != AccountStatus.DISABLED:
            event = EventType.ACCOUNT_DISABLED
        account.enabled = False
        account.status = AccountStatus.DISABLED
        account.backoff_until = None
        account.disabled_reason = f"{failures} consecutive failed polls; the last: {error.message}"
    else:
        if account.status == AccountStatus.ACTIVE:
            event = EventType.ACCOUNT_ERROR
            account.status = AccountStatus.ERROR
        account.backoff_until = started_at + backoff_delay(account, failures)
    return event
