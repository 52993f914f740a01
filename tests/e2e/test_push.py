"""Push end to end: real watcher (`cli watch`) and worker processes, real Redis and
PostgreSQL, the Dovecot fixture (which has IDLE), and Cyrus for the tests marked so. No
beat runs unless a test says so, and the accounts' interval is 300 s: mail that arrives
was fetched because of the push.
Every wait is a loop with a generous deadline, never a sleep that asserts timing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.models import Account, Message, PollOutcome, PollRun, PushStatus, utcnow
from backend.push.leases import lease_key
from tests.support.accounts import make_account
from tests.support.celery import Celery, CeleryProcess, running_celery
from tests.support.dovecot import Dovecot
from tests.support.imap_server import FakeImapServer, FakeMessage
from tests.support.mail import generated
from tests.support.redis_db import RedisDb
from tests.support.servers import RealServer, on_both_servers
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

LONG_INTERVAL = 300


@pytest.fixture
def celery(tmp_path: Path, set_env: Callable[..., None]) -> Iterator[Celery]:
    # A dead watcher's leases run out in 2 s; the rest as in production.
    set_env(WATCHER_LEASE_SECONDS=2, MIN_POLL_INTERVAL_SECONDS=1, SCHEDULER_MODE="celery")
    with running_celery(tmp_path) as processes:
        yield processes


def pushed(db: Session, server: RealServer) -> Account:
    # Polled just now: the schedule would not poll it again for 300 s.
    return make_account(
        db,
        server,
        push=True,
        poll_interval_seconds=LONG_INTERVAL,
        last_polled_at=utcnow(),
    )


def stored(db: Session, account: Account) -> int:
    db.rollback()  # a fresh snapshot
    return int(
        db.scalar(select(func.count(Message.id)).where(Message.account_id == account.id)) or 0
    )


def push_status(db: Session, account: Account) -> PushStatus | None:
    db.rollback()
    return db.scalar(select(Account.push_status).where(Account.id == account.id))


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


def holder(redis_db: RedisDb, account: Account) -> str | None:
    value = redis_db.client().get(lease_key(account.id))
    return value.decode() if isinstance(value, bytes) else value


def held_by(redis_db: RedisDb, account: Account, process: CeleryProcess) -> bool:
    # A lease's value is "<host>-<pid>-<random>:<fencing token>".
    value = holder(redis_db, account)
    return value is not None and f"-{process.pid}-" in value


def watching(db: Session, account: Account) -> bool:
    """IDLE is held, and the catch-up poll sent as it started has run."""
    return push_status(db, account) == PushStatus.WATCHING and polls(db, account) >= 1


@on_both_servers
def test_mail_appended_is_stored_through_push_with_a_long_interval(
    celery: Celery, db: Session, mail_server: RealServer
) -> None:
    account = pushed(db, mail_server)
    celery.worker()
    celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)

    mail_server.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)
    mail_server.append(account.username, generated(2))
    wait_for(lambda: stored(db, account) == 2, "a second one", details=celery.logs)


@on_both_servers
def test_a_flag_and_an_expunge_reach_the_message_through_push(
    celery: Celery, db: Session, mail_server: RealServer
) -> None:
    """IDLE reports FETCH and EXPUNGE (VANISHED) as news: the poll it sends records the
    change, with the interval far away."""
    account = pushed(db, mail_server)
    celery.worker()
    celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)
    uid = mail_server.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)

    def message() -> Message:
        db.rollback()
        found = db.scalar(select(Message).where(Message.account_id == account.id))
        assert found is not None
        return found

    with mail_server.client(account.username) as client:
        client.select_folder("INBOX")
        client.add_flags([uid], [b"\\Flagged"])
        wait_for(lambda: message().flags == ["\\Flagged"], "the flag", details=celery.logs)
        client.add_flags([uid], [b"\\Deleted"])
        client.uid_expunge([uid])
        client.logout()
    wait_for(lambda: message().deleted_at is not None, "the expunge", details=celery.logs)


def test_a_killed_watchers_mailboxes_move_to_another_and_mail_still_arrives(
    celery: Celery, db: Session, dovecot: Dovecot, redis_db: RedisDb
) -> None:
    accounts = [pushed(db, dovecot) for _ in range(4)]
    celery.worker()
    first = celery.watcher("watcher1")
    wait_for(
        lambda: all(held_by(redis_db, a, first) for a in accounts),
        "the first watcher holding every mailbox",
        details=celery.logs,
    )
    wait_for(lambda: all(watching(db, a) for a in accounts), "IDLE on all", details=celery.logs)

    # A second watcher: the first gives up its share, the second takes it.
    second = celery.watcher("watcher2")
    wait_for(
        lambda: (
            {p.pid for a in accounts for p in (first, second) if held_by(redis_db, a, p)}
            == {first.pid, second.pid}
        ),
        "the mailboxes spread over both watchers",
        details=celery.logs,
    )

    first.kill()
    wait_for(
        lambda: all(held_by(redis_db, a, second) for a in accounts),
        "the second watcher taking over every mailbox",
        details=celery.logs,
    )
    for index, account in enumerate(accounts):
        dovecot.append(account.username, generated(index))
    wait_for(
        lambda: all(stored(db, a) == 1 for a in accounts),
        "the mail of every mailbox",
        details=celery.logs,
    )


@on_both_servers
def test_a_connection_dropped_by_the_server_is_opened_again(
    celery: Celery, db: Session, mail_server: RealServer
) -> None:
    account = pushed(db, mail_server)
    celery.worker()
    watcher = celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)

    mail_server.kick(account.username)
    wait_for(
        lambda: f"mailbox {account.id}: 'INBOX' watched again" in watcher.log(),
        "the watcher connecting again",
        details=celery.logs,
    )
    mail_server.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)


def test_a_server_without_idle_is_polled_on_its_interval_only(celery: Celery, db: Session) -> None:
    with FakeImapServer([FakeMessage(1, generated(1))]) as server:
        account = make_account(
            db,
            push=True,
            imap_host="127.0.0.1",
            imap_port=server.port,
            imap_security="none",
            poll_interval_seconds=1,
        )
        celery.watcher()
        wait_for(
            lambda: push_status(db, account) == PushStatus.UNSUPPORTED,
            "the account marked as polled only",
            details=celery.logs,
        )
        assert b"IDLE" not in b"".join(server.commands)
        # The schedule polls it as any other account.
        celery.worker()
        celery.beat()
        wait_for(lambda: stored(db, account) == 1, "the message, polled", details=celery.logs)


def test_idle_is_renewed_and_still_reports_news(
    celery: Celery, db: Session, dovecot: Dovecot, set_env: Callable[..., None]
) -> None:
    # Renewed every second instead of every 25 minutes (servers drop IDLE at 29).
    set_env(WATCHER_IDLE_SECONDS=1, LOG_LEVEL="DEBUG")
    account = pushed(db, dovecot)
    celery.worker()
    watcher = celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)

    renewed = f"mailbox {account.id}: IDLE on 'INBOX' renewed"
    wait_for(lambda: watcher.log().count(renewed) >= 3, "IDLE renewed", details=celery.logs)
    dovecot.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)
    assert f"mailbox {account.id}: watching 'INBOX' failed" not in watcher.log()
