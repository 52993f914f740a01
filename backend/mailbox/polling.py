"""A poll with everything around it, the same wherever it runs: the Celery task
`mailbox.poll`, the local scheduler and `cli poll`.

Take the mailbox's lock; poll (backend/mailbox/service.py), which reads the account
first: a deleted or disabled one is not polled, and its stale schedule entry is dropped;
once the poll has committed, hand on its account event and messages, count it, and
remove the entry of an account the poll has just disabled.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, delete, select

from backend import dispatch
from backend.config import get_settings
from backend.db import session_scope
from backend.mailbox.lock import mailbox_lock, rerun_requested
from backend.mailbox.progress import OnProgress
from backend.mailbox.service import PollResult, poll_account
from backend.metrics import record_poll
from backend.models import Account, EventType, PollOutcome, PollRun, SchedulerMode, utcnow
from backend.processing.service import after_poll
from backend.schedules import service as schedules

log = logging.getLogger(__name__)

# Why a poll did not run. stale: the account is deleted or disabled (its entry was
# removed); locked: another poll of the mailbox holds it (recorded as skipped).
NotRun = Literal["stale", "locked"]
STALE: NotRun = "stale"
LOCKED: NotRun = "locked"
BUSY_REASON = "another poll of this mailbox is running"
# Old poll runs deleted per transaction (short locks), and at most this many
# transactions a prune: a backlog (the first prune after an upgrade) goes over the next
# prunes rather than into one long task.
PRUNE_CHUNK = 10_000
PRUNE_MAX_CHUNKS = 50
PRUNE_TASK = "poll_runs.prune"


def run_poll(
    account_id: int,
    task_id: str | None,
    force: bool = False,
    on_progress: OnProgress | None = None,
) -> PollResult | NotRun:
    """Poll one mailbox and hand its work on; returns the poll's result, or why it did
    not run. Never raises for a mailbox's own failures. `force`: through a backoff.
    `on_progress` hears each folder's done and total as batches commit
    (backend/mailbox/progress.py)."""
    started = time.monotonic()
    with _lock(account_id) as held:
        if not held:
            record_skip(account_id, task_id=task_id, reason=BUSY_REASON)
            return LOCKED
        result = poll_account(account_id, task_id=task_id, force=force, on_progress=on_progress)
    _rerun_if_asked(account_id)
    if result.stale:
        # Its poll was already queued, or the removal after its commit failed.
        log.info("mailbox %s is deleted or disabled: removing its stale schedule entry", account_id)
        schedules.remove_account(account_id)
        return STALE
    duration = time.monotonic() - started
    after_poll(account_id, result.new_message_ids, result.account_event)
    record_poll(result.outcome, result.messages, result.bytes, duration)
    if result.account_event == EventType.ACCOUNT_DISABLED:
        log.warning("mailbox %s disabled after repeated failures: removing its entry", account_id)
        schedules.remove_account(account_id)
    log.info(
        "poll of mailbox %s: %s, %d new messages in %.2fs",
        account_id,
        result.outcome,
        len(result.new_message_ids),
        duration,
    )
    return result


def _lock(account_id: int) -> AbstractContextManager[bool]:
    # Local mode has no Redis, and its scheduler runs one poll per mailbox at a time.
    if dispatch.mode() == SchedulerMode.LOCAL:
        return nullcontext(True)
    return mailbox_lock(account_id)


def _rerun_if_asked(account_id: int) -> None:
    """A poll skipped while this one held the mailbox may have come for mail this one had
    already looked past: one more poll, coalesced with any already waiting."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        return
    try:
        if rerun_requested(account_id):
            schedules.enqueue_news_poll(account_id)
    except Exception:  # this poll has committed; the next scheduled one catches up
        log.warning(
            "mailbox %s: the poll asked for while it was busy was not sent",
            account_id,
            exc_info=True,
        )


def record_skip(account_id: int, *, task_id: str | None, reason: str) -> None:
    """A poll that did not run because another poll of the mailbox holds it."""
    now = utcnow()
    with session_scope() as session:
        if session.get(Account, account_id) is None:
            return
        session.add(
            PollRun(
                account_id=account_id,
                started_at=now,
                finished_at=now,
                outcome=PollOutcome.SKIPPED,
                error=reason,
                task_id=task_id,
            )
        )
    record_poll(PollOutcome.SKIPPED, 0, 0, 0.0)
    log.info("poll of mailbox %s skipped: %s", account_id, reason)


def prune_poll_runs(*, chunk: int = PRUNE_CHUNK, max_chunks: int = PRUNE_MAX_CHUNKS) -> int:
    """Delete the poll runs that finished more than POLL_RUN_RETENTION_DAYS ago, oldest
    first, a chunk per transaction (on the finished_at index); returns how many. A run
    still going is kept however old. Running it twice, or in two processes at once,
    deletes nothing twice."""
    cutoff = utcnow() - timedelta(days=get_settings().poll_run_retention_days)
    deleted = 0
    for _ in range(max_chunks):
        oldest = (
            select(PollRun.id)
            .where(PollRun.finished_at < cutoff)
            .order_by(PollRun.finished_at)
            .limit(chunk)
        )
        with session_scope() as session:
            done = session.execute(
                delete(PollRun).where(PollRun.id.in_(oldest)),
                execution_options={"synchronize_session": False},
            )
        count = cast(CursorResult[Any], done).rowcount
        deleted += count
        if count < chunk:
            break
    if deleted:
        log.info("poll runs: %d finished before %s deleted", deleted, cutoff.isoformat())
    return deleted
