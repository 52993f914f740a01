"""What a scheduled poll does around the ingestion itself, the same for the Celery task
(`mailbox.poll`) and the local scheduler: re-read the account, drop a stale entry, and,
once the poll has committed, hand on its messages, count it, and remove the entry of an
account the poll has just disabled."""

from __future__ import annotations

import logging
import time

from backend.db import session_scope
from backend.mailbox.service import PollResult, poll_account
from backend.metrics import record_poll
from backend.models import Account, PollRun, utcnow
from backend.processing.service import after_poll
from backend.schedules import service

log = logging.getLogger(__name__)


def pollable(account_id: int) -> bool:
    """Whether the account still wants polls. A deleted or disabled account's entry is
    stale (a poll was already queued, or the removal after its commit failed): remove it."""
    with session_scope() as session:
        account = session.get(Account, account_id)
        wanted = account is not None and service.wants_schedule(account)
    if not wanted:
        log.info("mailbox %s is deleted or disabled: removing its stale schedule entry", account_id)
        service.remove_account(account_id)
    return wanted


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
                outcome="skipped",
                error=reason,
                task_id=task_id,
            )
        )
    record_poll("skipped", 0, 0, 0.0)
    log.info("poll of mailbox %s skipped: %s", account_id, reason)


def finish(account_id: int, result: PollResult, duration_seconds: float) -> None:
    """After the poll committed: hand on, count, and unschedule an account it disabled."""
    log.info(
        "poll of mailbox %s: %s, %d new messages in %.2fs",
        account_id,
        result.outcome,
        len(result.new_message_ids),
        duration_seconds,
    )
    after_poll(account_id, result.new_message_ids, result.account_event)
    record_poll(result.outcome, result.messages, result.bytes, duration_seconds)
    if result.account_event == "account.disabled":
        log.warning("mailbox %s disabled after repeated failures: removing its entry", account_id)
        service.remove_account(account_id)


def run_local_poll(account_id: int, task_id: str) -> None:
    """One poll from the local scheduler (which already keeps it one at a time)."""
    if not pollable(account_id):
        return
    started = time.monotonic()
    result = poll_account(account_id, task_id=task_id)
    finish(account_id, result, time.monotonic() - started)
