"""Ingestion: poll an account's folders and store what is new, exactly once.

A message's identity is (account, folder, UIDVALIDITY, UID). Rows are inserted with
ON CONFLICT DO NOTHING, and the folder cursor moves in the same transaction as the
rows it covers, so a crash, a retry or a second poll running at the same time never
stores a message twice and never skips one. Objects (raw message, attachments) are
written before that transaction: an object without a row is overwritten by the retry,
a row without an object cannot happen.

`poll_account` is its own boundary: it commits once per batch and records the outcome
on the account and a PollRun row. Its caller (backend/mailbox/polling.py) hands the new
messages on afterwards.

This module fetches, parses and stores. Around it: the IMAP commands are `ImapSession`
(backend/mailbox/imap.py), its sessions kept between polls backend/mailbox/pool.py, the
cursor SQL backend/mailbox/cursors.py, the account's status, backoff and events
backend/accounts/state.py, the secrets backend/mailbox/credentials.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session

from backend.accounts import state
from backend.config import get_settings
from backend.db import bulk_insert, insert_for, session_scope
from backend.mailbox import budget, changes, credentials, cursors, folders, imap, parsing, pool
from backend.mailbox.imap import (
    ERROR_TEXT_MAX,
    MAX_UID,
    ImapError,
    ImapLiteralRefused,
    ImapProtocolError,
    ImapSession,
    ImapThrottled,
)
from backend.mailbox.parser import ParsedMessage
from backend.mailbox.progress import OnProgress, SyncProgress
from backend.models import (
    Account,
    Attachment,
    ErrorKind,
    EventType,
    InitialSync,
    Message,
    PollOutcome,
    PollRun,
    StorageBackend,
    utcnow,
)
from backend.storage import service as storage
from backend.storage.base import attachment_key, message_key

log = logging.getLogger(__name__)

# UIDs whose size / date / flags are asked for in one FETCH before bodies are fetched.
METADATA_CHUNK = 1000
# Bodies fetched in one round trip stay under this many bytes (one larger message is
# fetched alone), so a batch of big messages cannot exhaust a worker's memory.
BATCH_MAX_BYTES = 32 * 1024 * 1024
# A poll still "running" this long after its hard time limit was killed with its worker.
DEAD_RUN_MARGIN_SECONDS = 60
DEAD_RUN = (
    "the poll never finished: its worker was killed (out of memory, SIGKILL, a lost host, "
    "or the hard time limit POLL_TIME_LIMIT_SECONDS)"
)
LOST_LEASE = "lost the mailbox to a newer poll (this one stalled past MAILBOX_LEASE_SECONDS)"
# Objects are written by this many threads while the poll parses the next message: a
# write is mostly waiting (fsync, or an S3 round trip), not Python.
STORE_THREADS = 8
# Batches committed, and fetched ahead, at once by this many threads: one each per poll
# running in the process (the local scheduler runs several in threads).
POLL_THREADS = 32
# A poll forgets its object writes that have ended once it has this many.
WRITES_PRUNED_AT = 1000

# Core tables: rows are inserted in bulk without ORM objects.
MESSAGES = cast(Table, Message.__table__)
ATTACHMENTS = cast(Table, Attachment.__table__)
# A message's identity, unique in the table.
MESSAGE_KEY = ("account_id", "folder", "uidvalidity", "uid")


@dataclass
class PollResult:
    outcome: PollOutcome
    new_message_ids: list[int] = field(default_factory=list)
    messages: int = 0
    bytes: int = 0
    error: str | None = None
    # The account is deleted or disabled: nothing was polled, nor recorded.
    stale: bool = False
    # Only when this poll changed the account's status (see backend/accounts/state.py).
    account_event: EventType | None = None
    duration_seconds: float = 0.0
    poll_run_id: int | None = None


@dataclass
class _Fetched:
    uid: int
    size: int
    internal_date: datetime | None
    flags: list[str]
    email_id: str | None = None  # the server's identity across folders, if it has one
    thread_id: str | None = None
    labels: list[str] | None = None  # Gmail's
    # Its identity is held by a stored message: the same message, neither fetched nor
    # stored again. From this folder (renumbered, or gone and back): it is moved here.
    held: bool = False
    holder: cursors.Holder | None = None
    body: bytes | None = None  # None: larger than MAX_MESSAGE_BYTES, not fetched
    content_hash: str | None = None  # sha256 hex of body


# A row and the write of its object (to the storage backend the future returns).
_Upload = tuple[dict[str, Any], Future[StorageBackend]]


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
    # Messages held from this folder, found at another (UIDVALIDITY, UID): moved there.
    relocations: list[tuple[cursors.Holder, int, int]] = field(default_factory=list)
    fetched: int = 0  # UIDs the batch covers, stored or not (for the sync's progress)
    # The rows whose bytes are being parsed, and the parse's outcomes in the same order
    # (started by `_Poller._start_batch`, collected by `_finish_batch`).
    to_parse: list[tuple[dict[str, Any], _Fetched]] = field(default_factory=list)
    outcomes: Callable[[], list[parsing.Stored]] | None = None


# -- the poll ----------------------------------------------------------------------------


def open_mailbox(
    account: Account, *, purpose: str = "poll", wait: float | None = None, leave: int = 0
) -> ImapSession:
    """A logged-in session on the account's server (a context manager), as a poll makes
    it: first a slot in the host's connection budget (backend/mailbox/budget.py), waited
    for up to `wait` seconds (budget.NoSlot when none came free), held until it closes;
    `leave` slots of the host stay free for others."""
    return budget.connect(
        account.imap_host,
        account.username,
        purpose,
        lambda: imap.open_account(account, credentials=credentials.loader(account)),
        wait=wait,
        leave=leave,
    )


def open_held(account: Account, purpose: str) -> ImapSession:
    """A session a watcher holds for good (IDLE, held checks): never on a host that
    throttled the connections (ImapThrottled until its wait is over: a throttled host
    allows one connection, the polls'), and never the host's last slot (no waiting:
    budget.NoSlot, an ImapError, is a retry later)."""
    until = budget.throttled_until(account.imap_host)
    if until is not None:
        raise imap.ImapThrottled(
            f"{account.imap_host} throttled the connections: waiting its turn",
            stage="connect",
            retry_after=until - time.time(),
            host_wide=False,
        )
    return open_mailbox(account, purpose=purpose, wait=0, leave=1)


def poll_account(
    account_id: int,
    *,
    task_id: str | None = None,
    force: bool = False,
    on_progress: OnProgress | None = None,
    lease_lost: threading.Event | None = None,
) -> PollResult:
    """Poll every folder of one account. Never raises for a mailbox's own failures: they
    are classified and recorded on the account and the PollRun row. `force` polls
    through a backoff (see accounts/state.skip_reason).

    `lease_lost`: this poll holds the mailbox's lease (backend/mailbox/lock.py), and the
    event is set once the lease is found lost. The poll then takes the account's next
    fencing token, every one of its writes is fenced with it, and any other poll of the
    mailbox still "running" is dead (or stalled, and fenced out): it is closed at once.

    A poll that finds nothing new costs two transactions: this first one (the account,
    its PollRun row, the UIDNEXT each folder had) and `_finish`."""
    started = time.monotonic()
    started_at = utcnow()
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is None or not state.wants_polls(account):
            why = "no such account" if account is None else "account is disabled"
            return PollResult(outcome=PollOutcome.SKIPPED, error=why, stale=True)
        if _close_dead_runs(session, account_id, started_at, all_others=lease_lost is not None):
            session.refresh(account)
        fence = None if lease_lost is None else cursors.take_fence(session, account_id)
        reason = state.skip_reason(account, started_at, force=force)
        run = PollRun(
            account_id=account_id,
            started_at=started_at,
            task_id=task_id,
            outcome=PollOutcome.SKIPPED if reason else PollOutcome.RUNNING,
            error=reason,
            finished_at=started_at if reason else None,
        )
        session.add(run)
        session.flush()
        run_id = run.id
        seen = cursors.seen_uidnext(session, account_id)
    if reason:
        return PollResult(
            outcome=PollOutcome.SKIPPED,
            error=reason,
            duration_seconds=time.monotonic() - started,
            poll_run_id=run_id,
        )

    progress = SyncProgress(account.sync_progress, on_progress)
    poller = _Poller(account, seen, progress, changes.Tracker(account))
    poller.fence, poller.lease_lost = fence, lease_lost
    error: ImapError | None = None
    note: str | None = None
    lost: cursors.LeaseLost | None = None
    try:
        # A session kept from this mailbox's last poll in this process, or a new one.
        with pool.session(account, open_mailbox) as mailbox:
            # Whatever the server does (a trickle, a hang), the poll ends by then.
            mailbox.arm_deadline(
                get_settings().poll_deadline_seconds - (time.monotonic() - started)
            )
            try:
                error = poller.poll_folders(mailbox, started_at, force=force)
            finally:
                note = _ignored_uids_note(account_id, mailbox.ignored_uids)
            if error is not None:
                mailbox.close()  # a folder refused: not kept
    except budget.NoSlot as exc:
        # Not the mailbox's failure: the host has all the connections it may have.
        _record_run(run_id, outcome=PollOutcome.NO_SLOT, error=exc.message, messages=0, bytes_=0)
        log.info("poll of account %s: %s", account_id, exc.message)
        return PollResult(
            outcome=PollOutcome.NO_SLOT,
            error=exc.message,
            duration_seconds=time.monotonic() - started,
            poll_run_id=run_id,
        )
    except ImapError as exc:
        error = exc
    except cursors.LeaseLost as exc:
        lost = exc
    except Exception as exc:
        # The traceback and the text may carry a message's content (an SQL statement's
        # parameters): the log gets the first line of the text, cut, and no traceback.
        # A codec's error names the character it failed on and where: it may be a
        # secret's, so only its kind is kept.
        first_line = "" if isinstance(exc, UnicodeError) else (str(exc).splitlines() or [""])[0]
        error = ImapError(f"internal error: {type(exc).__name__}: {first_line}"[:ERROR_TEXT_MAX])
        error.kind = ErrorKind.INTERNAL
        log.error("poll of account %s failed: %s", account_id, error.message)

    if lost is not None:
        # Not the mailbox's failure: its new poll goes on; this one only says where it
        # stopped, and leaves the account to that poll.
        log.warning("poll of account %s: %s: it stops here", account_id, lost)
        _record_run(
            run_id,
            outcome=PollOutcome.SKIPPED,
            error=f"{LOST_LEASE}; {len(poller.new_ids)} messages stored before that",
            messages=len(poller.new_ids),
            bytes_=poller.new_bytes,
        )
        return PollResult(
            outcome=PollOutcome.SKIPPED,
            new_message_ids=poller.new_ids,
            messages=len(poller.new_ids),
            bytes=poller.new_bytes,
            error=LOST_LEASE,
            duration_seconds=time.monotonic() - started,
            poll_run_id=run_id,
        )
    outcome = PollOutcome.SUCCESS if error is None else PollOutcome.for_error(error.kind)
    if isinstance(error, ImapThrottled) and error.host_wide:
        # The host's other mailboxes slow down with this one (one connection at a time).
        budget.throttled(account.imap_host, state.throttle_delay(error).total_seconds())
    if error is None and poller.failed:
        failed = "; ".join(exc.message for exc in poller.failed.values())
        note = f"{note}; {failed}" if note else failed
    event = _finish(
        account_id,
        run_id,
        started_at=started_at,
        outcome=outcome,
        error=error,
        messages=len(poller.new_ids),
        bytes_=poller.new_bytes,
        note=note,
        uidnexts=poller.uidnexts,
        # A mailbox that failed as a whole keeps its folders' errors as they were.
        polled=poller.polled if error is None else None,
        tried=poller.tried,
        failed=poller.failed,
        # What no transaction of the poll wrote: a sync's start, a first tracking state.
        account_values={**progress.unwritten(), **poller.changes.unwritten()},
        fence=fence,
    )
    pool.settle()  # the session it let go is logged out meanwhile
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


def _finish(
    account_id: int,
    run_id: int,
    *,
    started_at: datetime,
    outcome: PollOutcome,
    error: ImapError | None,
    messages: int,
    bytes_: int,
    note: str | None = None,
    uidnexts: dict[str, tuple[int, int]] | None = None,
    polled: list[str] | None = None,
    tried: list[str] | None = None,
    failed: dict[str, ImapError] | None = None,
    account_values: dict[str, Any] | None = None,
    fence: int | None = None,
) -> EventType | None:
    """Record the poll on its PollRun row and the account's state, in one transaction;
    returns the account event when the account's status changed. `note`: something a
    successful poll left out (absurd UIDs, a folder that failed), kept on the PollRun.
    `uidnexts`: the (UIDVALIDITY, UIDNEXT) of each folder the poll went through
    completely. `polled`, `tried` and `failed`: the folders it was to go through, those
    that were due and those that failed (`polled` None: it never got to them, and the
    folders' errors stay as they were). `account_values`: more of the account's columns
    to set (what no transaction of the poll wrote: a sync's start, a first tracking
    state), left out when `fence` (the poll's token) is no longer the account's: a
    newer poll has the mailbox and writes its own."""
    now = utcnow()
    if error is not None:
        error.message = error.message[:ERROR_TEXT_MAX]
    with session_scope() as session:
        _record_run(
            run_id,
            outcome=outcome,
            error=note if error is None else error.message,
            messages=messages,
            bytes_=bytes_,
            session=session,
            now=now,
        )
        # The account row (locked by record_poll) before the cursor rows, the order a
        # batch locks them in: a poll finishing while another stores cannot deadlock.
        event = state.record_poll(session, account_id, started_at=started_at, now=now, error=error)
        # The row record_poll loaded, before an update below flushes it (and expires it).
        account = session.get(Account, account_id)
        if account is not None:
            if polled is not None:
                state.record_folders(
                    account, started_at, polled=polled, tried=tried or [], failed=failed or {}
                )
            if fence is None or account.poll_fence == fence:
                for column, value in (account_values or {}).items():
                    setattr(account, column, value)  # flushed with record_poll's changes
        for folder, (uidvalidity, uidnext) in (uidnexts or {}).items():
            cursors.saw_uidnext(session, account_id, folder, uidvalidity, uidnext)
        return event


def _record_run(
    run_id: int,
    *,
    outcome: PollOutcome,
    error: str | None,
    messages: int,
    bytes_: int,
    session: Session | None = None,
    now: datetime | None = None,
) -> None:
    """Close the poll's PollRun row (in the caller's transaction, or its own)."""
    values = {
        "outcome": outcome,
        "finished_at": now or utcnow(),
        "messages_count": messages,
        "bytes_count": bytes_,
        "error": error,
    }
    if session is not None:
        session.execute(update(PollRun).where(PollRun.id == run_id).values(**values))
        return
    with session_scope() as own:
        own.execute(update(PollRun).where(PollRun.id == run_id).values(**values))


def _close_dead_runs(
    session: Session, account_id: int, now: datetime, *, all_others: bool = False
) -> bool:
    """Close this account's polls that never finished: their worker was killed (SIGKILL,
    out of memory, the hard time limit) before it could record anything. `all_others`:
    the caller holds the mailbox's lease, so every other running poll is dead (or
    stalled past its lease, and fenced out). Without a lease (local mode), only a poll
    past the hard time limit is known to be dead."""
    query = select(PollRun).where(
        PollRun.account_id == account_id, PollRun.outcome == PollOutcome.RUNNING
    )
    if not all_others:
        limit = now - timedelta(
            seconds=get_settings().poll_time_limit_seconds + DEAD_RUN_MARGIN_SECONDS
        )
        query = query.where(PollRun.started_at < limit)
    dead = session.scalars(query.order_by(PollRun.id).with_for_update(skip_locked=True)).all()
    close_dead_runs(session, dead, now)
    return bool(dead)


def close_dead_runs(session: Session, runs: Sequence[PollRun], now: datetime) -> None:
    """Record these polls as killed. Each counts as a failure of its mailbox, so one that
    kills its worker again and again backs off and is disabled in the end like any
    failing mailbox; but a first one in a row sets no backoff: a worker killed for
    reasons of its own (out of memory, a lost host, a deployment) must not keep its
    mailboxes waiting an interval. A disabled mailbox's run is only closed (its state
    stays as it is)."""
    for run in runs:
        error = ImapError(DEAD_RUN)
        error.kind = ErrorKind.INTERNAL
        run.outcome = PollOutcome.INTERNAL_ERROR
        run.finished_at = now
        run.error = error.message
        account = session.get(Account, run.account_id)
        if account is not None and state.wants_polls(account):
            state.record_poll(session, run.account_id, started_at=now, now=now, error=error)
            if account.consecutive_failures == 1:
                state.clear_backoff(account)
        log.warning("poll run %s of account %s: %s", run.id, run.account_id, error.message)
    session.flush()


def _ignored_uids_note(account_id: int, uids: Sequence[int]) -> str | None:
    if not uids:
        return None
    shown = ", ".join(str(uid) for uid in sorted(set(uids))[:5])
    note = f"ignored {len(set(uids))} UIDs outside 1..{MAX_UID} (RFC 3501): {shown}"
    log.warning("poll of account %s: %s", account_id, note)
    return note[:ERROR_TEXT_MAX]


def store_uids(
    mailbox: ImapSession,
    account: Account,
    folder: str,
    uidvalidity: int,
    uids: Sequence[int],
    *,
    elsewhere: list[int] | None = None,
) -> list[int]:
    """For backfill (backend/processing/backfill.py): fetch and store these UIDs of the
    selected folder as a poll does (what is held already is not stored again), without
    moving the folder cursor: UIDs picked out of order must not make the next poll skip
    the ones between. Returns the new message ids for the caller to hand on; `elsewhere`
    gets the UIDs not stored because a message stored from another folder is the same
    (its EMAILID or X-GM-MSGID)."""
    with session_scope() as session:
        match_below = cursors.held(session, account.id, folder, uidvalidity).match_below
    poller = _Poller(account)
    with poller.storing():
        poller.ingest(
            mailbox,
            folder,
            uidvalidity,
            sorted(uids),
            match_below=match_below,
            advance_cursor=False,
        )
    if elsewhere is not None:
        elsewhere += poller.elsewhere
    return poller.new_ids


class _Poller:
    """One poll of one account: folder by folder, batch by batch."""

    def __init__(
        self,
        account: Account,
        seen: dict[str, tuple[int, int]] | None = None,
        progress: SyncProgress | None = None,
        tracker: changes.Tracker | None = None,
    ) -> None:
        settings = get_settings()
        parsing.relax_gc()
        self.account = account
        self.account_id = account.id
        # (UIDVALIDITY, UIDNEXT) by folder: as the last complete poll saw them, and as
        # this one saw them before searching each folder it went through completely.
        self.seen = seen or {}
        self.uidnexts: dict[str, tuple[int, int]] = {}
        self.batch_size = settings.imap_fetch_batch_size
        self.max_bytes = settings.max_message_bytes
        self.inline_max = settings.attachment_inline_max_bytes
        self.new_ids: list[int] = []
        self.new_bytes = 0
        # UIDs not stored: a message stored from another folder is the same one.
        self.elsewhere: list[int] = []
        # Stored messages this poll moves to a new (UIDVALIDITY, UID) of their folder.
        self.relocated: set[int] = set()
        # The folders this poll was to go through, and those that failed (poll_folders).
        self.polled: list[str] | None = None
        self.tried: list[str] = []
        self.failed: dict[str, ImapError] = {}
        # None for a backfill, which stores outside the sync.
        self.progress = progress
        # Flags, deletions and moves (backend/mailbox/changes.py); off for a backfill.
        self.changes = tracker or changes.Tracker(account, enabled=False)
        # The poll's fencing token and its lease's loss (see poll_account); None when
        # the poll holds no lease (local mode, a backfill).
        self.fence: int | None = None
        self.lease_lost: threading.Event | None = None
        # Where this poll's batch commits have moved each folder's cursor to.
        self.cursor_at: dict[str, int] = {}
        # Its object writes not known to have ended (`storing`).
        self.writes: list[Future[StorageBackend]] = []

    def fenced(self, session: Session) -> None:
        """Before any write of the poll: raise LeaseLost if another poll has taken the
        mailbox (the account row then stays locked to the end of the transaction)."""
        if self.lease_lost is not None and self.lease_lost.is_set():
            raise cursors.LeaseLost(f"the lease of mailbox {self.account_id} was lost")
        if self.fence is not None:
            cursors.hold_fence(session, self.account_id, self.fence)

    @contextmanager
    def storing(self) -> Iterator[None]:
        """For the duration of a poll (or a backfill): its objects are written by the
        process's writing threads, and none is still being written when it ends."""
        self.writes = []
        try:
            yield
        finally:
            wait(self.writes)

    def poll_folders(
        self, mailbox: ImapSession, started_at: datetime, *, force: bool = False
    ) -> ImapError | None:
        """Poll each folder that is due (one that failed waits out its own backoff, unless
        `force`); a folder the server refuses does not stop the others, but a lost
        connection does. Returns an error only when every folder tried failed: then the
        mailbox failed."""
        self.polled = folders.for_account(self.account_id, self.account.folders, mailbox)
        due = [f for f in self.polled if state.folder_due(self.account, f, started_at)]
        if force or not due:
            due = self.polled
        self.tried = due
        with self.storing():
            for folder in due:
                try:
                    self.poll_folder(mailbox, folder)
                except ImapError as exc:
                    if exc.kind != ErrorKind.PROTOCOL:
                        raise
                    log.warning("account %s folder %r: %s", self.account_id, folder, exc.message)
                    self.failed[folder] = ImapProtocolError(f"folder {folder!r}: {exc}")
            self.new_ids = self.changes.finish(self.new_ids, fenced=self.fenced)
        if due and len(self.failed) == len(due):
            return next(iter(self.failed.values()))
        return None

    def poll_folder(self, mailbox: ImapSession, folder: str) -> None:
        # STATUS first: most polls find nothing new, and then need no SELECT, no SEARCH
        # and no database.
        status = mailbox.status(folder)
        seen = (status.uidvalidity, status.uidnext)
        if self.changes.unchanged(mailbox, folder, status) and self.seen.get(folder) == seen:
            return
        selected = mailbox.select(folder)
        uidvalidity = selected.uidvalidity
        with session_scope() as session:
            self.fenced(session)
            cursor = cursors.resume_after(
                session, self.account_id, folder, uidvalidity, selected.uidnext
            )
            held = cursors.held(session, self.account_id, folder, uidvalidity)
        match_below, held_before = held.match_below, cursor is not None or held.any
        if cursor is None:
            uids, ceiling = self._first_sync_selection(mailbox, folder, held_any=held_before)
        else:
            uids = mailbox.search(uid_from=cursor + 1)
            ceiling = max(uids, default=cursor)
        if self.progress is not None and (uids or cursor is None):
            # An idle poll leaves the last sync's numbers; a first sync always shows.
            self.progress.start(folder, len(uids))
        self.ingest(
            mailbox, folder, uidvalidity, uids, match_below=match_below, held_any=held_before
        )
        if ceiling > max(cursor or 0, self.cursor_at.get(folder, 0)):
            # Messages the initial-sync policy left out stay behind the cursor for good.
            with session_scope() as session:
                self.fenced(session)
                cursors.advance(session, self.account_id, folder, uidvalidity, ceiling)
        self.changes.track(mailbox, folder, status, uidvalidity, held_before=held_before)
        # Renumbered between STATUS and SELECT: what STATUS said is not worth keeping.
        # A UIDNEXT beyond RFC 3501's range is not kept either (it would never repeat).
        if uidvalidity == status.uidvalidity and 0 < status.uidnext <= MAX_UID + 1:
            self.uidnexts[folder] = seen

    def ingest(
        self,
        mailbox: ImapSession,
        folder: str,
        uidvalidity: int,
        uids: Sequence[int],
        *,
        match_below: int,
        advance_cursor: bool = True,
        held_any: bool = True,
    ) -> None:
        """Fetch and store these UIDs (ascending) of the selected folder, batch by batch.
        `held_any` False: nothing was held from the folder as the poll began (a first
        sync), so no UID is looked up as held already.

        Four stages overlap: a thread fetches batch N+2, the parsing processes parse
        batches N+1 and N, this thread collects batch N's fields, and one committing
        thread waits for batch N-1's objects, then inserts its rows and moves the cursor.
        Batches commit one at a time, in order."""
        committing: Future[None] | None = None
        parsed: _Prepared | None = None
        committer = _threads("mailbox-commit", POLL_THREADS)

        def commit(prepared: _Prepared | None) -> None:
            nonlocal committing
            prepared = self._finish_batch(prepared)
            if committing is not None:
                committing.result()  # at most one batch waits: bounded memory
                committing = None
            if prepared is not None:
                prepared.advance_cursor = advance_cursor
                committing = committer.submit(self._commit_batch, prepared)

        try:
            fetched = self._fetch(mailbox, folder, uidvalidity, uids, held_any=held_any)
            for batch in _prefetched(fetched):
                # This batch goes to the parsing processes before the last one is
                # collected: they always have the next batch to work on.
                started = self._start_batch(folder, uidvalidity, batch, match_below=match_below)
                commit(parsed)
                parsed = started
            commit(parsed)
        except ImapLiteralRefused as exc:
            commit(parsed)  # what came before it is stored
            if exc.uid is not None and exc.uid in uids:
                self._record_refused(folder, uidvalidity, exc)
            raise
        finally:
            if committing is not None:
                committing.result()

    def _record_refused(self, folder: str, uidvalidity: int, exc: ImapLiteralRefused) -> None:
        """The message whose body the server sent far too large: a row with the reason
        and no body, so no later poll asks for it again."""
        assert exc.uid is not None
        item = _Fetched(uid=exc.uid, size=exc.stated or 0, internal_date=None, flags=[])
        row = self._prepare(folder, uidvalidity, item, [])
        row["skipped_reason"] = exc.message[:ERROR_TEXT_MAX]
        with session_scope() as session:
            inserted = session.connection().execute(
                insert_for(session, MESSAGES).on_conflict_do_nothing().returning(Message.id),
                [row],
            )
            if inserted.first() is not None:
                session.execute(
                    update(Account)
                    .where(Account.id == self.account_id)
                    .values(message_count=Account.message_count + 1)
                )
        log.warning("account %s folder %r: skipped: %s", self.account_id, folder, exc.message)

    def _first_sync_selection(
        self, mailbox: ImapSession, folder: str, *, held_any: bool
    ) -> tuple[list[int], int]:
        """UIDs to fetch on a first sync (or a re-scan: `held_any`, messages of the folder
        are held already), and the cursor to end at."""
        everything = mailbox.search()
        ceiling = max(everything, default=0)
        policy = self.account.initial_sync
        if policy == InitialSync.ALL:
            return everything, ceiling
        if policy == InitialSync.NEWEST:
            count = self.account.initial_sync_count or 0
            selected = set(everything[-count:] if count > 0 else [])
        else:
            since = self.account.initial_sync_since
            selected = set(mailbox.search(since=since)) if since else set(everything)
        oldest = None
        if held_any:
            with session_scope() as session:
                oldest = cursors.oldest_held(session, self.account_id, folder)
        if oldest is not None:
            # A re-scan: everything from the oldest message we held on, so mail that came
            # after the first sync is not left out by the first-sync policy. SEARCH SINCE
            # compares dates in the server's zone: a day earlier is safe.
            held_since = (oldest.astimezone(UTC) - timedelta(days=1)).date()
            selected |= set(mailbox.search(since=held_since))
        return sorted(uid for uid in selected if uid <= ceiling), ceiling

    def _fetch(
        self,
        mailbox: ImapSession,
        folder: str,
        uidvalidity: int,
        uids: Sequence[int],
        *,
        held_any: bool,
    ) -> Iterator[list[_Fetched]]:
        """Batches of fetched messages: sizes first, so an oversized message is recorded
        without downloading it, and a batch's bodies stay under BATCH_MAX_BYTES. UIDs
        held already (a retried poll, a body refused) are not fetched again."""
        for start in range(0, len(uids), METADATA_CHUNK):
            chunk = list(uids[start : start + METADATA_CHUNK])
            if held_any:
                with session_scope() as session:
                    held = cursors.held_uids(session, self.account_id, folder, uidvalidity, chunk)
                chunk = [uid for uid in chunk if uid not in held]
            meta = mailbox.fetch_metadata(chunk)
            email_ids = {data.email_id for data in meta.values() if data.email_id}
            holders: dict[str, cursors.Holder] = {}
            if email_ids:
                with session_scope() as session:
                    holders = cursors.held_email_ids(session, self.account_id, email_ids)
            moving = self._moving_here(mailbox, folder, uidvalidity, holders)
            batch: list[_Fetched] = []
            batch_bytes = 0
            for uid in chunk:
                data = meta.get(uid)
                if data is None:
                    continue  # expunged since the search
                item = _Fetched(
                    uid=uid,
                    size=data.size,
                    internal_date=data.internal_date,
                    flags=data.flags,
                    email_id=data.email_id,
                    thread_id=data.thread_id,
                    labels=data.labels,
                    held=data.email_id in holders,
                )
                # The first UID with the identity takes the stored message, not the rest.
                item.holder = moving.pop(data.email_id or "", None)
                fetch_size = item.size if item.size <= self.max_bytes and not item.held else 0
                if batch and (
                    len(batch) >= self.batch_size or batch_bytes + fetch_size > BATCH_MAX_BYTES
                ):
                    yield self._bodies(mailbox, batch)
                    batch, batch_bytes = [], 0
                batch.append(item)
                batch_bytes += fetch_size
            if batch:
                yield self._bodies(mailbox, batch)

    def _moving_here(
        self,
        mailbox: ImapSession,
        folder: str,
        uidvalidity: int,
        holders: dict[str, cursors.Holder],
    ) -> dict[str, cursors.Holder]:
        """The stored messages of this folder whose identity is found at a new UID here,
        by identity: those held from another UIDVALIDITY, and those whose old UID the
        server no longer has (gone and back; asked in one FETCH). Not one this poll
        moves already, nor one whose old UID is still there (a second copy)."""
        own = {
            email_id: holder
            for email_id, holder in holders.items()
            if holder.folder == folder and holder.id not in self.relocated
        }
        same = [holder.uid for holder in own.values() if holder.uidvalidity == uidvalidity]
        still = set(mailbox.fetch_metadata(same)) if same else set()
        moving = {
            email_id: holder
            for email_id, holder in own.items()
            if holder.uidvalidity != uidvalidity or holder.uid not in still
        }
        # Claimed here, in the fetching thread, which runs a batch ahead of the commits.
        self.relocated.update(holder.id for holder in moving.values())
        return moving

    def _bodies(self, mailbox: ImapSession, batch: list[_Fetched]) -> list[_Fetched]:
        bodies = mailbox.fetch_bodies(
            {item.uid: item.size for item in batch if item.size <= self.max_bytes and not item.held}
        )
        kept: list[_Fetched] = []
        for item in batch:
            if item.size > self.max_bytes or item.held:
                kept.append(item)
                continue
            body = bodies.get(item.uid)
            if body is None:
                continue  # expunged between the two fetches
            item.body = body
            item.size = len(body)
            # Hashed here, in the fetching thread, off the storing thread's path.
            item.content_hash = hashlib.sha256(body).hexdigest()
            kept.append(item)
        return kept

    def _start_batch(
        self, folder: str, uidvalidity: int, batch: list[_Fetched], *, match_below: int
    ) -> _Prepared | None:
        """Start writing a batch's raw messages and parsing them (`_finish_batch`
        collects the parse)."""
        if not batch:
            return None
        # What the folder held at a UIDVALIDITY change may be held from before it; what
        # arrived later is new, even byte for byte the same (moved out and back).
        hashes = {
            item.content_hash
            for item in batch
            if item.content_hash is not None and item.uid < match_below
        }
        holders: list[cursors.Holder] = []
        if hashes:
            with session_scope() as session:
                holders = cursors.held_hashes(session, self.account_id, folder, uidvalidity, hashes)
        held = {holder.content_hash for holder in holders}
        # Not one an earlier batch relocates (its commit may not have happened yet).
        holders = [holder for holder in holders if holder.id not in self.relocated]
        prepared = _Prepared(
            folder=folder, uidvalidity=uidvalidity, last_uid=batch[-1].uid, fetched=len(batch)
        )
        kept: list[_Fetched] = []
        for item in batch:
            if not item.held and (item.uid >= match_below or item.content_hash not in held):
                kept.append(item)
                continue
            if not item.held:
                # Held from before the change: each live one moves to one of its copies.
                item.holder = _take(holders, item.content_hash)
                if item.holder is not None:
                    self.relocated.add(item.holder.id)
            if item.holder is not None:
                # Its own folder's message, renumbered or gone and back: it is here now,
                # so its flags and its deletion are followed here (and audited here).
                prepared.relocations.append((item.holder, uidvalidity, item.uid))
            elif item.held:
                # Another folder's (a place change tracking may find it moved to).
                self.elsewhere.append(item.uid)
                self.changes.seen_elsewhere(folder, uidvalidity, item)
        # The parse first: its hand-off to the processes is not queued behind the writes.
        prepared.outcomes = parsing.start_all_for_storage(
            [item.body for item in kept if item.body is not None], self.inline_max
        )
        for item in kept:
            row = self._prepare(folder, uidvalidity, item, prepared.uploads)
            prepared.rows.append(row)
            prepared.attachments[item.uid] = []
            if item.body is not None:
                prepared.to_parse.append((row, item))
        return prepared

    def _finish_batch(self, prepared: _Prepared | None) -> _Prepared | None:
        """Fill the batch's rows from its parse, and start writing the attachments that
        are objects of their own."""
        if prepared is None or prepared.outcomes is None:
            return prepared
        for (row, item), outcome in zip(prepared.to_parse, prepared.outcomes(), strict=True):
            prepared.attachments[item.uid] = self._parsed(row, outcome, prepared.uploads)
        prepared.to_parse, prepared.outcomes = [], None
        return prepared

    def _commit_batch(self, prepared: _Prepared | None) -> None:
        """Insert the batch's rows while its objects are still being written, and commit
        them with the cursor once every object is durable: the inserts no longer wait
        for the writes, nor the writes for the inserts. A failed write fails the batch:
        nothing is committed. The account row is locked for update (the fence) only
        after the wait; meanwhile the rows' foreign keys hold its share lock, so another
        transaction's FOR UPDATE of it (an audit's) waits for the writes."""
        if prepared is None:
            return
        folder, uidvalidity, last_uid = prepared.folder, prepared.uidvalidity, prepared.last_uid
        rows, attachments = prepared.rows, prepared.attachments
        # Where the objects go while S3 answers; a row whose object went elsewhere (S3
        # failed meanwhile) is corrected below, before the commit.
        expected = storage.preferred_backend()
        for row, _writing in prepared.uploads:
            row["storage_backend"] = expected
        with session_scope() as session:
            # Any conflict: the message's identity, or its server identity held by a
            # message a backfill or an audit stored from another folder meanwhile.
            inserted = bulk_insert(
                session,
                MESSAGES,
                rows,
                any_conflict=True,
                returning=("id", "uid", "size", "storage_key"),
            )
            # Attachments only of the messages inserted now: a message held already has
            # its attachment rows.
            parts = bulk_insert(
                session,
                ATTACHMENTS,
                [
                    {**part, "message_id": row.id}
                    for row in inserted
                    for part in attachments[row.uid]
                ],
                returning=("id", "storage_key"),
            )
            # The rows wait here for their objects, not the other way round.
            for backend, keys in self._durable(prepared.uploads, expected).items():
                for table, written in ((MESSAGES, inserted), (ATTACHMENTS, parts)):
                    if ids := [row.id for row in written if row.storage_key in keys]:
                        session.execute(
                            update(table).where(table.c.id.in_(ids)).values(storage_backend=backend)
                        )
            # A poll that has lost the mailbox commits nothing. The account row, locked
            # from here, is locked before the cursor row, as by every poll's commit: two
            # polls of one mailbox that meet here lock in the same order.
            self.fenced(session)
            # In the transaction that moves the cursor past them: a retried batch finds
            # them held where they are now. None of them is among the rows inserted.
            cursors.relocate(session, self.account_id, prepared.relocations)
            # One update of the account row: its count and the sync's progress.
            values: dict[str, Any] = {}
            if inserted:
                values["message_count"] = Account.message_count + len(inserted)
            if prepared.advance_cursor and self.progress is not None:
                values.update(self.progress.advance(folder, prepared.fetched))
            if values:
                session.execute(
                    update(Account).where(Account.id == self.account_id).values(**values)
                )
            if prepared.advance_cursor:
                cursors.advance(session, self.account_id, folder, uidvalidity, last_uid)
                self.cursor_at[folder] = last_uid
        self.new_ids.extend(sorted(row.id for row in inserted))
        self.new_bytes += sum(row.size for row in inserted)

    @staticmethod
    def _durable(
        uploads: list[_Upload], expected: StorageBackend
    ) -> dict[StorageBackend, set[str]]:
        """Wait for a batch's writes and make its local files durable (written unsynced
        by the writing threads, fsynced here together); returns the keys of the objects
        that went to another backend than `expected`, by backend."""
        local_keys: list[str] = []
        moved: dict[StorageBackend, set[str]] = {}
        for row, writing in uploads:
            backend = writing.result()
            if backend == StorageBackend.LOCAL:
                local_keys.append(row["storage_key"])
            if backend != expected:
                moved.setdefault(backend, set()).add(row["storage_key"])
        storage.sync_local(local_keys)
        return moved

    def _prepare(
        self, folder: str, uidvalidity: int, item: _Fetched, uploads: list[_Upload]
    ) -> dict[str, Any]:
        """The message's row, its raw bytes being written (parsed fields: `_parsed`)."""
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
            "email_id": item.email_id,
            "thread_id": item.thread_id,
            "labels": item.labels,
            "text_body": None,
            "html_body": None,
            "storage_backend": None,
            "storage_key": None,
            "parse_error": None,
            "decode_fallbacks": None,
            "skipped_reason": None,
            "ingested_at": utcnow(),
        }
        if item.body is None:
            row["skipped_reason"] = (
                f"larger than MAX_MESSAGE_BYTES ({item.size} > {self.max_bytes} bytes)"
            )
            return row
        key = message_key(self.account_id, folder, uidvalidity, item.uid)
        self._upload(uploads, row, key, item.body, "message/rfc822")
        return row

    def _parsed(
        self, row: dict[str, Any], outcome: parsing.Stored, uploads: list[_Upload]
    ) -> list[dict[str, Any]]:
        """Fill the row from the parse and store the attachments that are objects of
        their own; returns the attachments' rows. A message that could not be parsed is
        kept raw, with the reason."""
        if isinstance(outcome, str):
            row["parse_error"] = outcome
            return []
        parsed, attachments = outcome
        row.update(parsed_fields(parsed))
        parts = []
        for index, attachment in enumerate(attachments, start=1):
            part = {
                "filename": attachment.filename,
                "safe_name": attachment.safe_name,
                "content_type": attachment.content_type,
                "content_id": attachment.content_id,
                "size": attachment.size,
                "content_hash": attachment.content_hash,
                "storage_backend": None,
                "storage_key": None,
            }
            if attachment.data is not None:
                part_key = attachment_key(
                    self.account_id,
                    row["folder"],
                    row["uidvalidity"],
                    row["uid"],
                    index=index,
                    safe_name=attachment.safe_name,
                )
                self._upload(uploads, part, part_key, attachment.data, attachment.content_type)
            parts.append(part)
        return parts

    def _upload(
        self, uploads: list[_Upload], row: dict[str, Any], key: str, data: bytes, content_type: str
    ) -> None:
        """Write an object in a writing thread (its hash is on the row already: messages
        are hashed by the fetching thread, attachments where they were parsed)."""
        row["storage_key"] = key
        writing = _threads("mailbox-store", STORE_THREADS).submit(
            storage.put_object, key, data, content_type, sync=False
        )
        if len(self.writes) >= WRITES_PRUNED_AT:
            self.writes = [write for write in self.writes if not write.done()]
        self.writes.append(writing)
        uploads.append((row, writing))


