"""Backfill: fetch again what the server still holds in a UID or date range, for the
"we were down for a day" case.

Fetching and storing is the poll's own code (`mailbox.service.store_uids`), so a message
already held is not stored twice. Held messages never processed are handed on now;
with `redeliver`, processed ones get new webhook deliveries (new event ids).

Through the API a backfill is a task: `POST /accounts/{id}/backfill` checks the request
and records a `Backfill` row (`create`), the request commits, then `backfill.run` is
sent (`run`, on the `email` queue beside the polls: it is IMAP fetching). `run` writes
each folder's counts to the row as the folder is done, so `GET /backfills/{id}` shows
how far it has come. The CLI (`backend/console/commands.py`) calls `backfill` directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import dispatch
from backend.db import session_scope
from backend.errors import MailbeatError, NotFound
from backend.mailbox import budget
from backend.mailbox import folders as mailbox_folders
from backend.mailbox.imap import ERROR_TEXT_MAX, ImapSession
from backend.mailbox.service import open_mailbox, store_uids
from backend.models import Account, Backfill, BackfillStatus, Message, utcnow
from backend.processing.service import hand_on
from backend.webhooks import service as webhooks

log = logging.getLogger(__name__)

RUN_TASK = "backfill.run"

# UIDs looked up in the database per query.
LOOKUP_CHUNK = 1000


class InvalidBackfill(MailbeatError):
    status_code = 422


@dataclass(frozen=True)
class Range:
    uid_from: int | None = None
    uid_to: int | None = None
    since: date | None = None  # INTERNALDATE on or after this day
    before: date | None = None  # INTERNALDATE before this day


@dataclass
class FolderBackfill:
    folder: str
    uidvalidity: int
    on_server: int  # messages in the range
    held: int  # of those, already stored
    missing: int  # of those, not stored under this UIDVALIDITY (fetched unless a dry run)
    stored: int = 0  # new messages stored (a copy held from before a UIDVALIDITY change is not)
    handed_on: int = 0  # held but never processed: processed now
    redelivered: int = 0  # held and processed: sent to the webhooks again


@dataclass
class BackfillResult:
    dry_run: bool
    folders: list[FolderBackfill] = field(default_factory=list)
    stored_message_ids: list[int] = field(default_factory=list)
    redelivered_message_ids: list[int] = field(default_factory=list)


def _folders(account: Account, folders: Sequence[str] | None) -> list[str]:
    """The folders to go through (special uses and `*` are looked up on the server as
    the backfill starts); InvalidBackfill (422) names any the account lacks. An account
    that polls special uses or `*` may name any folder: only its server knows."""
    configured = account.folders or ["INBOX"]
    chosen = list(folders or configured)
    if any(mailbox_folders.is_pattern(entry) for entry in configured):
        return chosen
    unknown = [folder for folder in chosen if folder not in configured]
    if unknown:
        raise InvalidBackfill(
            f"not among the account's folders: {', '.join(unknown)} (folders: {configured})"
        )
    return chosen


def create(session: Session, account_id: int, request: dict[str, Any]) -> Backfill:
    """Check a backfill (the account, its folders) and record it, queued; only flushes.
    The caller commits, then sends it with `enqueue`."""
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found")
    _folders(account, request.get("folders"))
    row = Backfill(account_id=account_id, status=BackfillStatus.QUEUED, request=request)
    session.add(row)
    session.flush()
    return row


def enqueue(backfill_id: int) -> None:
    """After the commit that recorded it (in local mode it runs now, in this process)."""
    dispatch.enqueue(RUN_TASK, backfill_id)


def run(backfill_id: int) -> str:
    """The task: run a recorded backfill, its progress and outcome on its row. A failure
    (the server refused the login, the account is gone) ends it as failed with the
    reason; it is not retried (ask again). No connection slot free on the host is no
    failure: the row goes back to queued, its error saying it waits for a slot, and the
    task is sent again after CONNECTION_SLOT_WAIT_SECONDS."""
    with session_scope() as session:
        row = session.get(Backfill, backfill_id)
        if row is None or row.status != BackfillStatus.QUEUED:
            return "gone" if row is None else str(row.status)  # a repeated task
        row.status = BackfillStatus.RUNNING
        row.started_at = utcnow()
        account_id, request = row.account_id, dict(row.request)
    window = Range(
        uid_from=request.get("uid_from"),
        uid_to=request.get("uid_to"),
        since=date.fromisoformat(request["since"]) if request.get("since") else None,
        before=date.fromisoformat(request["before"]) if request.get("before") else None,
    )

    def progress(result: BackfillResult) -> None:
        with session_scope() as session:
            session.get_one(Backfill, backfill_id).result = _as_json(result)

    status, error = BackfillStatus.DONE, None
    try:
        result = backfill(
            account_id,
            window=window,
            folders=request.get("folders"),
            dry_run=bool(request.get("dry_run")),
            redeliver=bool(request.get("redeliver")),
            on_folder=progress,
        )
    except budget.NoSlot as exc:
        # Raised as the session opens, before any folder: nothing done to keep.
        with session_scope() as session:
            row = session.get_one(Backfill, backfill_id)
            row.status, row.error, row.started_at = BackfillStatus.QUEUED, exc.message, None
        log.info("backfill %s of account %s: %s", backfill_id, account_id, exc.message)
        dispatch.enqueue(RUN_TASK, backfill_id, countdown=budget.again_seconds())
        return str(BackfillStatus.QUEUED)
    except Exception as exc:
        # Only the first line of the text, as for a poll: a driver's error may quote data.
        status, result = BackfillStatus.FAILED, None
        first_line = (str(exc).splitlines() or [""])[0]
        error = f"{type(exc).__name__}: {first_line}"[:ERROR_TEXT_MAX]
        log.warning("backfill %s of account %s failed: %s", backfill_id, account_id, error)
    with session_scope() as session:
        row = session.get_one(Backfill, backfill_id)
        row.status = status
        row.error = error
        row.finished_at = utcnow()
        if result is not None:
            row.result = _as_json(result)
    return str(status)


def _as_json(result: BackfillResult) -> dict[str, Any]:
    return asdict(result)


dispatch.register(RUN_TASK, run)


def backfill(
    account_id: int,
    *,
    window: Range,
    folders: Sequence[str] | None = None,
    dry_run: bool = False,
    redeliver: bool = False,
    on_folder: Callable[[BackfillResult], None] | None = None,
) -> BackfillResult:
    """Its own boundary (commits as a poll does); IMAP failures raise ImapError (502).
    `on_folder`: called with the result so far after each folder."""
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound(f"account {account_id} not found")
    chosen = _folders(account, folders)
    result = BackfillResult(dry_run=dry_run)
    unprocessed: list[int] = []
    with open_mailbox(account, purpose="backfill") as mailbox:
        for folder in mailbox_folders.current(chosen, mailbox):
            entry, held, stored = _folder(mailbox, account, folder, window, dry_run=dry_run)
            result.stored_message_ids += stored
            result.folders.append(entry)
            waiting = [mid for mid, processed in held if not processed]
            done = [mid for mid, processed in held if processed]
            entry.handed_on = len(waiting)
            unprocessed += waiting
            if redeliver:
                entry.redelivered = len(done)
                result.redelivered_message_ids += done
            if on_folder is not None:
                on_folder(result)
    if dry_run:
        return result
    hand_on(sorted(result.stored_message_ids + unprocessed))
    if result.redelivered_message_ids:
        with session_scope() as session:
            delivery_ids = [
                delivery_id
                for message in session.scalars(
                    select(Message).where(Message.id.in_(result.redelivered_message_ids))
                )
                for delivery_id in webhooks.create_message_deliveries(
                    session, message, redeliver=True
                )
            ]
        webhooks.dispatch(delivery_ids)
    return result


def _folder(
    mailbox: ImapSession,
    account: Account,
    folder: str,
    window: Range,
    *,
    dry_run: bool,
) -> tuple[FolderBackfill, list[tuple[int, bool]], list[int]]:
    """One folder: count, and unless a dry run, store what is missing. Returns the
    counts, the held messages in the range as (message id, processed), and the ids of
    the messages stored now."""
    uidvalidity = mailbox.select(folder).uidvalidity
    uids = mailbox.search(
        uid_from=window.uid_from, uid_to=window.uid_to, since=window.since, before=window.before
    )
    held = _held(account.id, folder, uidvalidity, uids)
    missing = [uid for uid in uids if uid not in held]
    entry = FolderBackfill(
        folder=folder,
        uidvalidity=uidvalidity,
        on_server=len(uids),
        held=len(held),
        missing=len(missing),
    )
    stored = store_uids(mailbox, account, folder, uidvalidity, missing) if not dry_run else []
    entry.stored = len(stored)
    return entry, list(held.values()), stored


def _held(
    account_id: int, folder: str, uidvalidity: int, uids: Sequence[int]
) -> dict[int, tuple[int, bool]]:
    """{uid: (message id, processed)} for the UIDs already stored."""
    found: dict[int, tuple[int, bool]] = {}
    with session_scope() as session:
        for start in range(0, len(uids), LOOKUP_CHUNK):
            rows = session.execute(
                select(Message.uid, Message.id, Message.processed_at).where(
                    Message.account_id == account_id,
                    Message.folder == folder,
                    Message.uidvalidity == uidvalidity,
                    Message.uid.in_(uids[start : start + LOOKUP_CHUNK]),
                )
            )
            for uid, message_id, processed_at in rows:
                found[uid] = (message_id, processed_at is not None)
    return found
