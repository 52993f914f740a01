"""Ingestion: poll an account's folders and store what is new, exactly once.

A message's identity is (account, folder, UIDVALIDITY, UID). Rows are inserted with
ON CONFLICT DO NOTHING, and the folder cursor moves in the same transaction as the
rows it covers, so a crash, a retry or a second poll running at the same time never
stores a message twice and never skips one. Objects (raw message, attachments) are
written before that transaction: an object without a row is overwritten by the retry,
a row without an object cannot happen.

`poll_account` is its own boundary: it commits once per batch and records the outcome
on the account and a PollRun row. Its caller hands the new messages on afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from sqlalchemy import ColumnElement, Table, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from backend import crypto
from backend.config import get_settings
from backend.db import session_scope
from backend.mailbox import imap, oauth
from backend.mailbox.imap import ImapAuthError, ImapError, ImapProtocolError
from backend.mailbox.parser import ParsedMessage, parse_message
from backend.models import (
    Account,
    AccountStatus,
    Attachment,
    ErrorKind,
    EventType,
    FolderCursor,
    Message,
    PollOutcome,
    PollRun,
    utcnow,
)
from backend.storage import service as storage
from backend.storage.base import attachment_key, message_key

log = logging.getLogger(__name__)

# A scheduled poll may run this much before backoff_until and still count as due:
# beat ticks about once a second, and backoff is measured from the failed poll's start.
BACKOFF_SLACK = timedelta(seconds=2)
# UIDs whose size / date / flags are asked for in one FETCH before bodies are fetched.
METADATA_CHUNK = 1000
# Bodies fetched in one round trip stay under this many bytes (one larger message is
# fetched alone), so a batch of big messages cannot exhaust a worker's memory.
BATCH_MAX_BYTES = 32 * 1024 * 1024
# Objects are written by this many threads while the poll parses the next message: a
# write is mostly waiting (fsync, or an S3 round trip), not Python.
STORE_THREADS = 8

# Core tables: rows are inserted in bulk without ORM objects.
MESSAGES = cast(Table, Message.__table__)
ATTACHMENTS = cast(Table, Attachment.__table__)


@dataclass
class PollResult:
    outcome: str  # a PollRun outcome
    new_message_ids: list[int] = field(default_factory=list)
    messages: int = 0
    bytes: int = 0
    error: str | None = None
    # "account.error" | "account.disabled" | "account.recovered": only when this poll
    # changed the account's status.
    account_event: str | None = None
    duration_seconds: float = 0.0
    poll_run_id: int | None = None


@dataclass
class FolderCheck:
    name: str
    ok: bool
    detail: str
    messages: int | None = None


@dataclass
class CheckResult:
    ok: bool
    stage: str  # the stage that failed, or "folder" (the last one) when everything worked
    detail: str
    folders: list[FolderCheck] = field(default_factory=list)


@dataclass
class _Fetched:
    uid: int
    size: int
    internal_date: datetime | None
    flags: list[str]
    body: bytes | None = None  # None: larger than MAX_MESSAGE_BYTES, not fetched
    content_hash: str | None = None  # sha256 hex of body


# A row and the write of its object: (storage backend, sha256 hex when asked for).
_Upload = tuple[dict[str, Any], Future[tuple[str, str | None]]]


def _put(key: str, data: bytes, content_type: str, *, hashed: bool) -> tuple[str, str | None]:
    """Write an object (and hash it, here in a writing thread rather than the parsing one)."""
    content_hash = hashlib.sha256(data).hexdigest() if hashed else None
    return storage.put_object(key, data, content_type), content_hash


@dataclass
class _Prepared:
    """A parsed batch whose objects are being written."""

    folder: str
    uidvalidity: int
    last_uid: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    attachments: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    uploads: list[_Upload] = field(default_factory=list)
    advance_cursor: bool = True


# -- credentials -------------------------------------------------------------------------


def _credential_loader(
    account: Account, save: Callable[[dict[str, Any]], None]
) -> Callable[[bool], dict[str, Any]]:
    """Decrypt the account's secrets; for XOAUTH2, refresh an expired access token (or
    any, when forced after a refused login) and hand the new tokens to `save`."""

    def load(force_refresh: bool) -> dict[str, Any]:
        try:
            credentials = crypto.decrypt_json(account.credentials_encrypted)
        except crypto.SecretDecryptError as exc:
            raise ImapAuthError(str(exc)) from exc
        if account.auth_method == "oauth2" and (force_refresh or oauth.needs_refresh(credentials)):
            credentials = oauth.refresh(credentials)
            save(credentials)
        return credentials

    return load


def _save_credentials(account_id: int) -> Callable[[dict[str, Any]], None]:
    def save(credentials: dict[str, Any]) -> None:
        # Committed at once: the provider may already have invalidated the old refresh token.
        with session_scope() as session:
            session.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(credentials_encrypted=crypto.encrypt_json(credentials))
            )

    return save


# -- the poll ----------------------------------------------------------------------------


def poll_account(account_id: int, *, task_id: str | None = None) -> PollResult:
    """Poll every folder of one account. Never raises for a mailbox's own failures: they
    are classified and recorded on the account and the PollRun row."""
    started = time.monotonic()
    started_at = utcnow()
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is None:
            return PollResult(outcome="skipped", error="no such account")
        reason = _skip_reason(account, started_at)
        run = PollRun(
            account_id=account_id,
            started_at=started_at,
            task_id=task_id,
            outcome="skipped" if reason else "running",
            error=reason,
            finished_at=started_at if reason else None,
        )
        session.add(run)
        session.flush()
        run_id = run.id
    if reason:
        return PollResult(
            outcome="skipped",
            error=reason,
            duration_seconds=time.monotonic() - started,
            poll_run_id=run_id,
        )

    poller = _Poller(account)
    error: ImapError | None = None
    try:
        client = imap.open_account(
            account, credentials=_credential_loader(account, _save_credentials(account_id))
        )
        try:
            error = poller.poll_folders(client)
        finally:
            imap.close(client)
    except ImapError as exc:
        error = exc
    except Exception as exc:
        log.exception("poll of account %s failed", account_id)
        error = ImapError(f"internal error: {type(exc).__name__}: {exc}")
        error.kind = "internal"

    outcome = PollOutcome.SUCCESS if error is None else PollOutcome.for_error(ErrorKind(error.kind))
    event = _finish(
        account_id,
        run_id,
        started_at=started_at,
        outcome=outcome,
        error=error,
        messages=len(poller.new_ids),
        bytes_=poller.new_bytes,
    )
    if error is not None:
        log.warning("poll of account %s: %s: %s", account_id, outcome, error.message)
    return PollResult(
        outcome=outcome,
        new_message_ids=poller.new_ids,
        messages=len(poller.new_ids),
        bytes=poller.new_bytes,
        error=None if error is None else error.message,
        account_event=event,
        duration_seconds=time.monotonic() - started,
        poll_run_id=run_id,
    )


def _skip_reason(account: Account, now: datetime) -> str | None:
    if not account.enabled or account.status == "disabled":
        return "account is disabled"
    if account.backoff_until is not None and account.backoff_until - BACKOFF_SLACK > now:
        return f"backing off until {account.backoff_until.isoformat()}"
    return None


def backoff_delay(account: Account, failures: int) -> timedelta:
    """The poll interval, doubled for every further consecutive failure, capped."""
    cap = get_settings().backoff_max_seconds
    seconds = account.poll_interval_seconds * 2 ** min(failures - 1, 32)
    return timedelta(seconds=min(seconds, cap))


def clear_backoff(account: Account) -> None:
    """For the accounts service when the credentials change: poll at the next tick
    instead of waiting out the backoff an authentication failure set. Only flushes."""
    account.backoff_until = None


def _finish(
    account_id: int,
    run_id: int,
    *,
    started_at: datetime,
    outcome: str,
    error: ImapError | None,
    messages: int,
    bytes_: int,
) -> str | None:
    """Record the poll on its PollRun row and the account's state; returns the account
    event when the account's status changed."""
    settings = get_settings()
    now = utcnow()
    event: str | None = None
    with session_scope() as session:
        run = session.get(PollRun, run_id)
        if run is not None:
            run.outcome = PollOutcome(outcome)
            run.finished_at = now
            run.messages_count = messages
            run.bytes_count = bytes_
            run.error = None if error is None else error.message
        account = session.get(Account, account_id, with_for_update=True)
        if account is None:  # deleted while we polled
            return None
        account.last_polled_at = now
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
        failures = account.consecutive_failures + 1
        account.consecutive_failures = failures
        account.last_error = error.message
        account.last_error_kind = ErrorKind(error.kind)
        if failures >= settings.max_consecutive_failures:
            if account.status != AccountStatus.DISABLED:
                event = EventType.ACCOUNT_DISABLED
            account.enabled = False
            account.status = AccountStatus.DISABLED
            account.backoff_until = None
            account.disabled_reason = (
                f"{failures} consecutive failed polls; the last: {error.message}"
            )
        else:
            if account.status == AccountStatus.ACTIVE:
                event = EventType.ACCOUNT_ERROR
                account.status = AccountStatus.ERROR
            account.backoff_until = started_at + backoff_delay(account, failures)
    return event


