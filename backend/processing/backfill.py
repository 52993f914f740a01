"""Backfill: fetch again what the server still holds in a UID or date range, for the
"we were down for a day" case.

Fetching and storing is the poll's own code (`mailbox.service.store_uids`), so a message
already held is not stored twice. Held messages never processed are handed on now;
with `redeliver`, processed ones get new webhook deliveries (new event ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import select

from backend.db import session_scope
from backend.errors import MailbeatError, NotFound
from backend.mailbox.imap import ImapSession
from backend.mailbox.service import open_mailbox, store_uids
from backend.models import Account, Message
from backend.processing.service import hand_on
from backend.webhooks import service as webhooks

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


def backfill(
    account_id: int,
    *,
    window: Range,
    folders: Sequence[str] | None = None,
    dry_run: bool = False,
    redeliver: bool = False,
) -> BackfillResult:
    """Its own boundary (commits as a poll does); IMAP failures raise ImapError (502)."""
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound(f"account {account_id} not found")
    configured = account.folders or ["INBOX"]
    chosen = list(folders or configured)
    unknown = [folder for folder in chosen if folder not in configured]
    if unknown:
        raise InvalidBackfill(
            f"not among the account's folders: {', '.join(unknown)} (folders: {configured})"
        )
    result = BackfillResult(dry_run=dry_run)
    unprocessed: list[int] = []
    with open_mailbox(account) as mailbox:
        for folder in chosen:
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
