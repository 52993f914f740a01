"""Local mode end to end: no Redis, the in-process scheduler polls the Dovecot fixture."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from itertools import combinations
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend import dispatch
from backend.db import get_sessionmaker
from backend.mailbox.polling import run_poll
from backend.main import local_housekeeping
from backend.models import Account, Attachment, Message, PollRun, utcnow
from backend.schedules import service
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.net import free_port
from tests.support.s3 import MotoS3, Outage
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def without_redis(set_env: Callable[..., None]) -> Iterator[None]:
    # Nothing listens there: SCHEDULER_MODE=auto must choose the local scheduler.
    set_env(
        SCHEDULER_MODE="auto",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        REDIS_SOCKET_TIMEOUT=1,
        MIN_POLL_INTERVAL_SECONDS=1,
    )
    yield
    service.stop_local_scheduler()


def _count(db: Session, account: Account) -> int:
    db.rollback()
    return int(
        db.scalar(select(func.count(Message.id)).where(Message.account_id == account.id)) or 0
    )


def test_local_mode_polls_without_redis(
    db: Session, dovecot: Dovecot, without_redis: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.dispatch"):
        assert service.start_local_scheduler_if_needed(
            poll=run_poll, housekeeping=local_housekeeping
        )
    assert dispatch.mode() == "local"
    assert "cannot be reached" in caplog.text

    account = make_account(db, dovecot, poll_interval_seconds=1)
    username = account.username
    service.sync_account(account)  # as the accounts API does after its commit
    dovecot.append_many(username, [generated(index) for index in range(3)])

    wait_for(lambda: _count(db, account) == 3, "the first messages")
    dovecot.append_many(username, [generated(index) for index in range(3, 5)])
    wait_for(lambda: _count(db, account) == 5, "later messages")
    db.rollback()
    held = list(db.scalars(select(Message).where(Message.account_id == account.id)))
    assert len({message.uid for message in held}) == 5
    # Handed on in this process: no Celery.
    wait_for(lambda: all(m.processed_at for m in _refreshed(db, held)), "processing in process")

    [entry] = service.list_entries()
    assert (entry.account_id, entry.interval) == (account.id, 1)
    assert entry.last_run_at is not None

    # A poll on request runs here too.
    assert service.enqueue_poll(account.id)

    account.enabled = False
    db.commit()
    service.sync_account(account)
    assert service.list_entries() == []


def _refreshed(db: Session, messages: list[Message]) -> list[Message]:
    db.rollback()
    for message in messages:
        db.refresh(message)
    return messages


def _messages(db: Session, account: Account) -> list[Message]:
    db.rollback()
    return list(
        db.scalars(select(Message).where(Message.account_id == account.id).order_by(Message.uid))
    )


def test_local_housekeeping_through_an_s3_outage(
    db: Session,
    dovecot: Dovecot,
    s3_outage: Outage,
    moto_s3: MotoS3,
    set_env: Callable[..., None],
) -> None:
    """The in-process scheduler's housekeeping (processing sweep, storage sync) keeps
    running while S3 is down, and once it is back moves what fell back to local files."""
    set_env(
        SCHEDULER_MODE="local",
        MIN_POLL_INTERVAL_SECONDS=1,
        RECONCILE_INTERVAL_SECONDS=1,  # housekeeping every second
        S3_MAX_ATTEMPTS=1,
        S3_CONNECT_TIMEOUT=1,
        S3_WRITE_TIMEOUT_SECONDS=1,
        S3_RETRY_AFTER_SECONDS=1,
    )
    account = make_account(db, dovecot, poll_interval_seconds=1)
    s3_outage.begin()
    dovecot.append_many(account.username, [generated(index) for index in range(3)])
    assert service.start_local_scheduler_if_needed(poll=run_poll, housekeeping=local_housekeeping)
    try:
        wait_for(lambda: len(_messages(db, account)) == 3, "mail stored while S3 is down")
        assert {m.storage_backend for m in _messages(db, account)} == {"local"}

        # A message whose hand-on was lost (the process died after the poll committed).
        lost = _messages(db, account)[0]
        lost.processed_at = None
        lost.ingested_at = utcnow() - timedelta(hours=1)
        db.commit()
        wait_for(
            lambda: all(m.processed_at for m in _messages(db, account)),
            "the sweep to process it, S3 still down",
        )
        # Housekeeping that fails (the sync cannot reach S3) stops no poll.
        dovecot.append_many(account.username, [generated(index) for index in range(3, 5)])
        wait_for(lambda: len(_messages(db, account)) == 5, "later mail, S3 still down")

        s3_outage.end()
        wait_for(
            lambda: {m.storage_backend for m in _messages(db, account)} == {"s3"},
            "the storage sync to move every message up to S3",
        )
    finally:
        service.stop_local_scheduler()
    with dovecot.client(account.username) as client:
        client.select_folder("INBOX", readonly=True)
        on_server = {
            uid: item[b"BODY[]"]
            for uid, item in client.fetch(client.search("ALL"), ["BODY.PEEK[]"]).items()
        }
        client.logout()
    bucket = moto_s3.client()
    for message in _messages(db, account):
        assert message.storage_key is not None
        stored = bucket.get_object(Bucket=s3_outage.bucket, Key=message.storage_key)
        assert stored["Body"].read() == on_server[message.uid]


@pytest.fixture
def sqlite_local(tmp_path: Path, set_env: Callable[..., None]) -> Iterator[None]:
    """Local mode on SQLite, as `make run` on a laptop: a fresh database file."""
    set_env(
        DATABASE_URL=f"sqlite:///{tmp_path}/mailbeat.db",
        SCHEDULER_MODE="local",
        MIN_POLL_INTERVAL_SECONDS=1,
        IMAP_FETCH_BATCH_SIZE=10,
    )
    command.upgrade(AlembicConfig(str(ROOT / "alembic.ini")), "head")
    yield
    service.stop_local_scheduler()


def test_concurrent_local_polls_on_sqlite(dovecot: Dovecot, sqlite_local: None) -> None:
    """Four mailboxes polled at once by the local scheduler's threads, each write a
    transaction on one SQLite file: every message stored once, no poll fails."""
    db = get_sessionmaker()()
    try:
        accounts = [make_account(db, dovecot, poll_interval_seconds=1) for _ in range(4)]
        for account in accounts:
            dovecot.write_maildir(
                account.username,
                # Every tenth with an attachment: its row goes in with the batch's too.
                [generated(i, attachment=b"%PDF" if i % 10 == 0 else None) for i in range(120)],
            )
        assert service.start_local_scheduler_if_needed(
            poll=run_poll, housekeeping=local_housekeeping
        )
        for account in accounts:
            service.enqueue_poll(account.id)  # all at once, not spread over the interval
        wait_for(
            lambda: all(len(_messages(db, a)) == 120 for a in accounts),
            "every mailbox ingested",
        )
        for account in accounts:
            dovecot.append_many(account.username, [generated(i) for i in range(120, 125)])
        wait_for(
            lambda: all(len(_messages(db, a)) == 125 for a in accounts),
            "new mail in every mailbox",
        )
        service.stop_local_scheduler()

        db.rollback()
        for account in accounts:
            assert [m.uid for m in _messages(db, account)] == list(range(1, 126))
        runs = list(db.scalars(select(PollRun).where(PollRun.finished_at.is_not(None))))
        failed = [(run.outcome, run.error) for run in runs if run.outcome != "success"]
        assert failed == []
        spans = sorted((run.started_at, run.finished_at, run.account_id) for run in runs)
        overlapping = {
            (a, b)
            for (start_a, end_a, a), (start_b, _end_b, b) in combinations(spans, 2)
            if a != b and end_a is not None and start_b < end_a
        }
        assert overlapping, "no two mailboxes were polled at the same time"
        assert db.scalar(select(func.count()).where(Message.processed_at.is_(None))) == 0
        assert db.scalar(select(func.count()).select_from(Attachment)) == 4 * 12
    finally:
        db.close()
