"""Crashes mid-poll, with real processes: a poll worker SIGKILLed in the middle of first
syncs, and a poll SIGSTOPped past its lease while another takes its mailbox. Real Celery
workers and beat, `cli poll`, Redis, PostgreSQL and Dovecot.

The mailbox lease lasts a few seconds here and POLL_TIME_LIMIT_SECONDS keeps its
default (660): a lock that expired only past the hard time limit would hold the killed
worker's mailboxes for 690 s, far beyond every wait below (90 s at most).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from backend.mailbox.lock import lock_key
from backend.mailbox.polling import run_poll
from backend.mailbox.service import DEAD_RUN, LOST_LEASE, PollResult
from backend.models import Account, Message, PollOutcome, PollRun, utcnow
from backend.schedules import service
from tests.support.accounts import make_account
from tests.support.celery import ROOT, Celery, running_celery
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.processes import stop_group
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

LEASE = 3
BATCH = 10
CONNECTIONS = "mailbeat_push_connections{"


@pytest.fixture
def celery(tmp_path: Path, set_env: Callable[..., None]) -> Iterator[Celery]:
    set_env(SCHEDULER_MODE="celery", MAILBOX_LEASE_SECONDS=LEASE, IMAP_FETCH_BATCH_SIZE=BATCH)
    with running_celery(tmp_path) as processes:
        yield processes


def _stored(db: Session) -> dict[int, int]:
    db.rollback()
    rows = db.execute(select(Message.account_id, func.count()).group_by(Message.account_id))
    return {account_id: count for account_id, count in rows}


def _exactly_once(db: Session, dovecot: Dovecot, account: Account) -> None:
    """Every UID on the server stored once, nothing else."""
    client = dovecot.client(account.username)
    try:
        client.select_folder("INBOX", readonly=True)
        on_server = sorted(client.search("ALL"))
    finally:
        client.logout()
    db.rollback()
    stored = list(
        db.scalars(select(Message.uid).where(Message.account_id == account.id).order_by("uid"))
    )
    assert stored == on_server


def test_a_killed_workers_mailboxes_are_polled_again_exactly_once(
    db: Session, dovecot: Dovecot, celery: Celery
) -> None:
    mailboxes, messages = 4, 300
    accounts = [make_account(db, dovecot, poll_interval_seconds=3600) for _ in range(mailboxes)]
    for account in accounts:
        dovecot.write_maildir(account.username, [generated(i) for i in range(messages)])
    celery.beat()  # the sweep of dead polls, every LEASE / 2
    celery.worker("processor", queues="workflow,default")
    poller = celery.worker("poller", queues="email", concurrency=mailboxes)
    for account in accounts:
        service.enqueue_poll(account.id)

    def wait(condition: Callable[[], object], what: str) -> None:
        wait_for(condition, what, details=celery.logs)

    wait(lambda: len(_stored(db)) == mailboxes, "every mailbox's first sync to store mail")
    poller.kill()  # SIGKILL, the whole group: an OOM kill, a lost node
    cut = _stored(db)
    interrupted = [account for account in accounts if cut[account.id] < messages]
    assert interrupted, f"every first sync finished before the kill: {cut}"

    celery.worker("fresh", queues="email", concurrency=mailboxes)
    # The dead polls' leases run out; the sweep closes their runs and polls the mailboxes
    # again (their interval is an hour away).
    wait(
        lambda: _stored(db) == {account.id: messages for account in accounts},
        "every message stored after the kill",
    )
    for account in accounts:
        _exactly_once(db, dovecot, account)
    db.rollback()
    for account in interrupted:
        errors = db.scalars(select(PollRun.error).where(PollRun.account_id == account.id))
        assert DEAD_RUN in list(errors)  # the killed poll, closed as a failure


def _lock_waiters(db: Session) -> int:
    db.rollback()
    return int(
        db.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
        or 0
    )


def test_a_poll_stopped_past_its_lease_cannot_write_after_another_took_the_mailbox(
    db: Session,
    dovecot: Dovecot,
    redis_db: RedisDb,
    tmp_path: Path,
    set_env: Callable[..., None],
) -> None:
    # The second poll runs in this process: a lease of 4 s lets its heartbeat be late by
    # over 2 s on a loaded machine without losing the mailbox.
    set_env(SCHEDULER_MODE="celery", MAILBOX_LEASE_SECONDS=4, IMAP_FETCH_BATCH_SIZE=5)
    messages = 300
    account = make_account(db, dovecot, poll_interval_seconds=3600)
    dovecot.write_maildir(account.username, [generated(i) for i in range(messages)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "stale-poll.log"
    with log_path.open("ab") as log:
        stale = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "poll", str(account.id)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def details() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        wait_for(lambda: _stored(db).get(account.id, 0) >= 5, "the poll to store", details=details)
        os.killpg(stale.pid, signal.SIGSTOP)
        at_stop = _stored(db)[account.id]
        assert at_stop < messages, "the poll finished before it was stopped"
        client = redis_db.client()
        wait_for(lambda: not client.exists(lock_key(account.id)), "the stopped poll's lease to end")

        results: list[PollResult | str] = []
        second = threading.Thread(target=lambda: results.append(run_poll(account.id, None)))
        second.start()

        def taken() -> bool:
            # The second poll has its token, or waits for the account row the stopped one
            # locked in the middle of a commit (that commit comes first, then the token).
            db.rollback()
            fence = db.scalar(select(Account.poll_fence).where(Account.id == account.id))
            return (fence or 0) >= 2 or _lock_waiters(db) >= 1

        wait_for(taken, "the second poll to take the mailbox")
        os.killpg(stale.pid, signal.SIGCONT)
        stale.wait(timeout=120)
        second.join(timeout=120)
    finally:
        stop_group(stale)

    [first_result] = results
    assert isinstance(first_result, PollResult) and first_result.outcome == PollOutcome.SUCCESS
    db.rollback()
    stale_run, second_run = db.scalars(select(PollRun).order_by(PollRun.id)).all()
    assert stale_run.outcome == PollOutcome.SKIPPED, details()
    assert stale_run.error is not None and stale_run.error.startswith(LOST_LEASE)
    # After the second poll started, the stopped one committed at most the batch it was
    # committing when it was stopped; the rest is the second poll's work, each once.
    assert stale_run.messages_count <= at_stop + 5
    assert stale_run.messages_count + second_run.messages_count == messages
    assert second_run.outcome == PollOutcome.SUCCESS
    _exactly_once(db, dovecot, account)


def _push_connections(api: TestClient) -> float:
    lines = api.get("/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(CONNECTIONS))


def test_a_killed_watcher_leaves_no_push_status_or_gauge_that_looks_alive(
    db: Session, dovecot: Dovecot, celery: Celery, set_env: Callable[..., None], api: TestClient
) -> None:
    set_env(WATCHER_LEASE_SECONDS=1)
    account = make_account(
        db, dovecot, push=True, poll_interval_seconds=3600, last_polled_at=utcnow()
    )
    watcher = celery.watcher()

    def shown() -> dict[str, Any]:
        body: dict[str, Any] = api.get(f"/accounts/{account.id}").json()
        return body

    wait_for(lambda: shown()["push_status"] == "watching", "IDLE held", details=celery.logs)
    confirmed = shown()["push_confirmed_at"]
    wait_for(
        lambda: shown()["push_confirmed_at"] != confirmed,
        "the live watcher to confirm it again",
        details=celery.logs,
    )
    assert _push_connections(api) == 1

    watcher.kill()  # SIGKILL: it cannot set its status or zero its gauge
    wait_for(lambda: shown()["push_status"] == "stale", "push_status to turn stale")
    db.rollback()
    assert db.scalar(select(Account.push_status).where(Account.id == account.id)) == "watching"
    wait_for(lambda: _push_connections(api) == 0, "the dead watcher's connections to go")
