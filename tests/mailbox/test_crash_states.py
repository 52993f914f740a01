"""What a crash leaves behind, healed: a poll whose mailbox a newer poll has taken cannot
write (the database fence), and the runs of polls whose process died are closed by the
sweep, their mailboxes polled again. Real PostgreSQL, Redis and Dovecot."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend import dispatch
from backend.celery_app import queue_keys
from backend.db import session_scope
from backend.dispatch import COALESCE_PREFIX
from backend.mailbox import cursors
from backend.mailbox.lock import MailboxLock
from backend.mailbox.polling import sweep_dead_polls
from backend.mailbox.progress import Progress
from backend.mailbox.service import DEAD_RUN, LOST_LEASE, poll_account
from backend.models import (
    Account,
    AccountStatus,
    FolderCursor,
    Message,
    PollOutcome,
    PollRun,
    utcnow,
)
from backend.schedules.store import POLL_QUEUE, pending_key
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.redis_db import RedisDb

MESSAGES = 30


@pytest.fixture(autouse=True)
def celery_mode(set_env: Callable[..., None]) -> None:
    set_env(SCHEDULER_MODE="celery", IMAP_FETCH_BATCH_SIZE=5)


def test_a_poll_whose_mailbox_a_newer_poll_took_writes_nothing(
    db: Session, dovecot: Dovecot
) -> None:
    """The fence alone: the old poll's lease is never reported lost, yet once a newer poll
    has taken the account's next token, none of its batches commits."""
    account = make_account(db, dovecot)
    dovecot.append_many(account.username, [generated(index) for index in range(MESSAGES)])
    newer: list[int] = []

    def take_fence() -> None:
        with session_scope() as session:
            newer.append(cursors.take_fence(session, account.id))

    def on_progress(_folders: Progress) -> None:
        # Called as the old poll's sync starts: after it took its token and wrote its
        # cursor, before any batch. The newer poll takes the mailbox now.
        if not newer:
            take_fence()

    result = poll_account(account.id, on_progress=on_progress, lease_lost=threading.Event())

    assert result.outcome == PollOutcome.SKIPPED
    assert result.error == LOST_LEASE
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(Message)) == 0
    assert db.scalars(select(FolderCursor.last_uid)).all() == [0]
    assert db.get(Account, account.id).poll_fence == newer[0]  # type: ignore[union-attr]
    [run] = db.scalars(select(PollRun)).all()
    assert run.outcome == PollOutcome.SKIPPED
    assert run.error is not None and run.error.startswith(LOST_LEASE)
    assert run.finished_at is not None

    # The newer poll (here, the next one) stores every message once.
    assert poll_account(account.id, lease_lost=threading.Event()).messages == MESSAGES


def test_a_poll_whose_mailbox_a_newer_poll_took_leaves_it_the_account_state(
    db: Session, dovecot: Dovecot
) -> None:
    """A first sync of an empty folder writes its start and its tracking baseline only
    with the poll's last transaction: a poll fenced out before then leaves both to the
    newer poll."""
    account = make_account(db, dovecot)

    def on_progress(_folders: Progress) -> None:
        with session_scope() as session:
            cursors.take_fence(session, account.id)  # a newer poll takes the mailbox

    result = poll_account(account.id, on_progress=on_progress, lease_lost=threading.Event())

    assert (result.outcome, result.messages) == (PollOutcome.SUCCESS, 0)
    db.expire_all()
    stored = db.get(Account, account.id)
    assert stored is not None
    assert (stored.sync_progress, stored.change_state) == (None, None)


def _dead_run(db: Session, account: Account, seconds_ago: float) -> PollRun:
    run = PollRun(
        account_id=account.id,
        started_at=utcnow() - timedelta(seconds=seconds_ago),
        outcome=PollOutcome.RUNNING,
    )
    db.add(run)
    db.commit()
    return run


def test_the_sweep_closes_dead_polls_and_polls_their_mailboxes_again(
    db: Session, redis_db: RedisDb
) -> None:
    lease = 20.0  # MAILBOX_LEASE_SECONDS by default
    dead = make_account(db)
    live = make_account(db)
    young = make_account(db)
    disabled = make_account(db, status=AccountStatus.DISABLED, consecutive_failures=10)
    dead_run = _dead_run(db, dead, lease + 5)
    live_run = _dead_run(db, live, lease + 5)
    young_run = _dead_run(db, young, 1)
    disabled_run = _dead_run(db, disabled, lease + 5)
    holder = MailboxLock(live.id)
    assert holder.acquire()  # a long poll, alive: its process renews its lease
    # A poll of the dead mailbox its worker had taken but not started: its coalescing key
    # would stand until the broker's visibility timeout.
    assert dispatch.claim_many([pending_key(dead.id)], 3600) == [True]

    assert sweep_dead_polls() == sorted([dead.id, disabled.id])

    db.expire_all()
    for run in (dead_run, disabled_run):
        assert run.outcome == PollOutcome.INTERNAL_ERROR
        assert run.error == DEAD_RUN
        assert run.finished_at is not None
    assert live_run.outcome == PollOutcome.RUNNING
    assert young_run.outcome == PollOutcome.RUNNING
    assert dead.consecutive_failures == 1  # a worker killed counts as a failure
    assert disabled.consecutive_failures == 10  # a disabled account's state is left as it is
    pending = {
        account.id
        for account in (dead, live, young, disabled)
        if redis_db.client().exists(COALESCE_PREFIX + pending_key(account.id))
    }
    assert pending == {dead.id}
    # Polled again now, not at its next interval nor after the lost poll's key expired.
    queued = [
        json.loads(raw)["headers"]["argsrepr"]
        for key in queue_keys(POLL_QUEUE)
        for raw in redis_db.client().lrange(key, 0, -1)
    ]
    assert queued == [f"[{dead.id}]"]
    assert sweep_dead_polls() == []  # closed once
    assert holder.release()
