"""One connection budget per host across processes: a watcher (`cli watch`) holding IDLE,
a poll worker with two processes and a backfill, all on one host with a limit of 2,
counted at the proxy in front of Dovecot. Every wait is a loop with a generous
deadline, never a sleep that asserts timing."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.models import (
    Account,
    Backfill,
    BackfillStatus,
    Message,
    PollOutcome,
    PollRun,
    PushStatus,
    utcnow,
)
from backend.processing import backfill
from backend.schedules import service as schedules
from tests.support.accounts import make_account
from tests.support.celery import Celery, running_celery
from tests.support.dovecot import Dovecot
from tests.support.imap_proxy import ImapProxy
from tests.support.mail import generated
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

LIMIT = 2


@pytest.fixture
def proxy(dovecot: Dovecot) -> Iterator[ImapProxy]:
    def slow(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        # Fetches take a while, so connectors that do not wait their turn overlap.
        if b"FETCH" in command.upper():
            threading.Event().wait(0.05)
        return None

    with ImapProxy(dovecot.host, dovecot.imap_port, slow) as running:
        yield running


@pytest.fixture
def celery(tmp_path: Path, set_env: Callable[..., None], proxy: ImapProxy) -> Iterator[Celery]:
    set_env(
        CONNECTION_LIMITS=json.dumps({proxy.host: LIMIT}),
        CONNECTION_SLOT_SECONDS=10,
        WATCHER_LEASE_SECONDS=2,
        MIN_POLL_INTERVAL_SECONDS=1,
        SCHEDULER_MODE="celery",
    )
    with running_celery(tmp_path) as processes:
        yield processes


def stored(db: Session, account: Account) -> int:
    db.rollback()
    return int(
        db.scalar(select(func.count(Message.id)).where(Message.account_id == account.id)) or 0
    )


def test_a_watcher_a_poll_worker_and_a_backfill_share_the_hosts_limit(
    celery: Celery, db: Session, dovecot: Dovecot, proxy: ImapProxy
) -> None:
    def account(messages: int, **values: Any) -> Account:
        made = make_account(
            db,
            dovecot,
            imap_host=proxy.host,
            imap_port=proxy.port,
            poll_interval_seconds=300,
            last_polled_at=utcnow(),
            **values,
        )
        dovecot.append_many(made.username, [generated(i) for i in range(messages)])
        return made

    watched = account(0, push=True)
    polled = [account(40) for _ in range(3)]
    filled = account(40)
    celery.watcher()
    celery.worker(concurrency=2)

    def watching() -> bool:
        db.rollback()
        return db.scalar(select(Account.push_status).where(Account.id == watched.id)) == (
            PushStatus.WATCHING
        )

    wait_for(watching, "the watcher's IDLE", details=celery.logs)
    for each in polled:
        schedules.enqueue_news_poll(each.id)
    row = backfill.create(db, filled.id, {})
    db.commit()
    backfill.enqueue(row.id)

    for each in [*polled, filled]:
        wait_for(lambda a=each: stored(db, a) == 40, "every message", details=celery.logs)  # type: ignore[misc]
    dovecot.append(watched.username, generated(99))
    wait_for(lambda: stored(db, watched) == 1, "the pushed message", details=celery.logs)

    def settled() -> bool:
        db.rollback()
        running = select(PollRun.id).where(PollRun.outcome == PollOutcome.RUNNING)
        return db.scalar(running.limit(1)) is None

    wait_for(settled, "the polls' end", details=celery.logs)
    assert proxy.most == LIMIT, proxy.most
    backfilled = db.get(Backfill, row.id)
    assert backfilled is not None and backfilled.status == BackfillStatus.DONE
    outcomes = set(db.scalars(select(PollRun.outcome)).all())
    assert outcomes <= {PollOutcome.SUCCESS, PollOutcome.NO_SLOT, PollOutcome.SKIPPED}, outcomes
