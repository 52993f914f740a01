"""Held checks end to end (backend/push/held.py): real beat, worker and watcher
processes, real Redis and PostgreSQL, a Dovecot that offers no IDLE. The accounts'
interval is 2 s, far below HELD_INTERVAL_MAX_SECONDS, and the safety interval an hour:
while the watcher checks, beat sends no poll. Every wait is a loop with a generous
deadline, never a sleep that asserts timing."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.celery_app import queue_keys
from backend.models import Account, Message, PollOutcome, PollRun, utcnow
from backend.schedules import service, store
from tests.support.accounts import make_account
from tests.support.celery import Celery, running_celery
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

INTERVAL = 2
# Dovecot's capabilities without IDLE (checks are STATUS on the held session).
WITHOUT_IDLE = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE CONDSTORE QRESYNC UIDPLUS MOVE NAMESPACE"


@pytest.fixture(scope="module")
def no_idle() -> Iterator[Dovecot]:
    root = Path(tempfile.mkdtemp(prefix="mailbeat-dovecot-noidle-"))
    server = Dovecot(root, capabilities=WITHOUT_IDLE)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def celery(tmp_path: Path, set_env: Callable[..., None]) -> Iterator[Celery]:
    set_env(
        MIN_POLL_INTERVAL_SECONDS=1,
        SCHEDULER_MODE="celery",
        WATCHER_LEASE_SECONDS=2,
        HELD_INTERVAL_MAX_SECONDS=60,
        HELD_SAFETY_INTERVAL_SECONDS=3600,
        HELD_RECORD_SECONDS=1,
    )
    with running_celery(tmp_path) as processes:
        yield processes


def polls(db: Session, account: Account) -> int:
    db.rollback()
    return int(
        db.scalar(
            select(func.count(PollRun.id)).where(
                PollRun.account_id == account.id, PollRun.outcome == PollOutcome.SUCCESS
            )
        )
        or 0
    )


def stored(db: Session, account: Account) -> int:
    db.rollback()
    return int(
        db.scalar(select(func.count(Message.id)).where(Message.account_id == account.id)) or 0
    )


def checks(redis_db: RedisDb) -> int:
    return int(redis_db.client().get(store.CHECKS_TOTAL) or 0)


def checked(redis_db: RedisDb, account: Account) -> bool:
    return bool(redis_db.client().exists(store.checked_key(account.id)))


def held(db: Session, no_idle: Dovecot, celery: Celery, redis_db: RedisDb) -> Account:
    """An account polled once, then checked by the watcher (its checks come)."""
    account = make_account(db, no_idle, poll_interval_seconds=INTERVAL)
    celery.worker()
    celery.beat()
    celery.watcher()
    wait_for(lambda: polls(db, account) >= 1, "the first poll", details=celery.logs)
    wait_for(lambda: checked(redis_db, account), "the watcher's checks", details=celery.logs)
    # Beat may have sent a poll in the tick before it read the first check; once two more
    # checks are in (beat reads them every tick, at most a second apart), that poll, if
    # any, is the last: wait until it has run, so what follows counts only later polls.
    first = checks(redis_db)
    wait_for(lambda: checks(redis_db) >= first + 2, "two more checks", details=celery.logs)
    wait_for(lambda: idle(db, redis_db, account), "no poll queued or running", details=celery.logs)
    return account


def idle(db: Session, redis_db: RedisDb, account: Account) -> bool:
    client = redis_db.client()
    if any(client.llen(key) for key in queue_keys(store.POLL_QUEUE)):
        return False
    db.rollback()
    running = select(func.count(PollRun.id)).where(
        PollRun.account_id == account.id, PollRun.finished_at.is_(None)
    )
    return not db.scalar(running)


def test_a_held_mailbox_with_nothing_new_is_checked_without_polls(
    celery: Celery, db: Session, no_idle: Dovecot, redis_db: RedisDb
) -> None:
    account = held(db, no_idle, celery, redis_db)
    before = polls(db, account)
    first = checks(redis_db)
    recorded = utcnow()
    # Several intervals' worth of checks.
    wait_for(lambda: checks(redis_db) >= first + 5, "five checks", 120, details=celery.logs)

    def last_polled() -> object:
        db.rollback()
        return db.scalar(select(Account.last_success_at).where(Account.id == account.id))

    # The checks are written to the account as its idle polls (freshness).
    wait_for(
        lambda: (at := last_polled()) is not None and at > recorded,  # type: ignore[operator]
        "the checks recorded on the account",
        details=celery.logs,
    )
    assert polls(db, account) == before
    assert stored(db, account) == 0


def test_mail_to_a_held_mailbox_is_stored_once_and_poll_now_still_works(
    celery: Celery, db: Session, no_idle: Dovecot, redis_db: RedisDb
) -> None:
    account = held(db, no_idle, celery, redis_db)
    no_idle.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through a check", details=celery.logs)
    no_idle.append(account.username, generated(2))
    wait_for(lambda: stored(db, account) == 2, "a second one", details=celery.logs)

    # Poll now: a poll of its own, which finds nothing to store twice.
    task_id = service.enqueue_poll(account.id)

    def finished() -> bool:
        db.rollback()
        return bool(
            db.scalar(
                select(func.count(PollRun.id)).where(
                    PollRun.task_id == task_id, PollRun.finished_at.is_not(None)
                )
            )
        )

    wait_for(finished, "the poll asked for by hand", details=celery.logs)
    # Checks resume after the poll (the baseline moved with it), and nothing is stored twice.
    resumed = checks(redis_db)
    wait_for(lambda: checks(redis_db) >= resumed + 3, "checks again", 120, details=celery.logs)
    assert stored(db, account) == 2


def test_a_lost_watcher_hands_the_mailbox_back_to_beats_interval(
    celery: Celery, db: Session, no_idle: Dovecot, redis_db: RedisDb
) -> None:
    account = held(db, no_idle, celery, redis_db)
    watcher = next(p for p in celery.started if p.name == "watcher")
    watcher.kill()
    # Its checks stop: the key lapses and beat polls at the interval again.
    wait_for(lambda: not checked(redis_db, account), "the checks' key lapsing", details=celery.logs)
    before = polls(db, account)
    wait_for(lambda: polls(db, account) >= before + 3, "beat's polls", 120, details=celery.logs)
    no_idle.append(account.username, generated(3))
    wait_for(lambda: stored(db, account) == 1, "the message, by beat", details=celery.logs)