class _Poller:
    """One poll of one account: folder by folder, batch by batch."""

    def __init__(self, account: Account) -> None:
        settings = get_settings()
        self.account = account
        self.account_id = account.id
        self.batch_size = settings.imap_fetch_batch_size
        self.max_bytes = settings.max_message_bytes
        self.new_ids: list[int] = []
        self.new_bytes = 0

    @contextmanager
    def storing(self) -> Iterator[None]:
        """The threads that write objects, for the duration of a poll (or a backfill)."""
        with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="mailbox-store") as pool:
            self.pool = pool
            yield

    def poll_folders(self, client: IMAPClient) -> ImapError | None:
        """Poll each folder; a folder the server refuses does not stop the others, but a
        lost connection does. Returns the first folder error, if any."""
        with self.storing():
            return self._poll_folders(client)

    def _poll_folders(self, client: IMAPClient) -> ImapError | None:
        first_error: ImapError | None = None
        for folder in self.account.folders or ["INBOX"]:
            try:
                self.poll_folder(client, folder)
            except ImapProtocolError as exc:
                log.warning("account %s folder %r: %s", self.account_id, folder, exc.message)
                first_error = first_error or exc
            except (IMAPClientError, OSError, EOFError) as exc:
                error = imap.translate(exc, stage="folder")
                if error.kind != "protocol":
                    raise error from exc
                first_error = first_error or ImapProtocolError(f"folder {folder!r}: {error}")
        return first_error

    def poll_folder(self, client: IMAPClient, folder: str) -> None:
        info = client.select_folder(folder, readonly=True)
        uidvalidity = int(info[b"UIDVALIDITY"])
        cursor = self._cursor(folder, uidvalidity)
        if cursor is None:
            uids, ceiling = self._first_sync_selection(client, folder)
        else:
            # `UID n:*` always matches the newest message, even when its UID is below n.
            found = client.search(["UID", f"{cursor + 1}:*"])
            uids = sorted(uid for uid in found if uid > cursor)
            ceiling = max(uids, default=cursor)
        dedupe = self._has_other_generations(folder, uidvalidity)
        self.ingest(client, folder, uidvalidity, uids, dedupe=dedupe)
        if ceiling > (cursor or 0):
            # Messages the initial-sync policy left out stay behind the cursor for good.
            with session_scope() as session:
                self._advance_cursor(session, folder, uidvalidity, ceiling)

    def ingest(
        self,
        client: IMAPClient,
        folder: str,
        uidvalidity: int,
        uids: Sequence[int],
        *,
        dedupe: bool,
        advance_cursor: bool = True,
    ) -> None:
        """Fetch and store these UIDs (ascending) of the selected folder, batch by batch.

        Three stages overlap: a thread fetches batch N+1, this thread parses batch N,
        and one committing thread waits for batch N-1's objects, then inserts its rows
        and moves the cursor. Batches commit one at a time, in order."""
        committing: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="mailbox-commit") as committer:
            try:
                for batch in _prefetched(self._fetch(client, uids)):
                    prepared = self._prepare_batch(folder, uidvalidity, batch, dedupe=dedupe)
                    if committing is not None:
                        committing.result()  # at most one batch waits: bounded memory
                        committing = None
                    if prepared is not None:
                        prepared.advance_cursor = advance_cursor
                        committing = committer.submit(self._commit_batch, prepared)
            finally:
                if committing is not None:
                    committing.result()

    def _cursor(self, folder: str, uidvalidity: int) -> int | None:
        """The last UID stored under this UIDVALIDITY, or None when the folder is new or
        was renumbered (then the cursor is reset, and the folder is scanned again)."""
        with session_scope() as session:
            row = session.scalar(
                select(FolderCursor).where(
                    FolderCursor.account_id == self.account_id, FolderCursor.folder == folder
                )
            )
            if row is not None and row.uidvalidity == uidvalidity:
                return row.last_uid
            if row is None:
                session.execute(
                    _insert(session, FolderCursor)
                    .values(
                        account_id=self.account_id,
                        folder=folder,
                        uidvalidity=uidvalidity,
                        last_uid=0,
                        updated_at=utcnow(),
                    )
                    .on_conflict_do_nothing(index_elements=["account_id", "folder"])
                )
            else:
                log.warning(
                    "account %s folder %r: UIDVALIDITY %s -> %s, scanning it again",
                    self.account_id,
                    folder,
                    row.uidvalidity,
                    uidvalidity,
                )
                row.uidvalidity = uidvalidity
                row.last_uid = 0
                row.updated_at = utcnow()
        return None

    def _first_sync_selection(self, client: IMAPClient, folder: str) -> tuple[list[int], int]:
        """UIDs to fetch on a first sync (or a re-scan), and the cursor to end at."""
        everything = sorted(client.search("ALL"))
        ceiling = max(everything, default=0)
        policy = self.account.initial_sync
        if policy == "all":
            return everything, ceiling
        if policy == "newest":
            count = self.account.initial_sync_count or 0
            selected = set(everything[-count:] if count > 0 else [])
        else:
            since = self.account.initial_sync_since
            selected = set(client.search(["SINCE", since])) if since else set(everything)
        held_since = self._oldest_held(folder)
        if held_since is not None:
            # A re-scan: everything from the oldest message we held on, so mail that came
            # after the first sync is not left out by the first-sync policy.
            selected |= set(client.search(["SINCE", held_since]))
        return sorted(uid for uid in selected if uid <= ceiling), ceiling

    def _oldest_held(self, folder: str) -> date | None:
        with session_scope() as session:
            oldest = session.scalar(
                select(func.min(Message.internal_date)).where(
                    Message.account_id == self.account_id, Message.folder == folder
                )
            )
        if oldest is None:
            return None
        # SEARCH SINCE compares dates in the server's zone: a day earlier is safe.
        return (oldest.astimezone(UTC) - timedelta(days=1)).date()

    def _has_other_generations(self, folder: str, uidvalidity: int) -> bool:
        with session_scope() as session:
            return (
                session.scalar(
                    select(Message.id)
                    .where(
                        Message.account_id == self.account_id,
                        Message.folder == folder,
                        Message.uidvalidity != uidvalidity,
                    )
                    .limit(1)
                )
                is not None
            )

    def _fetch(self, client: IMAPClient, uids: Sequence[int]) -> Iterator[list[_Fetched]]:
        """Batches of fetched messages: sizes first, so an oversized message is recorded
        without downloading it, and a batch's bodies stay under BATCH_MAX_BYTES."""
        for start in range(0, len(uids), METADATA_CHUNK):
            chunk = list(uids[start : start + METADATA_CHUNK])
            meta = client.fetch(chunk, ["RFC822.SIZE", "INTERNALDATE", "FLAGS"])
            batch: list[_Fetched] = []
            batch_bytes = 0
            for uid in chunk:
                data = meta.get(uid)
                if data is None:
                    continue  # expunged since the search
                item = _Fetched(
                    uid=uid,
                    size=int(data.get(b"RFC822.SIZE", 0)),
                    internal_date=_aware(data.get(b"INTERNALDATE")),
                    # \Recent belongs to the session that saw the message first, not the message.
                    flags=[
                        _text(flag)
                        for flag in data.get(b"FLAGS", ())
                        if flag.lower() != b"\\recent"
                    ],
                )
                fetch_size = item.size if item.size <= self.max_bytes else 0
                if batch and (
                    len(batch) >= self.batch_size or batch_bytes + fetch_size > BATCH_MAX_BYTES
                ):
                    yield self._bodies(client, batch)
                    batch, batch_bytes = [], 0
                batch.append(item)
                batch_bytes += fetch_size
            if batch:
                yield self._bodies(client, batch)

    def _bodies(self, client: IMAPClient, batch: list[_Fetched]) -> list[_Fetched]:
        wanted = [item.uid for item in batch if item.size <= self.max_bytes]
        bodies = client.fetch(wanted, ["BODY.PEEK[]"]) if wanted else {}
        kept: list[_Fetched] = []
        for item in batch:
            if item.size > self.max_bytes:
                kept.append(item)
                continue
            body = bodies.get(item.uid, {}).get(b"BODY[]")
            if body is None:
                continue  # expunged between the two fetches
            item.body = bytes(body)
            item.size = len(item.body)
            # Hashed here, in the fetching thread, off the storing thread's path.
            item.content_hash = hashlib.sha256(item.body).hexdigest()
            kept.append(item)
        return kept

    def _prepare_batch(
        self, folder: str, uidvalidity: int, batch: list[_Fetched], *, dedupe: bool
    ) -> _Prepared | None:
        """Parse a batch and start writing its objects."""
        if not batch:
            return None
        hashes = {item.content_hash for item in batch if item.content_hash is not None}
        held = self._held_hashes(folder, uidvalidity, hashes) if dedupe else set()
        prepared = _Prepared(folder=folder, uidvalidity=uidvalidity, last_uid=batch[-1].uid)
        for item in batch:
            if item.content_hash is not None and item.content_hash in held:
                continue  # held from before the UIDVALIDITY change
            row, parts = self._prepare(folder, uidvalidity, item, prepared.uploads)
            prepared.rows.append(row)
            prepared.attachments[item.uid] = parts
        return prepared

    def _commit_batch(self, prepared: _Prepared | None) -> None:
        """Once every object of the batch is written, insert its rows and move the cursor
        in one transaction. A failed write fails the batch: nothing is committed."""
        if prepared is None:
            return
        for row, future in prepared.uploads:
            row["storage_backend"], content_hash = future.result()
            if content_hash is not None:
                row["content_hash"] = content_hash
        folder, uidvalidity, last_uid = prepared.folder, prepared.uidvalidity, prepared.last_uid
        rows, attachments = prepared.rows, prepared.attachments
        with session_scope() as session:
            inserted: list[tuple[int, int, int]] = []
            if rows:
                # executemany: the statement is compiled once and cached, and the driver
                # sends the rows in multi-row INSERTs (insertmanyvalues).
                inserted = [
                    (row.id, row.uid, row.size)
                    for row in session.connection().execute(
                        _insert(session, MESSAGES)
                        .on_conflict_do_nothing(
                            index_elements=["account_id", "folder", "uidvalidity", "uid"]
                        )
                        .returning(Message.id, Message.uid, Message.size),
                        rows,
                    )
                ]
            attachment_rows = [
                {**part, "message_id": message_id}
                for message_id, uid, _size in inserted
                for part in attachments[uid]
            ]
            if attachment_rows:
                session.connection().execute(insert(ATTACHMENTS), attachment_rows)
            if inserted:
                session.execute(
                    update(Account)
                    .where(Account.id == self.account_id)
                    .values(message_count=Account.message_count + len(inserted))
                )
            if prepared.advance_cursor:
                self._advance_cursor(session, folder, uidvalidity, last_uid)
        self.new_ids.extend(sorted(message_id for message_id, _uid, _size in inserted))
        self.new_bytes += sum(size for _id, _uid, size in inserted)

    def _held_hashes(self, folder: str, uidvalidity: int, hashes: set[str]) -> set[str]:
        if not hashes:
            return set()
        with session_scope() as session:
            return set(
                session.scalars(
                    select(Message.content_hash).where(
                        Message.account_id == self.account_id,
                        Message.folder == folder,
                        Message.uidvalidity != uidvalidity,
                        Message.content_hash.in_(hashes),
                    )
                )
            )

    def _prepare(
        self, folder: str, uidvalidity: int, item: _Fetched, uploads: list[_Upload]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Store the message's objects; return its row and its attachment rows."""
        row: dict[str, Any] = {
            "account_id": self.account_id,
            "folder": folder,
            "uidvalidity": uidvalidity,
            "uid": item.uid,
            "message_id": None,
            "subject": None,
            "from_addr": None,
            "to_addrs": [],
            "cc_addrs": [],
            "date": None,
            "internal_date": item.internal_date,
            "flags": item.flags,
            "size": item.size,
            "content_hash": item.content_hash,
            "text_body": None,
            "html_body": None,
            "storage_backend": None,
            "storage_key": None,
            "parse_error": None,
            "skipped_reason": None,
            "ingested_at": utcnow(),
        }
        if item.body is None:
            row["skipped_reason"] = (
                f"larger than MAX_MESSAGE_BYTES ({item.size} > {self.max_bytes} bytes)"
            )
            return row, []
        key = message_key(self.account_id, folder, uidvalidity, item.uid)
        self._upload(uploads, row, key, item.body, "message/rfc822", hash_it=False)
        try:
            parsed = parse_message(item.body)
        except Exception as exc:
            row["parse_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            return row, []
        row.update(_parsed_fields(parsed))
        parts = []
        for index, attachment in enumerate(parsed.attachments, start=1):
            part_key = attachment_key(
                self.account_id,
                folder,
                uidvalidity,
                item.uid,
                index=index,
                safe_name=attachment.safe_name,
            )
            part = {
                "filename": attachment.filename,
                "safe_name": attachment.safe_name,
                "content_type": attachment.content_type,
                "content_id": attachment.content_id,
                "size": len(attachment.data),
            }
            self._upload(
                uploads, part, part_key, attachment.data, attachment.content_type, hash_it=True
            )
            parts.append(part)
        return row, parts

    def _upload(
        self,
        uploads: list[_Upload],
        row: dict[str, Any],
        key: str,
        data: bytes,
        content_type: str,
        *,
        hash_it: bool,
    ) -> None:
        """Write an object in a writing thread; `hash_it`: also set the row's content
        hash there (messages are hashed by the fetching thread already)."""
        row["storage_key"] = key
        uploads.append((row, self.pool.submit(_put, key, data, content_type, hashed=hash_it)))

    def _advance_cursor(self, session: Session, folder: str, uidvalidity: int, uid: int) -> None:
        # Never backwards (a concurrent poll may be ahead); never under another UIDVALIDITY.
        session.execute(
            update(FolderCursor)
            .where(
                FolderCursor.account_id == self.account_id,
                FolderCursor.folder == folder,
                FolderCursor.uidvalidity == uidvalidity,
            )
            .values(last_uid=_greatest(session, FolderCursor.last_uid, uid), updated_at=utcnow())
        )


def _prefetched(batches: Iterator[list[_Fetched]]) -> Iterator[list[_Fetched]]:
    """Fetch the next batch in a thread while the caller stores this one: the server, the
    socket and the parser then work at the same time. Errors reach the caller in order."""
    ready: queue.Queue[list[_Fetched] | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ready.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)

    producer = threading.Thread(target=produce, name="mailbox-fetch", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while producer.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.5)
        producer.join()


def _parsed_fields(parsed: ParsedMessage) -> dict[str, Any]:
    return {
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "from_addr": parsed.from_addr,
        "to_addrs": parsed.to_addrs,
        "cc_addrs": parsed.cc_addrs,
        "date": parsed.date,
        "text_body": parsed.text_body,
        "html_body": parsed.html_body,
    }


def _insert(session: Session, table: type[Any] | Table) -> Any:
    """INSERT with ON CONFLICT for the session's database (PostgreSQL or SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _greatest(session: Session, column: Any, value: int) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.greatest(column, value)
    return func.max(column, value)  # SQLite's two-argument max() is scalar


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- backfill (backend/processing/backfill.py) ---------------------------------------------


@contextmanager
def open_mailbox(account: Account) -> Iterator[IMAPClient]:
    """A logged-in connection to the account's server, made as a poll makes it."""
    client = imap.open_account(
        account, credentials=_credential_loader(account, _save_credentials(account.id))
    )
    try:
        yield client
    finally:
        imap.close(client)


def store_uids(
    client: IMAPClient, account: Account, folder: str, uidvalidity: int, uids: Sequence[int]
) -> list[int]:
    """Fetch and store these UIDs of the selected folder as a poll does (what is held
    already is not stored again), without moving the folder cursor: UIDs picked out of
    order must not make the next poll skip the ones between. Returns the new message ids
    for the caller to hand on."""
    poller = _Poller(account)
    with poller.storing():
        dedupe = poller._has_other_generations(folder, uidvalidity)
        poller.ingest(
            client, folder, uidvalidity, sorted(uids), dedupe=dedupe, advance_cursor=False
        )
    return poller.new_ids


# -- checking an account -----------------------------------------------------------------


def check_account(account: Account, *, timeout: float) -> CheckResult:
    """Try the account's server, credentials and folders now. A refreshed XOAUTH2 token
    is set on `account`; the caller's commit keeps it."""

    def keep(credentials: dict[str, Any]) -> None:
        account.credentials_encrypted = crypto.encrypt_json(credentials)

    try:
        client = imap.open_account(
            account,
            credentials=_credential_loader(account, keep),
            connect_timeout=timeout,
            read_timeout=timeout,
        )
    except ImapError as exc:
        return CheckResult(ok=False, stage=exc.stage, detail=exc.message)
    folders: list[FolderCheck] = []
    try:
        for folder in account.folders or ["INBOX"]:
            try:
                info = client.select_folder(folder, readonly=True)
            except (IMAPClientError, OSError, EOFError) as exc:
                error = imap.translate(exc, stage="folder")
                folders.append(FolderCheck(name=folder, ok=False, detail=error.message))
                if error.kind != "protocol":
                    break
                continue
            count = int(info.get(b"EXISTS", 0))
            folders.append(
                FolderCheck(name=folder, ok=True, detail=f"{count} messages", messages=count)
            )
    finally:
        imap.close(client)
    failed = [check for check in folders if not check.ok]
    if failed:
        return CheckResult(
            ok=False,
            stage="folder",
            detail="; ".join(f"{check.name}: {check.detail}" for check in failed),
            folders=folders,
        )
    return CheckResult(ok=True, stage="folder", detail="ok", folders=folders)