def _take(holders: list[cursors.Holder], content_hash: str | None) -> cursors.Holder | None:
    """The first live holder of this content hash, taken from `holders` (so two
    byte-identical messages relocate two stored ones, not one twice)."""
    for index, holder in enumerate(holders):
        if holder.live and holder.content_hash == content_hash:
            return holders.pop(index)
    return None


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

    producer = _threads("mailbox-fetch", POLL_THREADS).submit(produce)
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not producer.done():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.5)


_pools: dict[str, ThreadPoolExecutor] = {}
_pools_pid = 0
_pools_lock = threading.Lock()


def _threads(name: str, workers: int) -> ThreadPoolExecutor:
    """Threads a poll's stages run in, kept from poll to poll in this process (a forked
    child makes its own): starting eleven threads per poll was 6 % of a first sync of
    100 small mailboxes (docs/benchmarks.md)."""
    global _pools_pid  # noqa: PLW0603 - one set per process
    with _pools_lock:
        if _pools_pid != os.getpid():
            _pools.clear()
            _pools_pid = os.getpid()
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return _pools[name]


def parsed_fields(parsed: ParsedMessage) -> dict[str, Any]:
    """The message row's columns the parser fills (re-parsing changes only these)."""
    return {
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "from_addr": parsed.from_addr,
        "to_addrs": parsed.to_addrs,
        "cc_addrs": parsed.cc_addrs,
        "date": parsed.date,
        "text_body": parsed.text_body,
        "html_body": parsed.html_body,
        "decode_fallbacks": parsed.decode_fallbacks or None,
    }
