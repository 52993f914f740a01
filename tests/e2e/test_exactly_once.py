"""A worker killed with SIGKILL in the middle of handing mail on: inside `message.process`,
and while its webhook request is in flight. Real worker processes, Redis, PostgreSQL,
Dovecot (Cyrus too for the first test) and a receiver that checks signatures and keeps
the event ids it has accepted (docs/webhooks.md, "Idempotency"). Every message must
reach it, each event id once.

Each kill lands inside the task by construction, not by timing: the test holds the
messages' rows locked (message.process waits on them), or the receiver holds the first
request unanswered, until the worker is dead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from backend.db import get_engine
from backend.models import Message, WebhookDelivery
from backend.schedules import service
from tests.support.accounts import make_account
from tests.support.celery import Celery, running_celery
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.receiver import Receiver
from tests.support.redis_db import RedisDb
from tests.support.servers import RealServer, on_both_servers
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

MESSAGES = 3
# Redis hands a dead worker's unacknowledged task out again after the broker's
# visibility timeout: twice POLL_TIME_LIMIT_SECONDS (backend/celery_app.py).
POLL_TIME_LIMIT = 5
VISIBILITY_TIMEOUT = 2 * POLL_TIME_LIMIT


@pytest.fixture
def celery(tmp_path: Path, webhooks_on: Callable[..., None]) -> Iterator[Celery]:
    webhooks_on(
        SCHEDULER_MODE="celery",
        WEBHOOK_TIMEOUT_SECONDS=3,
        WEBHOOK_CONNECT_TIMEOUT_SECONDS=1,
        POLL_SOFT_TIME_LIMIT_SECONDS=POLL_TIME_LIMIT - 1,
        POLL_TIME_LIMIT_SECONDS=POLL_TIME_LIMIT,
        PROCESSING_SWEEP_INTERVAL_SECONDS=10,
    )
    with running_celery(tmp_path) as processes:
        yield processes


def _wait(condition: Callable[[], object], what: str, celery: Celery) -> None:
    try:
        wait_for(condition, what)
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}\n{celery.logs()}") from None


def _ingested(db: Session, server: RealServer, celery: Celery, redis_db: RedisDb) -> list[int]:
    """A mailbox with MESSAGES new messages, polled by a worker that only polls: the
    messages are stored and their `message.process` task (one batch) waits in the
    workflow queue."""
    account = make_account(db, server, poll_interval_seconds=3600)
    server.append_many(account.username, [generated(index) for index in range(MESSAGES)])
    poller = celery.worker("poller", queues="email")
    service.enqueue_poll(account.id)
    _wait(
        lambda: redis_db.client().llen("workflow") == 1,
        f"the poll to hand on its {MESSAGES} messages",
        celery,
    )
    poller.stop()
    db.rollback()
    return list(db.scalars(select(Message.id).order_by(Message.id)))


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


def _start_after_visibility_timeout(celery: Celery, redis_db: RedisDb, name: str) -> None:
    """Start a worker once the dead worker's task is past the visibility timeout: a new
    worker puts such tasks back in their queue as it starts."""
    # Kombu scores each unacknowledged task with the time a worker took it.
    unacked: Any = redis_db.client().zrange("unacked_index", 0, -1, withscores=True)
    [(_tag, delivered_at)] = unacked
    time.sleep(max(0.0, delivered_at + VISIBILITY_TIMEOUT + 0.5 - time.time()))
    celery.worker(name, queues="workflow")


def _handed_on_exactly_once(
    db: Session, receiver: Receiver, celery: Celery, message_ids: list[int]
) -> dict[str, int]:
    """Wait for every delivery to be made; check that each message was processed, has one
    delivery, and that the receiver accepted each event id once. Returns how often each
    event id arrived."""

    def settled() -> bool:
        db.rollback()
        statuses = db.scalars(select(WebhookDelivery.status))
        processed = db.scalar(select(func.count()).where(Message.processed_at.is_not(None)))
        return processed == MESSAGES and list(statuses) == ["delivered"] * MESSAGES

    _wait(settled, "every message processed and delivered", celery)
    deliveries = list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.message_id)))
    assert [d.message_id for d in deliveries] == message_ids
    arrivals = receiver.accepted()
    assert sorted(arrivals) == sorted(d.event_id for d in deliveries)
    first_of_each = {r.headers["x-mailbeat-event-id"]: r for r in reversed(receiver.delivered())}
    assert sorted(r.json()["data"]["message"]["id"] for r in first_of_each.values()) == (
        message_ids
    )
    assert all(r.status != 401 for r in receiver.requests)  # each one signed
    return arrivals


@on_both_servers
def test_a_worker_killed_inside_message_process(
    db: Session, mail_server: RealServer, receiver: Receiver, celery: Celery, redis_db: RedisDb
) -> None:
    message_ids = _ingested(db, mail_server, celery, redis_db)
    with get_engine().connect() as conn:
        lock = conn.begin()
        conn.execute(select(Message.id).with_for_update())
        doomed = celery.worker("doomed", queues="workflow")
        _wait(lambda: _lock_waiters(db) == 1, "message.process to wait on its row", celery)
        doomed.kill()
        lock.rollback()
    assert receiver.requests == []

    _start_after_visibility_timeout(celery, redis_db, "survivor")
    arrivals = _handed_on_exactly_once(db, receiver, celery, message_ids)
    assert set(arrivals.values()) == {1}  # nothing was sent before the kill


@pytest.fixture
def one_request_at_a_time(webhooks_on: Callable[..., None]) -> None:
    """The kill lands while the batch's first request is in flight and before the others
    are sent (the next test kills a batch with all its requests in flight)."""
    webhooks_on(WEBHOOK_CONCURRENCY=1)


@pytest.mark.usefixtures("one_request_at_a_time")
def test_a_worker_killed_while_its_webhook_request_is_in_flight(
    db: Session, dovecot: Dovecot, receiver: Receiver, celery: Celery, redis_db: RedisDb
) -> None:
    message_ids = _ingested(db, dovecot, celery, redis_db)
    celery.beat()  # its processing sweep sends again what a dead attempt left claimed
    receiver.hold_next()
    doomed = celery.worker("doomed", queues="workflow")
    _wait(receiver.holding.is_set, "the first webhook request", celery)
    doomed.kill()
    receiver.release()  # the receiver got it; its answer reaches nobody
    wait_for(lambda: len(receiver.requests) == 1, "the held request to be recorded")
    held = receiver.requests[0].headers["x-mailbeat-event-id"]
    # Kombu keeps an unacknowledged task as [message, exchange, routing key].
    unacked = redis_db.client().hvals("unacked")
    pending = [json.loads(raw)[0]["headers"]["task"] for raw in unacked]
    assert pending == ["webhook.deliver"], pending

    _start_after_visibility_timeout(celery, redis_db, "survivor")
    arrivals = _handed_on_exactly_once(db, receiver, celery, message_ids)
    # Sent again with the same event id, which the receiver dropped as a repeat.
    assert arrivals == {**dict.fromkeys(arrivals, 1), held: 2}


def test_a_worker_killed_with_a_batch_of_requests_in_flight(
    db: Session, dovecot: Dovecot, receiver: Receiver, celery: Celery, redis_db: RedisDb
) -> None:
    message_ids = _ingested(db, dovecot, celery, redis_db)
    celery.beat()  # its processing sweep sends again what the dead batch left claimed
    receiver.hold_all()
    doomed = celery.worker("doomed", queues="workflow")
    _wait(lambda: receiver.held == MESSAGES, "the batch's requests, all at once", celery)
    doomed.kill()
    receiver.release()  # the receiver got them; their answers reach nobody
    wait_for(lambda: len(receiver.requests) == MESSAGES, "the held requests to be recorded")

    _start_after_visibility_timeout(celery, redis_db, "survivor")
    arrivals = _handed_on_exactly_once(db, receiver, celery, message_ids)
    # Each was sent again with its event id, which the receiver dropped as a repeat.
    assert arrivals == dict.fromkeys(arrivals, 2)
