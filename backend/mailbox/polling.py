"""A poll with everything around it, the same wherever it runs: the Celery task
`mailbox.poll`, the local scheduler and `cli poll`.

Take the mailbox's lease (backend/mailbox/lock.py); poll (backend/mailbox/service.py),
which reads the account first: a deleted or disabled one is not polled, and its stale
schedule entry is dropped; once the poll has committed, hand on its account event and
messages, count it, and remove the entry of an account the poll has just disabled.

Also the housekeeping of poll runs: the sweep that closes the runs of polls whose
process died (and polls their mailbox again), and the prune of old runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, delete, select

from backend import dispatch
from backend.accounts import state
from backend.config import get_settings
from backend.db import session_scope
from backend.mailbox import budget, lock
from backend.mailbox.progress import OnProgress
from backend.mailbox.service import (
    DEAD_RUN_MARGIN_SECONDS,
    PollResult,
    close_dead_runs,
    poll_account,
)
from backend.metrics import record_poll
from backend.models import (
    Account,
    EventType,
    PollOutcome,
    PollRun,
    SchedulerMode,
    utcnow,
)
from backend.processing.service import after_poll
from backend.schedules import service as schedules
from backend.schedules import store

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
SWEEP_TASK = "poll_runs.sweep"
# Runs closed per sweep at most (the rest go with the next sweep).
SWEEP_LIMIT = 1000


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
    with _lock(account_id) as (held, lease_lost):
        if not held:
            record_skip(account_id, task_id=task_id, reason=BUSY_REASON)
            return LOCKED
        result = poll_account(
            account_id,
            task_id=task_id,
            force=force,
            on_progress=on_progress,
            lease_lost=lease_lost,
        )
    _rerun_if_asked(account_id)
    if result.stale:
        # Its poll was already queued, or the removal after its commit failed.
        log.info("mailbox %s is deleted or disabled: removing its stale schedule entry", account_id)
        schedules.remove_account(account_id)
        return STALE
    if result.outcome == PollOutcome.NO_SLOT:
        _poll_again_soon(account_id)
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


@contextmanager
def _lock(account_id: int) -> Iterator[tuple[bool, threading.Event | None]]:
    """Whether this poll has the mailbox, and the event its lease's loss sets."""
    # Local mode has no Redis, and its scheduler runs one poll per mailbox at a time.
    if dispatch.mode() == SchedulerMode.LOCAL:
        yield True, None
        return
    with lock.mailbox_lock(account_id) as lease:
        yield lease is not None, None if lease is None else lease.lost


def _poll_again_soon(account_id: int) -> None:
    """A poll that found no connection slot: its turn comes soon, not a backoff later."""
    try:
        schedules.enqueue_poll_later(account_id, budget.again_seconds())
    except Exception:  # the schedule's next run polls it
        log.warning("mailbox %s: the poll again after no connection slot was not sent", account_id)


def _rerun_if_asked(account_id: int) -> None:
    """A poll skipped while this one held the mailbox may have come for mail this one had
    already looked past: one more poll, coalesced with any already waiting."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        return
    try:
        if lock.rerun_requested(account_id):
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


def sweep_dead_polls(*, limit: int = SWEEP_LIMIT) -> list[int]:
    """Close the runs of polls whose process died, and poll their mailboxes again;
    returns the accounts whose runs were closed.

    A run is dead when it is still "running" a lease after it started and no poll holds
    its mailbox's lease: a live poll renews its lease for as long as it runs, and a poll
    that takes the mailbox closes the runs before it at once (backend/mailbox/service.py).
    So this finds the polls nothing else would close, such as a disabled mailbox's or a
    mailbox's with a long interval, within a lease and a sweep. Local mode (no leases,
    one process) knows a run is dead only past the hard time limit.

    Run every MAILBOX_LEASE_SECONDS / 2 (beat_schedule in backend/celery_app.py, the
    default queue; with the housekeeping in local mode)."""
    now = utcnow()
    local = dispatch.mode() == SchedulerMode.LOCAL
    settings = get_settings()
    age = (
        settings.poll_time_limit_seconds + DEAD_RUN_MARGIN_SECONDS
        if local
        else settings.mailbox_lease_seconds
    )
    with session_scope() as session:
        # finished_at is NULL only on running rows (ix_poll_runs_finished_at finds them).
        runs = session.scalars(
            select(PollRun)
            .where(
                PollRun.finished_at.is_(None),
                PollRun.outcome == PollOutcome.RUNNING,
                PollRun.started_at < now - timedelta(seconds=age),
            )
            .order_by(PollRun.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not local:
            live = lock.held({run.account_id for run in runs})
            runs = [run for run in runs if run.account_id not in live]
        close_dead_runs(session, runs, now)
        accounts = sorted({run.account_id for run in runs})
        wanted = [
            account.id
            for account in session.scalars(select(Account).where(Account.id.in_(accounts)))
            if state.wants_polls(account)
        ]
    if not local:
        for account_id in wanted:
            # The dead poll's mailbox now, not at its next interval. A poll the dead
            # worker had taken but not started holds the coalescing key until the broker
            # hands it out again (its visibility timeout, 2 x POLL_TIME_LIMIT_SECONDS):
            # the key goes with the worker, and that poll, when it comes back, is one
            # more poll that finds nothing new.
            dispatch.release(store.pending_key(account_id))
            schedules.enqueue_news_poll(account_id)
    if runs:
        log.warning("sweep: %d polls whose worker died closed as failures", len(runs))
    return accounts


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
