"""The audit: is everything the server holds for a mailbox stored, and is every stored
object still in the store? For losses that came from outside the poll: a database
restored from an older backup, a local fallback directory wiped before `storage.sync`
moved it up, a bucket lifecycle rule, a bug.

For each folder the account polls (SELECT, then one UID SEARCH: `ImapSession.uid_ranges`,
compact ranges with ESEARCH), every server UID at or below the folder's cursor is
accounted for: stored (a row with its raw message), skipped (a row kept without it, with
the reason: too large, refused) or **missing** (no row). UIDs above the cursor are the
next poll's; UIDs the account's initial-sync policy left out on its first sync are not
expected (NEWEST: those below the oldest row; SINCE: those dated before the day).

Each stored row's objects (the raw message, its attachments) are looked for in the store
by listing the folder's prefix once per backend; a deep audit also reads each one and
compares its SHA-256 with the row's.

Repairs, exactly once: a missing message is fetched and stored by the poll's own code
(`mailbox.service.store_uids`, ON CONFLICT DO NOTHING on the message's identity, so two
audits or an audit and a poll never store it twice) and handed on as a new message: its
row is new, and its webhook deliveries went with the old row (they belong to it), so
there is no record of it having been handed on. A missing or altered object is fetched
again from the server and written back under its key only when the bytes hash to what
the row recorded: byte for byte the message stored the first time; its row is not handed
on again. Attachments come from parsing the raw message again.

`audit_account` is its own boundary (commits per folder, as a poll does); the latest
result per folder is a `FolderAudit` row. An audit that found anything sends
`account.audit` with the counts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, func, select, update
from sqlalchemy.orm import Session

from backend import dispatch
from backend.celery_app import AUDIT_TICK_SECONDS
from backend.config import get_settings
from backend.db import insert_for, session_scope
from backend.errors import NotFound
from backend.mailbox import budget, parsing
from backend.mailbox.imap import ERROR_TEXT_MAX, MAX_UID, ImapError, ImapSession
from backend.mailbox.parser import ParsedMessage
from backend.mailbox.service import open_mailbox, store_uids
from backend.mailbox.uidranges import UidRange, clip, count, expand, subtract, to_ranges
from backend.metrics import record_audit
from backend.models import (
    Account,
    Attachment,
    AuditOutcome,
    ErrorKind,
    EventType,
    FolderAudit,
    FolderCursor,
    InitialSync,
    Message,
    StorageBackend,
    WebhookDelivery,
    utcnow,
)
from backend.processing.service import hand_on
from backend.schedules.service import wanted_clause
from backend.storage import service as storage
from backend.storage.base import (
    StorageError,
    account_prefix,
    attachment_key,
    folder_part,
)
from backend.webhooks import service as webhooks

log = logging.getLogger(__name__)

RUN_TASK = "audit.run"
SCHEDULE_TASK = "audit.schedule"
MESSAGE_TYPE = "message/rfc822"
# Objects a deep audit reads at once.
DEEP_READ_THREADS = 8
# Bodies fetched again per round trip when objects are repaired.
REPAIR_CHUNK = 50
AUDITS = cast(Table, FolderAudit.__table__)


class _Object(NamedTuple):
    """A stored object a row points at (a tuple: a folder has 100,000 of them)."""

    message_id: int
    uid: int
    key: str
    backend: StorageBackend
    content_hash: str | None
    size: int
    content_type: str
    attachment_id: int | None  # None: the raw message


@dataclass
class FolderResult:
    folder: str
    outcome: AuditOutcome
    deep: bool
    started_at: datetime
    uidvalidity: int | None = None
    cursor: int | None = None
    server: int = 0
    expected: int = 0
    stored: int = 0
    skipped: int = 0
    missing: int = 0
    repaired: int = 0
    objects_checked: int = 0
    objects_missing: int = 0
    objects_repaired: int = 0
    error: str | None = None
    repaired_message_ids: list[int] = field(default_factory=list)

    @property
    def found_anything(self) -> bool:
        return bool(self.missing or self.objects_missing)

    def counts(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "outcome": self.outcome,
            "server": self.server,
            "expected": self.expected,
            "stored": self.stored,
            "skipped": self.skipped,
            "missing": self.missing,
            "repaired": self.repaired,
            "objects_checked": self.objects_checked,
            "objects_missing": self.objects_missing,
            "objects_repaired": self.objects_repaired,
        }


@dataclass
class AccountAudit:
    account_id: int
    deep: bool
    folders: list[FolderResult] = field(default_factory=list)
    # No connection slot came free on the host (budget.NoSlot): every folder skipped,
    # the audit to be sent again.
    no_slot: bool = False

    @property
    def found_anything(self) -> bool:
        return any(folder.found_anything for folder in self.folders)


# -- the task and its schedule ------------------------------------------------------------


def enqueue(account_id: int, *, deep: bool = False) -> None:
    """After the commit (in local mode it runs now, in this process)."""
    dispatch.enqueue(RUN_TASK, account_id, deep)


def get_account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found")
    return account


def run(account_id: int, deep: bool = False) -> str:
    """The task: audit one account; a failure is recorded per folder, never raised (a
    repeated audit is the retry). No connection slot free on the host is no failure: the
    folders say the audit waits for one, and it is sent again after
    CONNECTION_SLOT_WAIT_SECONDS."""
    try:
        result = audit_account(account_id, deep=deep)
    except NotFound:
        return "gone"
    if result.no_slot:
        dispatch.enqueue(RUN_TASK, account_id, deep, countdown=budget.again_seconds())
        return "no_slot"
    return "found" if result.found_anything else "clean"


dispatch.register(RUN_TASK, run)


def schedule_due(
    now: datetime | None = None, *, tick_seconds: int = AUDIT_TICK_SECONDS
) -> list[int]:
    """Periodic (every `tick_seconds`: beat's AUDIT_TICK_SECONDS, or the local
    scheduler's housekeeping): send the audits now due, spread so that each scheduled
    mailbox is audited once per AUDIT_INTERVAL_SECONDS: per tick, the share of the
    mailboxes one tick is of the interval, those audited longest ago first (never
    audited before all; never polled successfully, not yet). Returns the accounts sent."""
    settings = get_settings()
    interval = settings.audit_interval_seconds
    if interval <= 0:
        return []
    now = now or utcnow()
    # Scheduled and polled at least once (there is nothing to audit before).
    auditable = wanted_clause() & Account.last_success_at.is_not(None)
    with session_scope() as session:
        total = session.scalar(select(func.count(Account.id)).where(auditable)) or 0
        share = -(-total * tick_seconds // interval)  # rounded up
        due = list(
            session.scalars(
                select(Account.id)
                .where(
                    auditable,
                    (Account.audited_at.is_(None))
                    | (Account.audited_at <= now - timedelta(seconds=interval)),
                )
                .order_by(Account.audited_at.asc().nulls_first(), Account.id)
                .limit(share)
                .with_for_update(skip_locked=True)
            )
        )
        if due:
            session.execute(update(Account).where(Account.id.in_(due)).values(audited_at=now))
    for account_id in due:
        enqueue(account_id, deep=settings.audit_deep)
    return due


dispatch.register(SCHEDULE_TASK, schedule_due)


# -- reading results ------------------------------------------------------------------------


def latest(session: Session, account_id: int) -> list[FolderAudit]:
    get_account(session, account_id)
    return list(
        session.scalars(
            select(FolderAudit)
            .where(FolderAudit.account_id == account_id)
            .order_by(FolderAudit.folder)
        )
    )


# -- the audit --------------------------------------------------------------------------------


def audit_account(
    account_id: int,
    *,
    deep: bool = False,
    on_folder: Callable[[FolderResult], None] | None = None,
) -> AccountAudit:
    """Audit every folder the account polls and repair what is missing. Its own boundary:
    each folder's result commits as it is done. A folder that fails is recorded as
    failed and the others go on, unless the connection itself is lost. A mailbox never
    polled is not logged in to."""
    with session_scope() as session:
        account = get_account(session, account_id)
        folders = list(account.folders or ["INBOX"])
        polled = set(
            session.scalars(
                select(FolderCursor.folder).where(
                    FolderCursor.account_id == account_id, FolderCursor.last_uid > 0
                )
            )
        )
    result = AccountAudit(account_id=account_id, deep=deep)

    def done(entry: FolderResult) -> None:
        _record(account_id, entry)
        result.folders.append(entry)
        if on_folder is not None:
            on_folder(entry)

    # What the folders not audited are left with: none polled yet, or the session lost.
    error = _NOT_POLLED
    try:
        if polled & set(folders):
            with open_mailbox(account, purpose="audit") as mailbox:
                for folder in folders:
                    entry = _audit_folder_safely(mailbox, account, folder, deep=deep)
                    done(entry)
                    if entry.outcome == AuditOutcome.FAILED and entry.error == _LOST:
                        error = _LOST
                        break
    except budget.NoSlot as exc:  # raised before any folder: not the mailbox's failure
        error, result.no_slot = exc.message, True
        log.info("audit of account %s: %s", account_id, exc.message)
    except ImapError as exc:  # the login, or the connection lost between folders
        error = _first_line(exc)
    for folder in folders[len(result.folders) :]:
        failed = error != _NOT_POLLED and not result.no_slot
        outcome = AuditOutcome.FAILED if failed else AuditOutcome.SKIPPED
        done(FolderResult(folder, outcome, deep, started_at=utcnow(), error=error))
    _finish(account, result)
    return result


_NOT_POLLED = "not polled yet"
_LOST = "the connection to the server was lost"


def _audit_folder_safely(
    mailbox: ImapSession, account: Account, folder: str, *, deep: bool
) -> FolderResult:
    started = utcnow()
    try:
        entry = _audit_folder(mailbox, account, folder, deep=deep, started=started)
    except Exception as exc:
        lost = isinstance(exc, ImapError) and exc.kind != ErrorKind.PROTOCOL
        entry = FolderResult(
            folder,
            AuditOutcome.FAILED,
            deep,
            started_at=started,
            error=_LOST if lost else _first_line(exc),
        )
        log.warning("audit of account %s folder %r failed: %s", account.id, folder, entry.error)
    return entry


def _first_line(exc: BaseException) -> str:
    # Only the first line, cut: a driver's text may quote a message's content.
    text = exc.message if isinstance(exc, ImapError) else str(exc)
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0]}"[:ERROR_TEXT_MAX]


def _audit_folder(
    mailbox: ImapSession, account: Account, folder: str, *, deep: bool, started: datetime
) -> FolderResult:
    entry = FolderResult(folder, AuditOutcome.COMPLETE, deep, started_at=started)
    uidvalidity = mailbox.select(folder).uidvalidity
    entry.uidvalidity = uidvalidity
    with session_scope() as session:
        cursor = session.scalar(
            select(FolderCursor).where(
                FolderCursor.account_id == account.id, FolderCursor.folder == folder
            )
        )
        last_uid = cursor.last_uid if cursor is not None else 0
        renumbered = cursor is not None and cursor.uidvalidity != uidvalidity
    if renumbered or not last_uid:
        entry.outcome = AuditOutcome.SKIPPED
        entry.error = (
            "renumbered (UIDVALIDITY changed) since its last poll, which scans it again"
            if renumbered
            else _NOT_POLLED
        )
        return entry
    entry.cursor = last_uid
    server = mailbox.uid_ranges()
    entry.server = count(server)
    messages, objects = _stored(account.id, folder, uidvalidity)
    held = to_ranges(messages)
    expected = _expected(mailbox, account, clip(server, 1, last_uid), held)
    entry.expected = count(expected)
    entry.stored = sum(1 for skipped in messages.values() if not skipped)
    entry.skipped = len(messages) - entry.stored
    missing = subtract(expected, held)
    entry.missing = count(missing)

    broken = _broken_objects(account.id, folder, uidvalidity, objects, deep=deep)
    entry.objects_checked = len(objects)
    entry.objects_missing = len(broken)

    if missing:
        # Not missing: the same message (its EMAILID, X-GM-MSGID) is stored from
        # another folder, once (a Gmail label's folder beside INBOX).
        elsewhere: list[int] = []
        entry.repaired_message_ids = store_uids(
            mailbox, account, folder, uidvalidity, list(expand(missing)), elsewhere=elsewhere
        )
        entry.repaired = len(entry.repaired_message_ids)
        entry.missing -= len(elsewhere)
    if broken:
        entry.objects_repaired = _repair_objects(mailbox, account.id, folder, uidvalidity, broken)
    if entry.found_anything:
        log.warning(
            "audit of account %s folder %r: %s missing (%s stored again), %s objects missing "
            "(%s written again)",
            account.id,
            folder,
            entry.missing,
            entry.repaired,
            entry.objects_missing,
            entry.objects_repaired,
        )
    return entry


def _expected(
    mailbox: ImapSession, account: Account, below_cursor: list[UidRange], held: list[UidRange]
) -> list[UidRange]:
    """The server's UIDs at or below the cursor that polls should have stored: not those
    the initial-sync policy left out of the first sync."""
    if account.initial_sync == InitialSync.SINCE and account.initial_sync_since is not None:
        older = to_ranges(mailbox.search(before=account.initial_sync_since))
        return subtract(below_cursor, older)
    if account.initial_sync == InitialSync.NEWEST:
        # The first sync took the newest N: what lies below the oldest row was left out.
        oldest = held[0][0] if held else MAX_UID
        return clip(below_cursor, oldest, MAX_UID)
    return below_cursor


def _stored(
    account_id: int, folder: str, uidvalidity: int
) -> tuple[dict[int, bool], list[_Object]]:
    """The folder's rows under this UIDVALIDITY: {uid: skipped}, and their objects."""
    of_folder = (
        Message.account_id == account_id,
        Message.folder == folder,
        Message.uidvalidity == uidvalidity,
    )
    with session_scope() as session:
        rows = session.execute(
            select(
                Message.id,
                Message.uid,
                Message.storage_key,
                Message.storage_backend,
                Message.content_hash,
                Message.size,
            ).where(*of_folder)
        ).all()
        parts = session.execute(
            select(
                Attachment.message_id,
                Message.uid,
                Attachment.storage_key,
                Attachment.storage_backend,
                Attachment.content_hash,
                Attachment.size,
                Attachment.content_type,
                Attachment.id,
            )
            .join(Message, Message.id == Attachment.message_id)
            # Not those kept only inside the raw message: they have no object.
            .where(*of_folder, Attachment.storage_key.is_not(None))
        ).all()
    messages = {row[1]: row[2] is None for row in rows}
    objects = [
        _Object(message_id, uid, key, backend, content_hash, size, MESSAGE_TYPE, None)
        for message_id, uid, key, backend, content_hash, size in rows
        if key is not None and backend is not None
    ]
    objects += [_Object._make(part) for part in parts]
    return messages, objects


def _prefix(account_id: int, folder: str, uidvalidity: int) -> str:
    return f"{account_prefix(account_id)}{folder_part(folder)}/{uidvalidity}/"


def _broken_objects(
    account_id: int, folder: str, uidvalidity: int, objects: list[_Object], *, deep: bool
) -> list[_Object]:
    """The objects not in the store (any backend: a read falls back to the other one),
    and in a deep audit those whose bytes no longer hash to the row's hash. One listing
    per backend of the folder's prefix (and of each other one its objects sit under),
    not a request per object."""
    # A message moved here (from another folder, or from before a renumbering) keeps
    # its object where it was first written: that place is listed too.
    prefixes = {_prefix(account_id, folder, uidvalidity)}
    prefixes.update("/".join(item.key.split("/")[:4]) + "/" for item in objects)
    present: set[str] = set()
    for store in storage.backends():
        for prefix in sorted(prefixes):
            present.update(store.keys(prefix))
    broken = [item for item in objects if item.key not in present]
    if deep:
        listed = [item for item in objects if item.key in present]
        # Reads wait on the disk or on S3 (a round trip each): several at once.
        with ThreadPoolExecutor(DEEP_READ_THREADS, thread_name_prefix="audit-read") as pool:
            intact = list(pool.map(_intact, listed))
        broken += [item for item, ok in zip(listed, intact, strict=True) if not ok]
    return broken


def _intact(item: _Object) -> bool:
    try:
        digest = hashlib.sha256()
        for chunk in storage.iter_object(item.backend, item.key):
            digest.update(chunk)
    except StorageError:
        return False
    return item.content_hash is None or digest.hexdigest() == item.content_hash


def _repair_objects(
    mailbox: ImapSession, account_id: int, folder: str, uidvalidity: int, broken: list[_Object]
) -> int:
    """Write the broken objects again from the server's bytes, each only if it hashes to
    what its row recorded; the rows name the backend that now holds it. Returns how many
    were written."""
    by_message: dict[int, list[_Object]] = {}
    for item in broken:
        by_message.setdefault(item.message_id, []).append(item)
    written: list[tuple[_Object, StorageBackend]] = []
    message_ids = sorted(by_message)
    for start in range(0, len(message_ids), REPAIR_CHUNK):
        chunk = [by_message[message_id] for message_id in message_ids[start : start + REPAIR_CHUNK]]
        raws = _raw_messages(mailbox, account_id, chunk)
        for items in chunk:
            raw = raws.get(items[0].uid)
            if raw is None:
                continue  # expunged from the server, or altered there: nothing to restore
            written += _write_back(account_id, folder, uidvalidity, items, raw)
    storage.sync_local(item.key for item, backend in written if backend == StorageBackend.LOCAL)
    with session_scope() as session:
        for item, backend in written:
            if backend == item.backend:
                continue
            if item.attachment_id is None:
                session.execute(
                    update(Message)
                    .where(Message.id == item.message_id)
                    .values(storage_backend=backend)
                )
            else:
                session.execute(
                    update(Attachment)
                    .where(Attachment.id == item.attachment_id)
                    .values(storage_backend=backend)
                )
    return len(written)


def _raw_messages(
    mailbox: ImapSession, account_id: int, chunk: Sequence[list[_Object]]
) -> dict[int, bytes]:
    """{uid: raw message} for the messages of the chunk, as first stored: from the store
    when only attachments are broken and the raw message is intact, else from the
    server; bytes that do not hash to the row's hash are left out."""
    raws: dict[int, bytes] = {}
    wanted: dict[int, tuple[int, str | None]] = {}
    hashes = _message_hashes([items[0].message_id for items in chunk])
    for items in chunk:
        message_id, uid = items[0].message_id, items[0].uid
        size, content_hash, backend, key = hashes[message_id]
        if all(item.attachment_id is not None for item in items) and key and backend:
            try:
                raw = storage.get_object(backend, key)
            except StorageError:
                raw = b""
            if hashlib.sha256(raw).hexdigest() == content_hash:
                raws[uid] = raw
                continue
        wanted[uid] = (size, content_hash)
    fetched = mailbox.fetch_bodies({uid: size for uid, (size, _hash) in wanted.items()})
    for uid, raw in fetched.items():
        if hashlib.sha256(raw).hexdigest() == wanted[uid][1]:
            raws[uid] = raw
        else:
            log.warning(
                "audit of account %s: UID %s on the server is not the message stored",
                account_id,
                uid,
            )
    return raws


def _message_hashes(
    message_ids: Sequence[int],
) -> dict[int, tuple[int, str | None, StorageBackend | None, str | None]]:
    with session_scope() as session:
        return {
            message_id: (size, content_hash, backend, key)
            for message_id, size, content_hash, backend, key in session.execute(
                select(
                    Message.id,
                    Message.size,
                    Message.content_hash,
                    Message.storage_backend,
                    Message.storage_key,
                ).where(Message.id.in_(message_ids))
            )
        }


def _write_back(
    account_id: int, folder: str, uidvalidity: int, items: list[_Object], raw: bytes
) -> list[tuple[_Object, StorageBackend]]:
    written: list[tuple[_Object, StorageBackend]] = []
    parts: dict[str, bytes] = {}
    if any(item.attachment_id is not None for item in items):
        outcome = parsing.parse_all([raw])[0]
        if isinstance(outcome, ParsedMessage):
            for index, part in enumerate(outcome.attachments, start=1):
                key = attachment_key(
                    account_id,
                    folder,
                    uidvalidity,
                    items[0].uid,
                    index=index,
                    safe_name=part.safe_name,
                )
                parts[key] = part.data
    for item in items:
        # The raw message was checked against its row's hash already (`_raw_messages`).
        data = raw if item.attachment_id is None else parts.get(item.key)
        if data is None or hashlib.sha256(data).hexdigest() != item.content_hash:
            continue
        backend = storage.put_object(item.key, data, item.content_type, sync=False)
        written.append((item, backend))
    return written


def _record(account_id: int, entry: FolderResult) -> None:
    """The folder's latest audit, replacing the previous one."""
    values = {
        key: value for key, value in vars(entry).items() if key not in ("repaired_message_ids",)
    }
    values.update(account_id=account_id, finished_at=utcnow())
    with session_scope() as session:
        statement = insert_for(session, AUDITS).values(**values)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["account_id", "folder"],
                set_={key: statement.excluded[key] for key in values if key != "folder"},
            )
        )


def _finish(account: Account, result: AccountAudit) -> None:
    """Hand on what was stored again, count, and tell the receivers when anything was
    found (`account.audit`, with the counts)."""
    repaired = sorted(i for entry in result.folders for i in entry.repaired_message_ids)
    hand_on(repaired)
    record_audit(
        missing=sum(entry.missing for entry in result.folders),
        repaired=sum(entry.repaired for entry in result.folders),
        objects_missing=sum(entry.objects_missing for entry in result.folders),
        objects_repaired=sum(entry.objects_repaired for entry in result.folders),
    )
    delivery_ids: list[int] = []
    with session_scope() as session:
        row = session.get(Account, account.id)
        if row is None:
            return
        row.audited_at = utcnow()
        if result.found_anything:
            delivery_ids = webhooks.create_account_event(session, row, EventType.ACCOUNT_AUDIT)
            # The event carries the audit's counts beside the account.
            for delivery in session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.id.in_(delivery_ids))
            ):
                delivery.data = {
                    **(delivery.data or {}),
                    "audit": {
                        "deep": result.deep,
                        "folders": [entry.counts() for entry in result.folders],
                    },
                }
    webhooks.dispatch(delivery_ids)
