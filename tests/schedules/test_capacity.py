"""Capacity: polls demanded by the schedule against polls completed, the poll queue and
the wait of its oldest poll, as the admin route, /health and /metrics show them."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend.celery_app import app, broker_priority
from backend.models import PollOutcome, PollRun, utcnow
from backend.schedules import service
from tests.support.accounts import make_account, make_accounts
from tests.support.redis_db import RedisDb


def _finished_runs(db: Session, account_id: int, count: int, seconds_ago: float) -> None:
    finished = utcnow() - timedelta(seconds=seconds_ago)
    db.add_all(
        PollRun(
            account_id=account_id,
            started_at=finished - timedelta(seconds=1),
            finished_at=finished,
            outcome=PollOutcome.SUCCESS,
        )
        for _ in range(count)
    )
    db.commit()


def _queue_poll(account_id: int, *, waited: float, priority: int) -> None:
    app.send_task(
        "mailbox.poll",
        args=[account_id],
        priority=broker_priority(priority),
        headers={service.SENT_AT_HEADER: time.time() - waited},
    )


def _overloaded(db: Session) -> list[int]:
    """Ten mailboxes every 10 s (1 poll/s asked for), 30 polls done in the last minute
    (0.5/s), and two polls queued: one urgent just now, one ordinary 120 s ago."""
    accounts = make_accounts(db, 10, poll_interval_seconds=10)
    make_account(db, poll_interval_seconds=10, enabled=False)  # not on the schedule
    _finished_runs(db, accounts[0].id, 30, seconds_ago=10)
    _finished_runs(db, accounts[1].id, 50, seconds_ago=600)  # outside the window
    _queue_poll(accounts[2].id, waited=120, priority=1)
    _queue_poll(accounts[3].id, waited=0, priority=9)
    return [account.id for account in accounts]


def test_capacity_compares_demand_with_completed_polls(db: Session, redis_db: RedisDb) -> None:
    _overloaded(db)
    result = service.capacity(db)
    assert result.mailboxes == 10
    assert result.demanded_polls_per_second == 1.0
    assert result.completed_polls_per_second == 0.5
    assert result.interval_stretch == 2.0
    assert result.queue_length == 2
    assert result.oldest_pending_seconds is not None
    assert 119 <= result.oldest_pending_seconds < 130
    assert result.behind is False  # 120 s < POLL_LAG_DEGRADED_SECONDS (300)


def test_an_idle_schedule_is_not_behind(db: Session, redis_db: RedisDb) -> None:
    make_accounts(db, 4, poll_interval_seconds=40)
    result = service.capacity(db)
    assert result.demanded_polls_per_second == 0.1
    assert result.completed_polls_per_second == 0.0
    assert result.interval_stretch is None
    assert (result.queue_length, result.oldest_pending_seconds, result.behind) == (0, None, False)


def test_capacity_route_health_and_metrics_say_when_polls_fall_behind(
    db: Session, redis_db: RedisDb, set_env: Callable[..., None], api: TestClient
) -> None:
    _overloaded(db)
    set_env(POLL_LAG_DEGRADED_SECONDS=60)

    body = api.get("/admin/capacity").json()
    assert body["behind"] is True
    assert body["queue_length"] == 2
    assert body["interval_stretch"] == 2.0

    health = api.get("/health").json()
    assert health["status"] == "degraded"
    assert health["checks"]["polls"].startswith("error: behind: the oldest queued poll has")
    assert "add workers" in health["checks"]["polls"]

    metrics = api.get("/metrics").text
    assert "mailbeat_polls_demanded_per_second 1.0" in metrics
    assert "mailbeat_polls_completed_per_second 0.5" in metrics
    assert "mailbeat_poll_interval_stretch 2.0" in metrics
    oldest = next(
        line for line in metrics.splitlines() if line.startswith("mailbeat_poll_queue_oldest")
    )
    assert 119 <= float(oldest.split()[1]) < 130


def test_health_polls_check_is_ok_when_the_queue_keeps_up(
    db: Session, redis_db: RedisDb, api: TestClient
) -> None:
    _overloaded(db)
    assert api.get("/health").json()["checks"]["polls"] == "ok"
